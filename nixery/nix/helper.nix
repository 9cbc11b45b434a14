# Nixery's Nix helper: resolves image package names in a package set and
# exposes what resolved, so that the service (or a user with plain Nix) can
# build an image's contents.
#
# Every argument arrives as a string (`--argstr`), lists as JSON, so nothing a
# client sends is ever spliced into Nix source.
#
#   packages  JSON list of names; dots reach nested sets ("python3Packages.requests")
#   optional  JSON list of names added only where the set has them ("cacert")
#   srcType   "path" (a directory holding the set) or "tarball" (a URL that fetchTarball reads)
#   srcArgs   the path or URL
#   system    the target system, e.g. "x86_64-linux"
#   allowUnfree  "true" or "false": the set's `config.allowUnfree` (NIXERY_ALLOW_UNFREE)
#   listed    JSON list of set paths ("" is the top level) whose attribute names the service
#             holds already for this revision; the names of other sets an unknown name stopped
#             in are returned, for "did you mean"
#   image     the image's name when it may be a declared image (one component), else "":
#             when the set's nixery-images.nix declares it, its packages replace `packages`
#
# Declared images: `nixery-images.nix` next to the set's default.nix evaluates to an attribute
# set of images, or a function of { pkgs, lib, system } returning one. Its values are the set's
# code (a tag selects them): they leave here only as data (`toData`), never forced into
# anything else, and the service checks every field and size before using them.
#
# Attributes:
#   resolve   data for the service: { unsupported = null or why; unknown = [ names ];
#             stoppedIn = { name = set path; }; names = { set path = [ names ]; };
#             problems = [ { name; kind; detail; } ];
#             packages = { name = outPath; }; derivations = { name = "<drv>!<output>"; };
#             declaredImage = null or the declaration of `image`, as data;
#             mainProgram = null or meta.mainProgram of an image of one package },
#             evaluated with --read-write-mode so that the service builds the derivations
#             without evaluating the set again
#   explain   forces the `packages` without catching anything: Nix's error is the set's own
#             message (an alias that throws "has been removed"), for the names `resolve`
#             reported as `throws` or `fails`
#   contents  the resolved derivations, in the order of `packages` then `optional`
#   declared  { images = { name = { packages; description; }; } or { error; } }: the declared
#             images, for the page and /declared.json
#
# The set gets an explicit `config` (and no overlays) when it takes them, as nixpkgs does, so
# that the service user's ~/.config/nixpkgs does not change what is served; the service runs
# Nix without NIXPKGS_ALLOW_* variables, which nixpkgs reads itself.
{ packages ? "[]", optional ? "[]", srcType ? "path", srcArgs ? "", system ? builtins.currentSystem,
  allowUnfree ? "false", listed ? "[]", image ? "" }:
let
  requestedNames = builtins.fromJSON packages;
  optionalNames = builtins.fromJSON optional;
  listedSets = builtins.fromJSON listed;

  src =
    if srcType == "path" then /. + srcArgs
    else if srcType == "tarball" then builtins.fetchTarball { url = srcArgs; }
    else throw "nixery: unknown srcType ${srcType}";

  # What nixpkgs' check-meta reads; anything not set here is nixpkgs' default (refuse).
  config = { allowUnfree = allowUnfree == "true"; };
  unfreeAllowed = config.allowUnfree;

  imported = import src;
  # A set taking `system` (as nixpkgs does) builds for any system it knows. A plain
  # attribute set, or a function without a `system` argument, only gives what it
  # gives for the machine evaluating it: asked for another system it is refused,
  # instead of quietly serving this machine's binaries under another architecture.
  takesSystem = builtins.isFunction imported && builtins.functionArgs imported ? system;
  systemError =
    if takesSystem || system == builtins.currentSystem then null
    else "the package set builds only for ${builtins.currentSystem}"
      + " (it is ${if builtins.isFunction imported then "a function without a `system` argument" else "a plain attribute set"}),"
      + " not for ${system}";
  # Only the arguments the function declares: a set without `config` is called as before.
  arguments = builtins.intersectAttrs (builtins.functionArgs imported)
    { inherit system config; overlays = [ ]; };
  pkgs =
    if systemError != null then throw "nixery: ${systemError}"
    else if builtins.isFunction imported then imported arguments
    else imported;

  # The declarations, or null when the set has none.
  declarationsFile = src + "/nixery-images.nix";
  declarations =
    if !(builtins.pathExists declarationsFile) then null
    else let d = import declarationsFile; in
      if builtins.isFunction d then d (builtins.intersectAttrs (builtins.functionArgs d) { inherit pkgs system; lib = pkgs.lib; })
      else d;
  declarationsOk = try (builtins.isAttrs declarations) false;
  # A value of the set's code as JSON-able data: strings, numbers, booleans, lists and sets of
  # them, at most `depth` levels deep; anything else (a function, a path, which toJSON would
  # copy into the store, a derivation, a value that throws) becomes { __invalid = what it is; }.
  toData = depth: v:
    let
      forced = builtins.tryEval v;
      type = if forced.success then builtins.typeOf forced.value else "throws";
      value = forced.value;
      isDrv = try ((value.type or null) == "derivation") false;
    in
      if type == "string" || type == "int" || type == "bool" || type == "float" then value
      else if isDrv then { __invalid = "a derivation"; }
      else if depth <= 0 && (type == "list" || type == "set") then { __invalid = "nested too deeply"; }
      else if type == "list" then map (toData (depth - 1)) value
      else if type == "set" then builtins.mapAttrs (_: toData (depth - 1)) value
      else { __invalid = { lambda = "a function"; path = "a path"; null = "null"; }.${type} or type; };
  # The declaration of `image`, as data (null when the set declares no such image).
  declaredImage =
    if image == "" || !declarationsOk || !(try (builtins.hasAttr image declarations) false) then null
    else toData 3 declarations.${image};
  declaredPackages = p: if builtins.isList p && builtins.all builtins.isString p then p else [ ];
  # The names to resolve: a declared image's packages (the service refuses any that are not a list
  # of names), else the image's.
  names = if declaredImage == null then requestedNames
    else declaredPackages (if builtins.isAttrs declaredImage then declaredImage.packages or [ ] else [ ]);

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upper lower;
  startsWithDigit = s: builtins.match "[0-9].*" s != null;
  try = v: default: let r = builtins.tryEval v; in if r.success then r.value else default;
  parts = name: builtins.filter builtins.isString (builtins.split "\\." name);

  # Lower-cased attribute name -> the set's names with that spelling. Built once per set and
  # evaluation (the package set's own index is shared by every name), not one scan per lookup.
  indexOf = set: builtins.groupBy toLower (builtins.attrNames set);
  pkgsIndex = indexOf pkgs;

  # The attribute name of `set` that `part` names: verbatim, then with nixpkgs'
  # leading underscore for names starting with a digit, then ignoring case
  # (registry names are lower case, nixpkgs' are not). null if none.
  lookup = set: index: part:
    let
      candidates = [ part ] ++ (if startsWithDigit part then [ ("_" + part) ] else [ ]);
      exact = builtins.filter (c: builtins.hasAttr c set) candidates;
      loose = builtins.sort builtins.lessThan
        (builtins.concatLists (map (c: index.${toLower c} or [ ]) candidates));
    in
      if exact != [ ] then builtins.head exact
      else if loose != [ ] then builtins.head loose
      else null;

  # Walks a dotted name through nested sets. `value` is what it reached, or null:
  # then `stop` says why ("missing", or "throws" when a step's value throws, as
  # nixpkgs' removed aliases do) and `at` is the path of the last set reached.
  walk = name:
    let
      step = acc: part:
        if acc.value == null then acc
        else if !(try (builtins.isAttrs acc.value) false) then
          acc // { value = null; stop = if try (builtins.seq acc.value true) false then "missing" else "throws"; }
        else
          let attr = lookup acc.value acc.index part;
          in if attr == null then acc // { value = null; stop = "missing"; at = acc.path; }
          else { value = acc.value.${attr}; index = indexOf acc.value.${attr}; at = acc.path; path = acc.path ++ [ attr ]; stop = null; };
    in builtins.foldl' step { value = pkgs; index = pkgsIndex; at = [ ]; path = [ ]; stop = null; } (parts name);

  # Why a derivation whose paths do not evaluate is refused, read off its meta the way
  # nixpkgs' check-meta reads it (in its order: unfree, broken, unsupported, insecure);
  # "fails" when meta says nothing (Nix's own message is then fetched with `explain`).
  refusal = drv:
    let
      meta = try (drv.meta or { }) { };
      licenses = try (let l = meta.license or [ ]; in if builtins.isList l then l else [ l ]) [ ];
      licenseNames = try (builtins.concatStringsSep ", "
        (map (l: if builtins.isAttrs l then l.shortName or l.spdxId or "unfree" else toString l) licenses)) "";
      unfree = try ((meta.unfree or false) == true
        || builtins.any (l: builtins.isAttrs l && (l.free or true) == false) licenses) false;
      broken = try ((meta.broken or false) == true) false;
      platforms = try (meta.platforms or null) null;
      badPlatforms = try (meta.badPlatforms or [ ]) [ ];
      unsupported = try (
        (platforms != null && builtins.all builtins.isString platforms && !(builtins.elem system platforms))
        || builtins.elem system badPlatforms) false;
      vulnerabilities = try (builtins.filter builtins.isString (meta.knownVulnerabilities or [ ])) [ ];
    in
      if unfree && !unfreeAllowed then { kind = "unfree"; detail = licenseNames; }
      else if broken then { kind = "broken"; detail = ""; }
      else if unsupported then { kind = "unsupported"; detail = system; }
      else if vulnerabilities != [ ] then { kind = "insecure"; detail = builtins.concatStringsSep "; " vulnerabilities; }
      else { kind = "fails"; detail = ""; };

  # One name's outcome: { ok = { out; realise; } } when it reaches a derivation whose paths
  # evaluate (what `nix-store --realise` builds without evaluating again: "<drv>!<output>"),
  # else { missing = set path } or { problem = { kind; detail; } }.
  resolveOne = name:
    let
      walked = walk name;
      value = walked.value;
      forced = builtins.tryEval (builtins.seq value true);
      isDrv = try (builtins.isAttrs value && (value.type or null) == "derivation") false;
      paths = builtins.tryEval (builtins.deepSeq value.drvPath {
        out = value.outPath;
        realise = "${value.drvPath}!${value.outputName or "out"}";
      });
      what =
        if try (builtins.isFunction value) false then "a function"
        else if try (builtins.isAttrs value) false then "a set of packages"
        else "a value";
    in
      if walked.stop == "missing" then { missing = builtins.concatStringsSep "." walked.at; }
      else if walked.stop == "throws" || !forced.success then { problem = { kind = "throws"; detail = ""; }; }
      else if !isDrv then { problem = { kind = "not-a-package"; detail = what; }; }
      else if paths.success then { ok = paths.value; }
      else { problem = refusal value; };

  resolvedRequired = map (n: { name = n; value = resolveOne n; }) names;
  resolvedOptional = map (n: { name = n; value = resolveOne n; }) optionalNames;
  found = builtins.filter (r: r.value ? ok) (resolvedRequired ++ resolvedOptional);
  missing = builtins.filter (r: r.value ? missing) resolvedRequired;
  # The sets unknown names stopped in, by path, whose names the service does not hold yet.
  setsToList = builtins.filter (path: !(builtins.elem path listedSets))
    (builtins.attrNames (builtins.listToAttrs (map (r: { name = r.value.missing; value = null; }) missing)));
  setAt = path: if path == "" then pkgs else builtins.foldl' (set: part: set.${part}) pkgs (parts path);
in
{
  # `unsupported` is null, or why the set cannot build for `system` (then nothing resolves).
  resolve = if systemError != null then { unsupported = systemError; unknown = [ ]; problems = [ ]; packages = { }; } else {
    unsupported = null;
    unknown = map (r: r.name) missing;
    stoppedIn = builtins.listToAttrs (map (r: { inherit (r) name; value = r.value.missing; }) missing);
    names = builtins.listToAttrs (map (path: { name = path; value =
      let set = setAt path; in if (set.type or null) == "derivation" then [ ] else builtins.attrNames set; }) setsToList);
    problems = map (r: { inherit (r) name; inherit (r.value.problem) kind detail; })
      (builtins.filter (r: r.value ? problem) resolvedRequired);
    inherit declaredImage;
    # meta.mainProgram of an image of one package (the service checks it names a program there).
    mainProgram =
      if declaredImage != null || builtins.length names != 1 then null
      else let v = (walk (builtins.head names)).value; p = try (v.meta.mainProgram or null) null;
        in if try (builtins.isString p) false then p else null;
    packages = builtins.listToAttrs (map (r: { inherit (r) name; value = r.value.ok.out; }) found);
    derivations = builtins.listToAttrs (map (r: { inherit (r) name; value = r.value.ok.realise; }) found);
  };
  contents = map (r: (walk r.name).value) found;
  declared =
    if declarations == null then { images = { }; }
    else if !declarationsOk then { error = "nixery-images.nix does not evaluate to an attribute set"; }
    else { images = builtins.mapAttrs (_: d: toData 2 (let r = builtins.tryEval d; in
      if r.success && builtins.isAttrs r.value
      then { packages = r.value.packages or [ ]; description = r.value.description or ""; }
      else r.value)) declarations; };
  # No tryEval: evaluating this fails with the set's own error for the first name that has one.
  explain = map (n: let v = (walk n).value; in
    if builtins.isAttrs v && (v.type or null) == "derivation" then builtins.seq v.drvPath v.outPath else builtins.seq v null) names;
}

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
#
# Attributes:
#   resolve   data for the service: { unsupported = null or why; unknown = [ names ];
#             packages = { name = outPath; }; derivations = { name = "<drv>!<output>"; }; },
#             evaluated with --read-write-mode so that the service builds the derivations
#             without evaluating the set again
#   contents  the resolved derivations, in the order of `packages` then `optional`
{ packages ? "[]", optional ? "[]", srcType ? "path", srcArgs ? "", system ? builtins.currentSystem }:
let
  names = builtins.fromJSON packages;
  optionalNames = builtins.fromJSON optional;

  src =
    if srcType == "path" then /. + srcArgs
    else if srcType == "tarball" then builtins.fetchTarball { url = srcArgs; }
    else throw "nixery: unknown srcType ${srcType}";

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
  pkgs =
    if systemError != null then throw "nixery: ${systemError}"
    else if takesSystem then imported { inherit system; }
    else if builtins.isFunction imported then imported { }
    else imported;

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upper lower;
  startsWithDigit = s: builtins.match "[0-9].*" s != null;

  # Lower-cased attribute name -> the set's names with that spelling. Built once per set and
  # evaluation (the package set's own index is shared by every name), not one scan per lookup.
  indexOf = set: builtins.groupBy toLower (builtins.attrNames set);

  # The attribute of `set` that `part` names: verbatim, then with nixpkgs'
  # leading underscore for names starting with a digit, then ignoring case
  # (registry names are lower case, nixpkgs' are not). null if none.
  lookup = set: index: part:
    let
      candidates = [ part ] ++ (if startsWithDigit part then [ ("_" + part) ] else [ ]);
      exact = builtins.filter (c: builtins.hasAttr c set) candidates;
      loose = builtins.sort builtins.lessThan
        (builtins.concatLists (map (c: index.${toLower c} or [ ]) candidates));
    in
      if exact != [ ] then set.${builtins.head exact}
      else if loose != [ ] then set.${builtins.head loose}
      else null;

  isSet = v: (builtins.tryEval (builtins.isAttrs v)).value or false;

  # Walks a dotted name through nested sets; null when any step is missing.
  find = name:
    let
      step = acc: part:
        if acc != null && isSet acc.set then
          let value = lookup acc.set acc.index part;
          in if value == null then null else { set = value; index = indexOf value; }
        else null;
      found = builtins.foldl' step { set = pkgs; index = pkgsIndex; }
        (builtins.filter builtins.isString (builtins.split "\\." name));
    in
      if found == null then null else found.set;
  pkgsIndex = indexOf pkgs;

  # A name resolves when it reaches a derivation whose paths evaluate (a package
  # that throws, e.g. marked broken, counts as unknown): its output path, and
  # what `nix-store --realise` builds without evaluating again ("<drv>!<output>").
  resolveOne = name:
    let
      value = find name;
      paths = builtins.tryEval (
        if value != null && (value.type or null) == "derivation"
        then builtins.deepSeq value.drvPath {
          out = value.outPath;
          realise = "${value.drvPath}!${value.outputName or "out"}";
        }
        else null);
    in
      if paths.success then paths.value else null;

  resolvedRequired = map (n: { name = n; value = resolveOne n; }) names;
  resolvedOptional = map (n: { name = n; value = resolveOne n; }) optionalNames;
  found = builtins.filter (r: r.value != null) (resolvedRequired ++ resolvedOptional);
in
{
  # `unsupported` is null, or why the set cannot build for `system` (then nothing resolves).
  resolve = if systemError != null then { unsupported = systemError; unknown = [ ]; packages = { }; } else {
    unsupported = null;
    unknown = map (r: r.name) (builtins.filter (r: r.value == null) resolvedRequired);
    packages = builtins.listToAttrs (map (r: { inherit (r) name; value = r.value.out; }) found);
    derivations = builtins.listToAttrs (map (r: { inherit (r) name; value = r.value.realise; }) found);
  };
  contents = map (r: find r.name) found;
}

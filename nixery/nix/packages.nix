# Lists the derivations of a package set for `nixery popularity`:
#   { "<attribute path>" = { out = outPath; realise = "<drv>!<output>"; }; }
# Top-level derivations, and those one level down in sets marked
# `recurseForDerivations` (nixpkgs' python3Packages and the like); a package
# that fails to evaluate (broken, unfree, unsupported) is left out.
#
#   srcType, srcArgs, system   as for helper.nix
#   attrs                      JSON list of dotted attribute paths, or "null" for all of them
{ srcType ? "path", srcArgs ? "", system ? builtins.currentSystem, attrs ? "null" }:
let
  src =
    if srcType == "path" then /. + srcArgs
    else if srcType == "tarball" then builtins.fetchTarball { url = srcArgs; }
    else throw "nixery: unknown srcType ${srcType}";
  imported = import src;
  pkgs = if builtins.isFunction imported then imported { inherit system; } else imported;

  try = v: default: let r = builtins.tryEval v; in if r.success then r.value else default;
  isDrv = v: try (builtins.isAttrs v && (v.type or null) == "derivation") false;
  recurses = v: try (builtins.isAttrs v && (v.recurseForDerivations or false) == true) false;
  paths = v: try (builtins.deepSeq v.drvPath { out = v.outPath; realise = "${v.drvPath}!${v.outputName or "out"}"; }) null;

  wanted = builtins.fromJSON attrs;
  at = name: builtins.foldl' (set: part: if set != null && builtins.isAttrs set then set.${part} or null else null)
    pkgs (builtins.filter builtins.isString (builtins.split "\\." name));
  candidates =
    if wanted != null then map (name: { inherit name; value = at name; }) wanted
    else builtins.concatLists (map (name:
      let value = try pkgs.${name} null; in
      if isDrv value then [ { inherit name value; } ]
      else if recurses value then
        map (inner: { name = "${name}.${inner}"; value = try value.${inner} null; }) (builtins.attrNames value)
      else [ ]) (builtins.attrNames pkgs));
  listed = map (c: { inherit (c) name; value = if isDrv c.value then paths c.value else null; }) candidates;
in
builtins.listToAttrs (builtins.filter (p: p.value != null) listed)

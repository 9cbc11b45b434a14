# The flake's outputs, with nixpkgs' real lib and the fake packages standing in
# for the nixpkgs input. lib.fileset alone is replaced by a recorder: it needs
# builtins.readFileType (Nix 2.14), and Debian's Nix is 2.8.
{ libPath, root, busyboxDir ? "" }:
let
  realLib = import (/. + libPath);
  lib = realLib // {
    fileset = {
      toSource = { root, fileset }: { root = toString root; files = fileset; };
      unions = map (file: if builtins.isPath file then toString file else file);
      maybeMissing = path: "maybe:${toString path}";
    };
  };
  pkgs = import ./fake-pkgs.nix { inherit lib busyboxDir; };
  flake = import (/. + root + "/flake.nix");
  outputs = flake.outputs {
    self = outputs // { outPath = root; };
    nixpkgs = {
      inherit lib;
      legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (_: pkgs);
    };
  };
in
{ inherit flake outputs lib pkgs; }

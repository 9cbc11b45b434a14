# The smallest derivation that proves this machine can build: Nix's built-in
# `buildenv` builder needs no program from the store, yet runs as a build user in
# the sandbox like any other build. Its output path is fixed, so once built the
# check is a lookup (`nix-build` returns at once for a valid path).
derivation {
  name = "nixery-preflight";
  system = builtins.currentSystem;
  builder = "builtin:buildenv";
  derivations = [ ];
  manifest = "none";
}

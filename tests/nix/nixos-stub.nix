# The NixOS options that module.nix writes into (or reads), declared about as
# loosely as NixOS declares them, so that nixpkgs' real lib.evalModules can
# evaluate the module without the rest of NixOS.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  loose = mkOption { type = types.attrsOf types.anything; default = { }; };
in
{
  options = {
    assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    users.users = loose;
    users.groups = loose;
    networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
    systemd.services = loose;
    systemd.tmpfiles.settings = loose;
    nix.settings = mkOption {
      type = types.submodule {
        freeformType = types.attrsOf types.anything;
        # Declared by NixOS with a default that a module must not replace.
        options.trusted-public-keys = mkOption {
          type = types.listOf types.str;
          default = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
        };
      };
      default = { };
    };
    nix.gc.automatic = mkOption { type = types.bool; default = false; };
    services.nginx = loose;
    programs.ssh.knownHosts = mkOption {
      type = types.attrsOf (types.submodule ({ name, ... }: {
        options = {
          hostNames = mkOption { type = types.listOf types.str; default = [ name ]; };
          publicKey = mkOption { type = types.nullOr types.str; default = null; };
          publicKeyFile = mkOption { type = types.nullOr types.path; default = null; };
        };
      }));
      default = { };
    };
  };
}

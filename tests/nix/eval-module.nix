# module.nix evaluated with nixpkgs' real lib.evalModules, the NixOS stub and the
# fake packages; `settings` (JSON) is the user's services.nixery, `system` (JSON)
# other NixOS settings. Returns what the tests read, as JSON-able data.
{ libPath, module, settings ? "{}", system ? "{}", candidates ? "[]" }:
let
  lib = import (/. + libPath);
  pkgs = import ./fake-pkgs.nix { inherit lib; };
  evaluated = lib.evalModules {
    modules = [
      (/. + module)
      ./nixos-stub.nix
      { _module.args.pkgs = pkgs; }
      { services.nixery = builtins.fromJSON settings; }
      (builtins.fromJSON system)
    ];
  };
  inherit (evaluated) config options;

  # Every option below services.nixery, with what a test compares against Nixery's config.
  flatten = prefix: set: lib.concatMap (name:
    let
      value = set.${name};
      path = if prefix == "" then name else "${prefix}.${name}";
    in
    if lib.isOption value then [ (describe path value) ]
    else if builtins.isAttrs value then flatten path value
    else [ ]) (builtins.attrNames set);
  plain = v: builtins.isString v || builtins.isInt v || builtins.isBool v || v == null || builtins.isList v;
  describe = path: option:
    let default = builtins.tryEval (option.default or null); in
    {
      name = path;
      type = option.type.name;
      description = option.description or "";
      hasDefault = option ? default;
      # Which of the candidate values the option's type accepts.
      accepts = builtins.filter option.type.check (builtins.fromJSON candidates);
    } // lib.optionalAttrs (option ? default && default.success && plain default.value) { default = default.value; };

  service = config.systemd.services.nixery or null;
in
{
  options = flatten "" options.services.nixery;
  config = if service == null then null else {
    failed = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
    inherit (service) description environment serviceConfig after requires wants wantedBy;
    users = { inherit (config.users) users groups; };
    firewall = config.networking.firewall.allowedTCPPorts;
    tmpfiles = config.systemd.tmpfiles.settings;
    nixSettings = config.nix.settings;
    nixGc = config.nix.gc;
    daemon = config.systemd.services.nix-daemon or null;
    nginx = config.services.nginx;
    gcService = let gc = config.systemd.services.nixery-gc; in {
      inherit (gc) description environment serviceConfig after requires;
    };
  };
}

# NixOS module for Nixery: `services.nixery`.
#
# Every setting reaches the service as one of the environment variables that
# nixery/config.py lists in VARIABLES (and the README's configuration table);
# `envFor` below is the one place that says which option sets which variable.
{
  config,
  lib,
  pkgs,
  options,
  ...
}:

let
  cfg = config.services.nixery;
  opt = options.services.nixery;

  inherit (lib)
    concatStringsSep
    filterAttrs
    hasPrefix
    literalExpression
    mapAttrs'
    mkEnableOption
    mkIf
    mkOption
    nameValuePair
    optional
    optionalAttrs
    types
    ;

  stateDir = "/var/lib/nixery";
  cacheDir = "/var/cache/nixery";

  # Option (a dotted path below services.nixery) -> the variable it sets.
  # tests/test_nix_packaging.py checks every name against VARIABLES.
  envFor = {
    port = "PORT";
    listenAddress = "NIXERY_LISTEN_ADDRESS";
    channel = "NIXERY_CHANNEL";
    allowedChannels = "NIXERY_CHANNEL_ALLOW";
    pkgsRepo = "NIXERY_PKGS_REPO";
    pkgsPath = "NIXERY_PKGS_PATH";
    sshKeyFile = "NIXERY_SSH_KEY";
    "storage.backend" = "NIXERY_STORAGE_BACKEND";
    "storage.path" = "STORAGE_PATH";
    bucket = "GCS_BUCKET";
    "signing.keyFile" = "GCS_SIGNING_KEY";
    "signing.account" = "GCS_SIGNING_ACCOUNT";
    nixTimeout = "NIX_TIMEOUT";
    popularityUrl = "NIX_POPULARITY_URL";
    layerBudget = "NIXERY_LAYER_BUDGET";
    workers = "NIXERY_WORKERS";
    threads = "NIXERY_THREADS";
    logLevel = "NIXERY_LOG_LEVEL";
  };

  # An option whose description ends by naming its variable, so that the
  # generated manual (and the tests) can see the mapping.
  mkEnvOption =
    name: args:
    mkOption (
      args
      // {
        description = ''
          ${args.description}

          Sets the environment variable `${envFor.${name}}`.
        '';
      }
    );

  # Secrets are handed over with systemd's LoadCredential: systemd copies the
  # file into a private directory readable by the service alone, and the
  # variable names that copy (`%d` is $CREDENTIALS_DIRECTORY). The original
  # path is never copied into the Nix store.
  credentials = filterAttrs (_: path: path != null) {
    ssh-key = cfg.sshKeyFile;
    gcs-signing-key = cfg.signing.keyFile;
  };

  # What a variable is set to when it is not simply the option's value.
  # null leaves the variable unset (Nixery then uses its own default).
  renderedValues = {
    # The channel is the default source; it is dropped when another is chosen.
    channel = if cfg.pkgsRepo == null && cfg.pkgsPath == null then cfg.channel else null;
    sshKeyFile = if cfg.sshKeyFile == null then null else "%d/ssh-key";
    "signing.keyFile" = if cfg.signing.keyFile == null then null else "%d/gcs-signing-key";
    "storage.path" = if cfg.storage.backend == "filesystem" then cfg.storage.path else null;
  };

  toEnvValue =
    value:
    if value == null then
      null
    else if builtins.isList value then
      concatStringsSep "," value
    else if builtins.isPath value then
      # A path literal (pkgsPath = ./my-packages) is copied into the store.
      "${value}"
    else
      toString value;

  optionValue = name: lib.attrByPath (lib.splitString "." name) null cfg;

  serviceEnvironment =
    filterAttrs (_: value: value != null) (
      mapAttrs' (
        name: variable: nameValuePair variable (toEnvValue (renderedValues.${name} or (optionValue name)))
      ) envFor
    )
    // {
      NIXERY_STATE_DIR = stateDir;
      # Build through the system's nix-daemon, as an unprivileged user.
      NIX_REMOTE = "daemon";
      # Nix's own cache (fetched channel tarballs, evaluation cache).
      XDG_CACHE_HOME = cacheDir;
    }
    // cfg.extraEnvironment;

  storageOutsideState =
    cfg.storage.backend == "filesystem" && !hasPrefix "${stateDir}/" "${cfg.storage.path}/";

  isAbsolute = path: path == null || hasPrefix "/" path;
  inStore = path: path != null && hasPrefix "${builtins.storeDir}/" path;
in
{
  options.services.nixery = {
    enable = mkEnableOption "Nixery, a container registry that builds images on demand with Nix";

    package = mkOption {
      type = types.package;
      default = pkgs.nixery or (pkgs.callPackage ./default.nix { });
      defaultText = literalExpression "pkgs.nixery or (pkgs.callPackage ./default.nix { })";
      description = ''
        The Nixery package to run. Defaults to `pkgs.nixery` where an overlay
        (such as this flake's `overlays.default`) provides it, and to the
        package built from this repository's {file}`default.nix` otherwise.
      '';
    };

    port = mkEnvOption "port" {
      type = types.port;
      default = 8080;
      description = "TCP port the registry listens on.";
    };

    listenAddress = mkEnvOption "listenAddress" {
      type = types.str;
      default = "0.0.0.0";
      example = "127.0.0.1";
      description = ''
        Address to bind to: an IPv4 or IPv6 address (`::` for all IPv6
        addresses). Use `127.0.0.1` behind a reverse proxy.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Whether to open {option}`services.nixery.port` in the firewall.";
    };

    channel = mkEnvOption "channel" {
      type = types.str;
      default = "nixos-unstable";
      example = "nixos-24.11";
      description = ''
        The nixpkgs channel name or 40-hex commit that images are built from
        when neither {option}`services.nixery.pkgsRepo` nor
        {option}`services.nixery.pkgsPath` is set. Nixery downloads that
        revision of nixpkgs as a tarball.
      '';
    };

    allowedChannels = mkEnvOption "allowedChannels" {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "nixos-24.11"
        "nixos-unstable"
      ];
      description = ''
        Channels that an image tag may name instead of the default one
        (`HOST/shell/git:nixos-24.11`). Empty: a tag may only be `latest`
        or a nixpkgs commit.
      '';
    };

    pkgsRepo = mkEnvOption "pkgsRepo" {
      type = types.nullOr types.str;
      default = null;
      example = "https://github.com/NixOS/nixpkgs";
      description = ''
        A git repository (https, ssh, `file://` URL or absolute path) holding
        the package set to build from; an image tag picks a branch, tag or
        commit. Mutually exclusive with {option}`services.nixery.pkgsPath`
        and with setting {option}`services.nixery.channel`.

        Credentials do not belong in this URL, which ends up in the Nix store:
        use {option}`services.nixery.sshKeyFile`, or `NIXERY_GIT_TOKEN` in
        {option}`services.nixery.environmentFile`.
      '';
    };

    pkgsPath = mkEnvOption "pkgsPath" {
      type = types.nullOr types.path;
      default = null;
      example = literalExpression "./my-packages";
      description = ''
        A local directory holding the package set to build from (a
        {file}`default.nix` evaluating to an attribute set, or to a function
        taking `{ system }` like nixpkgs). A path literal is copied into the
        Nix store; a string is used where it is. Mutually exclusive with
        {option}`services.nixery.pkgsRepo` and with setting
        {option}`services.nixery.channel`.
      '';
    };

    sshKeyFile = mkEnvOption "sshKeyFile" {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/nixery-ssh-key";
      description = ''
        Private key used for ssh URLs in {option}`services.nixery.pkgsRepo`.
        A path as a string, outside the Nix store: the file is handed to the
        service with systemd's `LoadCredential` and is never copied into the
        store.
      '';
    };

    storage = {
      backend = mkEnvOption "storage.backend" {
        type = types.enum [
          "filesystem"
          "gcs"
        ];
        default = "filesystem";
        description = ''
          Where image layers and manifests are kept: `filesystem` (in
          {option}`services.nixery.storage.path`, served by Nixery itself) or
          `gcs` (a Google Cloud Storage bucket, see
          {option}`services.nixery.bucket`; clients are redirected to it).
        '';
      };

      path = mkEnvOption "storage.path" {
        type = types.str;
        default = "${stateDir}/storage";
        description = ''
          Directory of the `filesystem` storage backend. A directory outside
          {file}`${stateDir}` is created and made writable for the service.
        '';
      };
    };

    bucket = mkEnvOption "bucket" {
      type = types.nullOr types.str;
      default = null;
      example = "my-nixery-layers";
      description = ''
        Google Cloud Storage bucket of the `gcs` storage backend. Google's
        application default credentials are used to reach it (on Google
        Cloud, the machine's service account; elsewhere set
        `GOOGLE_APPLICATION_CREDENTIALS` in
        {option}`services.nixery.extraEnvironment`).
      '';
    };

    signing = {
      keyFile = mkEnvOption "signing.keyFile" {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/nixery-gcs-key.pem";
        description = ''
          PEM private key of a service account, used to sign the bucket URLs
          that clients are redirected to (needed when the bucket is not
          public). A path as a string, outside the Nix store: the file is
          handed to the service with systemd's `LoadCredential` and is never
          copied into the store. Set together with
          {option}`services.nixery.signing.account`.
        '';
      };

      account = mkEnvOption "signing.account" {
        type = types.nullOr types.str;
        default = null;
        example = "nixery@my-project.iam.gserviceaccount.com";
        description = ''
          E-mail address of the service account that owns
          {option}`services.nixery.signing.keyFile`.
        '';
      };
    };

    nixTimeout = mkEnvOption "nixTimeout" {
      type = types.ints.between 1 86400;
      default = 60;
      description = "Seconds a Nix evaluation or build for one image may take.";
    };

    popularityUrl = mkEnvOption "popularityUrl" {
      type = types.nullOr types.str;
      default = null;
      example = "https://example.org/popularity.json";
      description = ''
        URL or file of popularity data (a JSON object of store path name to
        count) that decides which store paths get layers of their own.
        Without it, every path is as popular as any other.
      '';
    };

    layerBudget = mkEnvOption "layerBudget" {
      type = types.ints.between 1 120;
      default = 94;
      description = ''
        The most store-path layers an image gets (the root layer comes on
        top). Less popular paths are merged into shared layers.
      '';
    };

    workers = mkEnvOption "workers" {
      type = types.ints.between 1 64;
      default = 2;
      description = "Gunicorn worker processes.";
    };

    threads = mkEnvOption "threads" {
      type = types.ints.between 1 256;
      default = 8;
      description = "Threads per worker: how many builds and downloads run at once in each.";
    };

    logLevel = mkEnvOption "logLevel" {
      type = types.enum [
        "DEBUG"
        "INFO"
        "WARNING"
        "ERROR"
      ];
      default = "INFO";
      description = "Log level of the service.";
    };

    environmentFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/nixery.env";
      description = ''
        A file of `NAME=value` lines read by systemd when the service starts
        (`EnvironmentFile`), for secrets such as `NIXERY_GIT_TOKEN`. A path as
        a string, so that the file stays out of the Nix store.
      '';
    };

    extraEnvironment = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        NIXERY_GIT_TTL = "300";
        NIXERY_CHANNEL_URL_TEMPLATE = "https://mirror.example.org/nixpkgs/{rev}.tar.gz";
      };
      description = ''
        Further environment variables of the service; they take precedence
        over those set from the options above. Nixery's variables are listed
        in the configuration section of its README and by `nixery --help`.
        Do not put secrets here: they would end up in the Nix store.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.pkgsRepo == null || cfg.pkgsPath == null;
        message = "services.nixery: set only one of pkgsRepo and pkgsPath.";
      }
      {
        assertion =
          (cfg.pkgsRepo == null && cfg.pkgsPath == null)
          || opt.channel.highestPrio >= (lib.mkOptionDefault null).priority;
        message = "services.nixery: channel is a package source of its own; do not set it together with pkgsRepo or pkgsPath.";
      }
      {
        assertion = cfg.storage.backend == "gcs" -> cfg.bucket != null;
        message = ''services.nixery: storage.backend = "gcs" needs services.nixery.bucket.'';
      }
      {
        assertion = cfg.bucket != null -> cfg.storage.backend == "gcs";
        message = ''services.nixery: bucket is only used with storage.backend = "gcs".'';
      }
      {
        assertion = (cfg.signing.keyFile == null) == (cfg.signing.account == null);
        message = "services.nixery: set signing.keyFile and signing.account together.";
      }
      {
        assertion = cfg.signing.keyFile != null -> cfg.bucket != null;
        message = "services.nixery: signing.keyFile and signing.account only apply to a bucket.";
      }
      {
        assertion = isAbsolute cfg.storage.path;
        message = "services.nixery: storage.path must be an absolute path.";
      }
      {
        assertion =
          lib.all (path: isAbsolute path && !inStore path) [
            cfg.sshKeyFile
            cfg.signing.keyFile
            cfg.environmentFile
          ];
        message = "services.nixery: sshKeyFile, signing.keyFile and environmentFile must be absolute paths outside the Nix store (which anyone can read).";
      }
    ];

    users.users.nixery = {
      isSystemUser = true;
      group = "nixery";
      home = stateDir;
      description = "Nixery container registry";
    };
    users.groups.nixery = { };

    networking.firewall.allowedTCPPorts = optional cfg.openFirewall cfg.port;

    systemd.tmpfiles.settings = optionalAttrs storageOutsideState {
      "10-nixery".${cfg.storage.path}.d = {
        user = "nixery";
        group = "nixery";
        mode = "0750";
      };
    };

    systemd.services.nixery = {
      description = "Nixery container registry";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      requires = [ "nix-daemon.socket" ];
      after = [
        "network-online.target"
        "nix-daemon.socket"
      ];

      environment = serviceEnvironment;

      serviceConfig = {
        ExecStart = lib.getExe cfg.package;
        User = "nixery";
        Group = "nixery";
        Restart = "on-failure";
        RestartSec = 5;
        # Gunicorn finishes the requests in flight on SIGTERM.
        TimeoutStopSec = 60;

        StateDirectory = "nixery";
        StateDirectoryMode = "0750";
        CacheDirectory = "nixery";
        CacheDirectoryMode = "0750";
        WorkingDirectory = stateDir;
        ReadWritePaths = optional storageOutsideState cfg.storage.path;

        LoadCredential = lib.mapAttrsToList (id: path: "${id}:${path}") credentials;
        EnvironmentFile = optional (cfg.environmentFile != null) cfg.environmentFile;

        # Hardening. Builds happen in the nix-daemon, reached over its socket;
        # the service itself needs no privileges. MemoryDenyWriteExecute is
        # left off: libffi callbacks (pygit2's remote callbacks) need W+X pages.
        CapabilityBoundingSet = if cfg.port < 1024 then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
        AmbientCapabilities = optional (cfg.port < 1024) "CAP_NET_BIND_SERVICE";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        RemoveIPC = true;
        SystemCallArchitectures = "native";
        # Nix raises its stack limit (setrlimit, in @resources), which
        # @system-service allows.
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
        ];
        SystemCallErrorNumber = "EPERM";
        UMask = "0027";
      };
    };
  };
}

# NixOS module for Nixery: `services.nixery`.
#
# Every setting reaches the service as one of the environment variables that
# nixery/config.py lists in VARIABLES (and docs/configuration.md's table);
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
    channelCommits = "NIXERY_CHANNEL_COMMITS";
    allowedUris = "NIXERY_ALLOWED_URIS";
    pkgsRepo = "NIXERY_PKGS_REPO";
    pkgsPath = "NIXERY_PKGS_PATH";
    sshKeyFile = "NIXERY_SSH_KEY";
    "storage.backend" = "NIXERY_STORAGE_BACKEND";
    "storage.path" = "STORAGE_PATH";
    "storage.limit" = "NIXERY_STORAGE_LIMIT";
    "storage.maxAge" = "NIXERY_STORAGE_MAX_AGE";
    "storage.gcInterval" = "NIXERY_GC_INTERVAL";
    bucket = "GCS_BUCKET";
    "signing.keyFile" = "GCS_SIGNING_KEY";
    "signing.account" = "GCS_SIGNING_ACCOUNT";
    nixTimeout = "NIX_TIMEOUT";
    maxBuilds = "NIXERY_MAX_BUILDS";
    clientBuilds = "NIXERY_CLIENT_BUILDS";
    failureTtl = "NIXERY_FAILURE_TTL";
    maxImageSize = "NIXERY_MAX_IMAGE_SIZE";
    maxPackages = "NIXERY_MAX_PACKAGES";
    evalMemory = "NIXERY_EVAL_MEMORY";
    evalTimeout = "NIXERY_EVAL_TIMEOUT";
    "binaryCache.url" = "NIXERY_BINARY_CACHE";
    "binaryCache.publicKey" = "NIXERY_BINARY_CACHE_PUBLIC_KEY";
    "binaryCache.secretKeyFile" = "NIXERY_BINARY_CACHE_SECRET_KEY";
    auth = "NIXERY_AUTH";
    htpasswdFile = "NIXERY_HTPASSWD";
    "tokenAuth.realm" = "NIXERY_TOKEN_REALM";
    "tokenAuth.service" = "NIXERY_TOKEN_SERVICE";
    "tokenAuth.issuer" = "NIXERY_TOKEN_ISSUER";
    "tokenAuth.publicKeyFile" = "NIXERY_TOKEN_PUBLIC_KEY";
    popularityUrl = "NIX_POPULARITY_URL";
    layerBudget = "NIXERY_LAYER_BUDGET";
    platforms = "NIXERY_PLATFORMS";
    workers = "NIXERY_WORKERS";
    threads = "NIXERY_THREADS";
    headerTimeout = "NIXERY_HEADER_TIMEOUT";
    ioTimeout = "NIXERY_IO_TIMEOUT";
    clientConnections = "NIXERY_CLIENT_CONNECTIONS";
    trustedProxies = "NIXERY_TRUSTED_PROXIES";
    gracePeriod = "NIXERY_GRACE_PERIOD";
    logLevel = "NIXERY_LOG_LEVEL";
    accessLog = "NIXERY_ACCESS_LOG";
    hideDetails = "NIXERY_HIDE_DETAILS";
    allowUnfree = "NIXERY_ALLOW_UNFREE";
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
    gcs-credentials = cfg.gcs.credentialsFile;
    binary-cache-key = cfg.binaryCache.secretKeyFile;
    htpasswd = cfg.htpasswdFile;
    token-public-key = cfg.tokenAuth.publicKeyFile;
  };
  credentialPath = id: path: if path == null then null else "%d/${id}";

  # What a variable is set to when it is not simply the option's value.
  # null leaves the variable unset (Nixery then uses its own default).
  renderedValues = {
    # The channel is the default source; it is dropped when another is chosen.
    channel = if cfg.pkgsRepo == null && cfg.pkgsPath == null then cfg.channel else null;
    sshKeyFile = credentialPath "ssh-key" cfg.sshKeyFile;
    "signing.keyFile" = credentialPath "gcs-signing-key" cfg.signing.keyFile;
    "binaryCache.secretKeyFile" = credentialPath "binary-cache-key" cfg.binaryCache.secretKeyFile;
    htpasswdFile = credentialPath "htpasswd" cfg.htpasswdFile;
    "tokenAuth.publicKeyFile" = credentialPath "token-public-key" cfg.tokenAuth.publicKeyFile;
    "storage.path" = if cfg.storage.backend == "filesystem" then cfg.storage.path else null;
  };

  toEnvValue =
    value:
    if value == null then
      null
    else if builtins.isBool value then
      (if value then "true" else "false")
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
    # Read by google-auth, not by Nixery.
    // optionalAttrs (cfg.gcs.credentialsFile != null) {
      GOOGLE_APPLICATION_CREDENTIALS = credentialPath "gcs-credentials" cfg.gcs.credentialsFile;
    }
    // cfg.extraEnvironment;

  # ProtectHome hides /home, /root and /run/user; a package source there is
  # bound back in, read-only, instead of failing at the first pull.
  underHome = path: lib.any (dir: hasPrefix dir path) [ "/home/" "/root/" "/run/user/" ];
  localPath = value:
    if value == null || builtins.isPath value then null
    else if hasPrefix "file://" value then lib.removePrefix "file://" value
    else if hasPrefix "/" value then value
    else null;
  homeSources = lib.filter (path: path != null && underHome path) [
    (localPath cfg.pkgsPath)
    (localPath cfg.pkgsRepo)
  ];

  # The directory of a file:// binary cache, which the service writes.
  binaryCacheDir =
    let url = cfg.binaryCache.url; in
    if url != null && hasPrefix "file://" url then lib.head (lib.splitString "?" (lib.removePrefix "file://" url)) else null;

  # known_hosts lines from programs.ssh.knownHosts (those with a key written out).
  systemKnownHosts = lib.concatMap (
    host:
    let
      key = if host.publicKey or null != null then host.publicKey
        else if host.publicKeyFile or null != null then lib.fileContents host.publicKeyFile
        else null;
    in
    optional (key != null) "${concatStringsSep "," host.hostNames} ${key}"
  ) (lib.attrValues config.programs.ssh.knownHosts);
  knownHostsFile = pkgs.writeText "nixery-known-hosts" (concatStringsSep "\n" cfg.knownHosts + "\n");

  # The address nginx reaches Nixery on.
  upstreamHost =
    if cfg.listenAddress == "0.0.0.0" then "127.0.0.1"
    else if cfg.listenAddress == "::" then "[::1]"
    else if lib.hasInfix ":" cfg.listenAddress then "[${cfg.listenAddress}]"
    else cfg.listenAddress;

  storageOutsideState =
    cfg.storage.backend == "filesystem" && !hasPrefix "${stateDir}/" "${cfg.storage.path}/";

  # A stopping Nixery lets requests in flight finish for the grace period and
  # then ends them itself; systemd waits that long plus the time Gunicorn's
  # master needs to reap its workers and exit, and only then kills.
  gracePeriod = if cfg.gracePeriod != null then cfg.gracePeriod else cfg.nixTimeout;
  stopMargin = 30;

  # nginx hears nothing from Nixery while a manifest request evaluates and
  # builds (proxy_read_timeout is the longest silence between two reads):
  # the evaluation, the build and the layers' upload, with a margin.
  evalTimeout = if cfg.evalTimeout != null then cfg.evalTimeout else cfg.nixTimeout;
  proxyReadTimeout = evalTimeout + cfg.nixTimeout + 60;

  binaryCacheIsS3 = cfg.binaryCache.url != null && hasPrefix "s3://" cfg.binaryCache.url;

  isAbsolute = path: path == null || hasPrefix "/" path;
  inStore = path: path != null && hasPrefix "${builtins.storeDir}/" path;
  # What the service and its by-hand collection (nixery-gc) share: state, credentials and the
  # hardening.
  sandbox = {
    StateDirectory = "nixery";
    StateDirectoryMode = "0750";
    CacheDirectory = "nixery";
    CacheDirectoryMode = "0750";
    WorkingDirectory = stateDir;
    ReadWritePaths = optional storageOutsideState cfg.storage.path ++ optional (binaryCacheDir != null) binaryCacheDir;
    BindReadOnlyPaths = homeSources;

    LoadCredential = lib.mapAttrsToList (id: path: "${id}:${path}") credentials;
    EnvironmentFile =
      optional (cfg.binaryCache.credentialsFile != null) cfg.binaryCache.credentialsFile
      ++ optional (cfg.environmentFile != null) cfg.environmentFile;

    # Hardening. Builds happen in the nix-daemon, reached over its socket;
    # the service itself needs no privileges. MemoryDenyWriteExecute is
    # left off: libffi callbacks (pygit2's remote callbacks) need W+X pages.
    CapabilityBoundingSet = if cfg.port < 1024 then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
    AmbientCapabilities = optional (cfg.port < 1024) "CAP_NET_BIND_SERVICE";
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    # tmpfs rather than true when a source under /home is bound back in.
    ProtectHome = if homeSources == [ ] then true else "tmpfs";
    # The nix-daemon's socket works from a user namespace (the daemon checks
    # the peer's uid, which maps to the real one), but a port below 1024
    # needs a capability in the host's namespace.
    PrivateUsers = cfg.port >= 1024;
    # Neither Python nor the Nix client reads /proc beyond the process' own.
    ProcSubset = "pid";
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
  };
in
{
  options.services.nixery = {
    enable = mkEnableOption "Nixery, a container registry that builds images on demand with Nix";

    package = mkOption {
      type = types.package;
      # Always this repository's package: nixpkgs' own `pkgs.nixery` is the
      # original Go Nixery, which reads other settings, so it is never picked
      # by default (nor is any overlay's attribute of that name).
      default = pkgs.callPackage ./default.nix { };
      defaultText = literalExpression "pkgs.callPackage ./default.nix { } # this repository's default.nix";
      description = ''
        The Nixery package to run: by default the one built from this
        repository's {file}`default.nix` with the system's nixpkgs. The flake
        user may set it to `nixery.packages.''${system}.default` instead.
      '';
    };

    port = mkEnvOption "port" {
      # types.port less 0, which Nixery refuses.
      type = types.ints.between 1 65535;
      default = 8080;
      description = "TCP port the registry listens on.";
    };

    listenAddress = mkEnvOption "listenAddress" {
      type = types.str;
      default = if cfg.nginx.enable then "127.0.0.1" else "0.0.0.0";
      defaultText = literalExpression ''if config.services.nixery.nginx.enable then "127.0.0.1" else "0.0.0.0"'';
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

    channelCommits = mkEnvOption "channelCommits" {
      type = types.either (types.enum [
        "any"
        "none"
      ]) (types.nonEmptyListOf (types.strMatching "[0-9a-f]{40}"));
      default = "any";
      example = "none";
      description = ''
        Which nixpkgs commits a 40-hex image tag may name: `"any"`, `"none"`
        (refused with 403 before Nix runs), or a list of commits. The archive
        URL serves the commits of every fork, so on a public instance `"any"`
        builds code of anyone's choosing (confined: it cannot read the
        server's files or environment).
      '';
    };

    allowedUris = mkEnvOption "allowedUris" {
      type = types.listOf (types.strMatching "[a-z][a-z0-9+.-]*://[^[:space:],]+");
      default = [ ];
      example = [ "https://github.com/NixOS/nixpkgs/archive/" ];
      description = ''
        URL prefixes that the package set's evaluation may fetch from (Nix's
        `allowed-uris`; evaluation is restricted to the set's own files). A
        channel's own tarball needs none; a set of your own that pins nixpkgs
        with `fetchTarball` names its URL's prefix here.
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

      limit = mkEnvOption "storage.limit" {
        type = types.strMatching "[0-9]+[KMGTkmgt]?";
        default = "0";
        example = "50G";
        description = ''
          Most bytes of layers and manifests storage keeps (K, M, G or T are
          powers of 1024; "0": no limit). The service collects storage every
          {option}`services.nixery.storage.gcInterval`, removing the least
          recently pulled images until storage is under this; a pull of a
          removed image builds it again.
        '';
      };

      maxAge = mkEnvOption "storage.maxAge" {
        type = types.strMatching "[0-9]+[smhd]?";
        default = "0";
        example = "30d";
        description = ''
          How long an image may go unpulled before a collection removes it
          (seconds, or with s, m, h or d; "0": for ever).
        '';
      };

      gcInterval = mkEnvOption "storage.gcInterval" {
        type = types.nullOr (types.strMatching "[0-9]+[smhd]?");
        default = null;
        example = "15m";
        description = ''
          Time between the service's collections of storage (one at a time
          across its workers and every instance sharing the storage). Default
          (null): 1h when {option}`services.nixery.storage.limit` or
          {option}`services.nixery.storage.maxAge` is set, else none.
          `systemctl start nixery-gc` runs one collection by hand, with the
          service's settings (`journalctl -u nixery-gc` shows what it removed).
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
        Cloud, the machine's service account; elsewhere a key file given as
        {option}`services.nixery.gcs.credentialsFile`).
      '';
    };

    signing = {
      keyFile = mkEnvOption "signing.keyFile" {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/nixery-gcs-key.pem";
        description = ''
          PEM private key of a service account, used to sign the bucket URLs
          that clients are redirected to. Optional: without it, the
          credentials of {option}`services.nixery.gcs.credentialsFile` (or the
          metadata server's) sign, through IAM's signBlob where they hold no
          key. A path as a string, outside the Nix store: the file is
          handed to the service with systemd's `LoadCredential` and is never
          copied into the store. Needs {option}`services.nixery.signing.account`.
        '';
      };

      account = mkEnvOption "signing.account" {
        type = types.nullOr types.str;
        default = null;
        example = "nixery@my-project.iam.gserviceaccount.com";
        description = ''
          E-mail address of the service account that owns
          {option}`services.nixery.signing.keyFile`, or that IAM signs the
          URLs as (default: the credentials' own account).
        '';
      };
    };

    gcs.credentialsFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/nixery-gcs.json";
      description = ''
        Google credentials file (a service account's JSON key) for the bucket,
        handed to the service with systemd's `LoadCredential` and named by
        `GOOGLE_APPLICATION_CREDENTIALS`; a service account's JSON key also
        signs blob URLs. A path as a string, outside the Nix store. Unset,
        Google's application default credentials apply (on Google Cloud, the
        machine's service account).
      '';
    };

    binaryCache = {
      url = mkEnvOption "binaryCache.url" {
        type = types.nullOr types.str;
        default = null;
        example = "s3://my-nixery-cache?endpoint=storage.googleapis.com";
        description = ''
          A Nix binary cache shared by several Nixery instances: what this one
          builds is copied there (when {option}`services.nixery.binaryCache.secretKeyFile`
          is set), and every build substitutes from it, so no instance builds
          what another already built. The nix-daemon is told to trust it
          (`trusted-substituters`, `trusted-public-keys`). A `file://` directory
          is created and made writable for the service. Nixery writes to the
          cache but the nix-daemon reads from it (substitution happens in the
          daemon): an `s3://` cache's keys therefore go in
          {option}`services.nixery.binaryCache.credentialsFile`, which both get,
          not in {option}`services.nixery.environmentFile`, which only Nixery reads.
        '';
      };

      credentialsFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/nixery-cache-s3.env";
        description = ''
          For an `s3://` {option}`services.nixery.binaryCache.url`: a file of
          `NAME=value` lines (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, or
          `AWS_PROFILE` and `AWS_SHARED_CREDENTIALS_FILE`) that systemd reads
          into the environment of both Nixery (which copies to the cache) and
          the nix-daemon (which substitutes from it). Unset, both use what the
          AWS SDK finds by itself (an instance role, say). A path as a string,
          outside the Nix store.
        '';
      };

      publicKey = mkEnvOption "binaryCache.publicKey" {
        type = types.nullOr types.str;
        default = null;
        example = "nixery-1:3XtOvTrMRmIahZk01+5ITpnqcLOqqPkUCyZhHBZ6Jjg=";
        description = "Public key that every path in the cache is signed with (paths are never accepted unsigned).";
      };

      secretKeyFile = mkEnvOption "binaryCache.secretKeyFile" {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/nixery-cache.secret";
        description = ''
          Nix secret key (`nix key generate-secret`) that signs what this
          instance copies to the cache; unset, the instance only reads it. A
          path as a string, handed over with `LoadCredential`.
        '';
      };
    };

    knownHosts = mkOption {
      type = types.listOf types.str;
      default = systemKnownHosts;
      defaultText = literalExpression "the entries of programs.ssh.knownHosts that have a key";
      example = [ "github.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl" ];
      description = ''
        `known_hosts` lines for ssh URLs in {option}`services.nixery.pkgsRepo`.
        Nixery (libgit2) checks a server's host key against
        {file}`~/.ssh/known_hosts` of the service user, so the lines are
        linked to {file}`${stateDir}/.ssh/known_hosts`. By default, the hosts
        of {option}`programs.ssh.knownHosts`. An unknown host key fails the fetch.
      '';
    };

    auth = mkEnvOption "auth" {
      type = types.nullOr (types.enum [ "off" "build" "all" ]);
      default = null;
      description = ''
        Which requests need credentials: `off`, `build` (pulls that would build
        an image) or `all`. Unset, Nixery's own default applies.
      '';
    };

    htpasswdFile = mkEnvOption "htpasswdFile" {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/nixery.htpasswd";
      description = ''
        An htpasswd file of the users allowed to pull (basic authentication).
        A path as a string, handed over with `LoadCredential`.
      '';
    };

    tokenAuth = {
      realm = mkEnvOption "tokenAuth.realm" {
        type = types.nullOr types.str;
        default = null;
        example = "https://auth.example.org/token";
        description = "Token authentication: the URL clients get their bearer tokens from.";
      };
      service = mkEnvOption "tokenAuth.service" {
        type = types.nullOr types.str;
        default = null;
        example = "nixery.example.org";
        description = "Token authentication: the service name tokens must be issued for.";
      };
      issuer = mkEnvOption "tokenAuth.issuer" {
        type = types.nullOr types.str;
        default = null;
        example = "auth.example.org";
        description = "Token authentication: the issuer tokens must name.";
      };
      publicKeyFile = mkEnvOption "tokenAuth.publicKeyFile" {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/nixery-token.pub";
        description = ''
          Token authentication: the public key (PEM) that verifies tokens, handed
          over with `LoadCredential`.
        '';
      };
    };

    nginx = {
      enable = mkEnableOption "an nginx virtual host in front of Nixery (TLS, buffering and timeouts for a public instance)";
      virtualHost = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "nixery.example.org";
        description = ''
          Name of the nginx virtual host that proxies to Nixery (needed with
          {option}`services.nixery.nginx.enable`). TLS and the like are set on
          `services.nginx.virtualHosts.<name>` as usual (for example
          `enableACME` and `forceSSL`). Its location `/` waits for an answer
          for the evaluation timeout plus {option}`services.nixery.nixTimeout`
          plus 60 s (a manifest request evaluates, builds and uploads before
          it sends anything). Downloads of substitutes have no total bound in
          Nix (only `stalled-download-timeout` stops one that stalls): a client
          whose pull outlasts it gets 504, while the build goes on and its
          next pull is served from storage.
        '';
      };
    };

    nixTimeout = mkEnvOption "nixTimeout" {
      type = types.ints.between 1 86400;
      default = 60;
      description = "Seconds a Nix build may run and may stay silent (downloads of substitutes are not counted).";
    };

    maxBuilds = mkEnvOption "maxBuilds" {
      type = types.nullOr (types.ints.between 1 256);
      default = null;
      description = "Builds running at once (null: the number of cores).";
    };

    clientBuilds = mkEnvOption "clientBuilds" {
      type = types.ints.between 1 256;
      default = 2;
      description = "New builds one client address may have running at once; more are answered 429.";
    };

    failureTtl = mkEnvOption "failureTtl" {
      type = types.ints.between 0 86400;
      default = 60;
      description = ''
        Seconds a failed build or an unknown name is answered from memory, and
        a failed derivation for any image that needs it (0: never).
      '';
    };

    maxImageSize = mkEnvOption "maxImageSize" {
      type = types.strMatching "[0-9]+[KMGTkmgt]?";
      default = "1G";
      example = "4G";
      description = ''
        Most bytes of packages an image may hold (its closure in the Nix
        store; K, M, G or T are powers of 1024; "0": no limit). A bigger image
        is refused with 403 before any layer is written.
      '';
    };

    maxPackages = mkEnvOption "maxPackages" {
      type = types.ints.between 0 128;
      default = 20;
      description = ''
        Most components in an image name (packages and meta-packages such as
        shell; 0: no limit). A longer name is refused before Nix runs.
      '';
    };

    evalMemory = mkEnvOption "evalMemory" {
      type = types.strMatching "[0-9]+[KMGTkmgt]?";
      default = "2G";
      description = ''
        Memory one evaluation of the package set may take (RLIMIT_DATA of the
        Nix process; K, M, G or T; at least 64M; "0": no limit). Past it the
        request is refused with 403 naming the limit.
      '';
    };

    evalTimeout = mkEnvOption "evalTimeout" {
      type = types.nullOr (types.ints.between 1 86400);
      default = null;
      description = ''
        Seconds one evaluation of the package set may take, fetching a
        channel's tarball included (null: nixTimeout).
      '';
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

    platforms = mkEnvOption "platforms" {
      type = types.nullOr (
        types.listOf (
          types.enum [
            "linux/amd64"
            "linux/arm64"
          ]
        )
      );
      default = null;
      example = [
        "linux/amd64"
        "linux/arm64"
      ];
      description = ''
        The platforms an image is offered for: a client that takes a manifest
        list or OCI index gets one entry per platform, each built when first
        asked for. Null: the platforms the Nix daemon builds for (its `system`
        and `extra-platforms`, e.g. with `boot.binfmt.emulatedSystems`).
      '';
    };

    workers = mkEnvOption "workers" {
      type = types.ints.between 1 64;
      default = 2;
      description = "Gunicorn worker processes.";
    };

    threads = mkEnvOption "threads" {
      type = types.ints.between 1 1024;
      default = 64;
      description = "Threads per worker: requests served, downloads and builds (requests waiting for another's build hold none).";
    };

    headerTimeout = mkEnvOption "headerTimeout" {
      type = types.ints.between 1 3600;
      default = 10;
      description = "Seconds a client may take to send a request's headers.";
    };

    ioTimeout = mkEnvOption "ioTimeout" {
      type = types.ints.between 1 86400;
      default = 30;
      description = "Seconds a client may stall reading a response before it is cut off.";
    };

    clientConnections = mkEnvOption "clientConnections" {
      type = types.ints.between 1 100000;
      default = 64;
      description = "Open connections one client address may have to each worker; more are answered 429.";
    };

    trustedProxies = mkEnvOption "trustedProxies" {
      type = types.listOf types.str;
      # nginx connects from loopback, and Nixery's location appends the client to
      # X-Forwarded-For (its own recommendedProxySettings).
      default = if cfg.nginx.enable then [ "127.0.0.1" "::1" ] else [ ];
      defaultText = literalExpression ''if config.services.nixery.nginx.enable then [ "127.0.0.1" "::1" ] else [ ]'';
      example = [ "10.0.0.0/8" ];
      description = ''
        Addresses or CIDR networks of the reverse proxies in front of Nixery.
        From them, the client's address is read from `X-Forwarded-For` (the
        rightmost address that is not a trusted proxy) or `Forwarded`, and
        every per-client limit (new builds, connections, login lockouts) and
        log uses it. With {option}`services.nixery.nginx.enable` (whose
        location appends the client to `X-Forwarded-For`), nginx's loopback
        addresses.
      '';
    };

    gracePeriod = mkEnvOption "gracePeriod" {
      type = types.nullOr (types.ints.between 0 604800);
      default = null;
      description = ''
        Seconds a stopping server lets builds and downloads finish (null:
        nixTimeout). systemd's stop timeout (`TimeoutStopSec`) is this plus
        30 s, so that a stop or `nixos-rebuild switch` does not cut it short.
      '';
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

    accessLog = mkEnvOption "accessLog" {
      type = types.bool;
      default = false;
      description = "Log every HTTP request as a JSON line.";
    };

    hideDetails = mkEnvOption "hideDetails" {
      type = types.bool;
      default = false;
      description = ''
        Keep the recent builds and errors, and every server path, off the
        web page (and /builds.json), as a public instance may want.
      '';
    };

    allowUnfree = mkEnvOption "allowUnfree" {
      type = types.bool;
      default = false;
      description = ''
        Serve packages with unfree licenses (nixpkgs' `config.allowUnfree`).
        Broken and insecure packages are refused either way.
      '';
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
        in its docs/configuration.md and by `nixery --help`.
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
        assertion = cfg.signing.keyFile != null -> cfg.signing.account != null;
        message = "services.nixery: signing.keyFile needs signing.account, the account that owns the key.";
      }
      {
        assertion = (cfg.signing.keyFile != null || cfg.signing.account != null) -> cfg.bucket != null;
        message = "services.nixery: signing.keyFile and signing.account only apply to a bucket.";
      }
      {
        assertion = isAbsolute cfg.storage.path;
        message = "services.nixery: storage.path must be an absolute path.";
      }
      {
        assertion = lib.all (path: isAbsolute path && !inStore path) (
          [ cfg.environmentFile cfg.binaryCache.credentialsFile ] ++ lib.attrValues credentials
        );
        message = "services.nixery: sshKeyFile, signing.keyFile, gcs.credentialsFile, binaryCache.secretKeyFile, binaryCache.credentialsFile, htpasswdFile, tokenAuth.publicKeyFile and environmentFile must be absolute paths outside the Nix store (which anyone can read).";
      }
      {
        assertion = cfg.gcs.credentialsFile != null -> cfg.bucket != null;
        message = "services.nixery: gcs.credentialsFile only applies to a bucket.";
      }
      {
        assertion = (cfg.binaryCache.url == null) == (cfg.binaryCache.publicKey == null);
        message = "services.nixery: set binaryCache.url and binaryCache.publicKey together (cached paths are only trusted signed).";
      }
      {
        assertion = cfg.binaryCache.secretKeyFile != null -> cfg.binaryCache.url != null;
        message = "services.nixery: binaryCache.secretKeyFile needs binaryCache.url.";
      }
      {
        assertion = cfg.nginx.enable -> cfg.nginx.virtualHost != null;
        message = "services.nixery: nginx.enable needs nginx.virtualHost (the name nginx serves Nixery under).";
      }
      {
        assertion = cfg.binaryCache.credentialsFile != null -> binaryCacheIsS3;
        message = "services.nixery: binaryCache.credentialsFile only applies to an s3:// binaryCache.url.";
      }
      {
        assertion = cfg.nginx.enable -> !cfg.openFirewall;
        message = "services.nixery: with nginx in front, keep Nixery's own port closed (openFirewall = false) and open nginx's.";
      }
    ];

    # Hardened systems restrict who may use the nix-daemon (allowed-users = @users).
    nix.settings = {
      extra-allowed-users = [ "nixery" ];
    }
    // optionalAttrs (cfg.binaryCache.url != null) {
      # A daemon only substitutes from a cache a client names when it is trusted.
      extra-trusted-substituters = [ cfg.binaryCache.url ];
      extra-trusted-public-keys = [ cfg.binaryCache.publicKey ];
    };

    # The daemon substitutes from an s3:// cache with the same keys Nixery writes with.
    systemd.services.nix-daemon = mkIf (cfg.binaryCache.credentialsFile != null) {
      serviceConfig.EnvironmentFile = [ cfg.binaryCache.credentialsFile ];
    };

    # Every image's store paths stay in the store after their layers are
    # stored; NixOS' own collection (nix.gc) removes those no root holds.
    nix.gc.automatic = lib.mkDefault true;

    users.users.nixery = {
      isSystemUser = true;
      group = "nixery";
      home = stateDir;
      description = "Nixery container registry";
    };
    users.groups.nixery = { };

    networking.firewall.allowedTCPPorts = optional cfg.openFirewall cfg.port;

    systemd.tmpfiles.settings."10-nixery" =
      let
        ownDir = {
          d = {
            user = "nixery";
            group = "nixery";
            mode = "0750";
          };
        };
      in
      optionalAttrs storageOutsideState { ${cfg.storage.path} = ownDir; }
      // optionalAttrs (binaryCacheDir != null) { ${binaryCacheDir} = ownDir; }
      // optionalAttrs (cfg.knownHosts != [ ]) {
        "${stateDir}/.ssh".d = {
          user = "nixery";
          group = "nixery";
          mode = "0700";
        };
        # Where libgit2 looks: ~/.ssh/known_hosts of the service user.
        "${stateDir}/.ssh/known_hosts"."L+".argument = "${knownHostsFile}";
      };

    services.nginx = mkIf (cfg.nginx.enable && cfg.nginx.virtualHost != null) {
      enable = true;
      virtualHosts.${cfg.nginx.virtualHost} = {
        # Slow or idle clients wait on nginx, not on a Gunicorn thread.
        extraConfig = ''
          client_header_timeout 10s;
          client_body_timeout 10s;
          send_timeout 60s;
          keepalive_timeout 30s;
          # A pull-only registry takes no request bodies.
          client_max_body_size 4k;
        '';
        locations."/" = {
          proxyPass = "http://${upstreamHost}:${toString cfg.port}";
          # Host, X-Forwarded-Host (the web page's pull command) and X-Forwarded-For,
          # for this location only (not every virtual host of the machine).
          recommendedProxySettings = true;
          extraConfig = ''
            proxy_request_buffering on;
            proxy_buffering on;
            proxy_connect_timeout 5s;
            # A manifest request evaluates, builds and uploads before it answers
            # (substitution has no total bound: see nginx.virtualHost).
            proxy_read_timeout ${toString proxyReadTimeout}s;
            proxy_send_timeout 60s;
          '';
        };
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

      serviceConfig = sandbox // {
        ExecStart = lib.getExe cfg.package;
        User = "nixery";
        Group = "nixery";
        Restart = "on-failure";
        RestartSec = 5;
        # 78 (EX_CONFIG): a bad setting or an unknown NIXERY_ variable, which no restart gets
        # past; the unit stays failed with the reason in the journal. Storage, Nix or the port
        # (exit status 2) may come back, so those are tried again.
        RestartPreventExitStatus = 78;
        # Gunicorn finishes the requests in flight on SIGTERM, for the grace period.
        TimeoutStopSec = gracePeriod + stopMargin;
        # SIGTERM to Gunicorn's master alone, which stops its workers gracefully; by
        # default systemd signals every process of the unit, and the Nix clients of
        # builds in flight die of it ("interrupted by the user"). What is left when
        # the master has exited is killed.
        KillMode = "mixed";
        # Gunicorn's connections per worker plus the open files of builds and
        # uploads; systemd's soft limit of 1024 is too low (harmonia sets the same).
        LimitNOFILE = 65536;
      };
    };

    # `systemctl start nixery-gc` runs one storage collection by hand (`nixery gc`) with the
    # service's settings, user and sandbox, and `journalctl -u nixery-gc` shows what it removed
    # and kept; the service itself collects every storage.gcInterval.
    systemd.services.nixery-gc = {
      description = "Nixery storage collection, once";
      requires = [ "nix-daemon.socket" ];
      after = [ "nix-daemon.socket" "nixery.service" ];
      environment = serviceEnvironment;
      serviceConfig = sandbox // {
        Type = "oneshot";
        ExecStart = "${lib.getExe cfg.package} gc";
        User = "nixery";
        Group = "nixery";
      };
    };
  };
}

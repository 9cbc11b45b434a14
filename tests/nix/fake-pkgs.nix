# A stand-in for the nixpkgs *packages* that the packaging uses (there is no
# nixpkgs on the test machines; its `lib` is the real one, passed in). A package
# is an attribute set with an outPath that nothing builds, except
# pkgsStatic.busybox, a real store path holding bin/busybox when `busyboxDir`
# is given. Functions record their arguments so that tests can read them.
{ lib, busyboxDir ? "" }:
let
  fakeDrv = name: extra: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    meta = { };
  } // extra;
  package = name: fakeDrv name { pname = name; };

  pythonPackageNames = [
    "falcon" "gunicorn" "google-cloud-storage" "google-auth" "pygit2" "networkx" "isal"
    "prometheus-client" "pytest" "requests" "cryptography" "gcp-storage-emulator"
    "websocket-client" "kubernetes-validate" "pyyaml" "setuptools" "pytestCheckHook" "pytest-xdist" "bcrypt" "pyjwt" "rapidfuzz" "packaging"
  ];
  python3Packages = lib.genAttrs pythonPackageNames (name: fakeDrv "python3.13-${name}" { pname = name; }) // {
    python = fakeDrv "python3-3.13" { sitePackages = "lib/python3.13/site-packages"; };
    buildPythonApplication = args: fakeDrv "${args.pname}-${args.version}" (args.passthru or { } // {
      inherit args;
      inherit (args) pname version meta;
    });
  };

  pkgs = lib.genAttrs [
    "nix" "git" "coreutils" "cacert" "bashInteractive" "skopeo" "umoci" "kubectl" "openssh"
    "chromium" "util-linux" "gnutar"
  ] package // {
    inherit lib pkgs python3Packages;
    callPackage = fn: overrides:
      let f = if builtins.isFunction fn then fn else import fn;
      in f (builtins.intersectAttrs (builtins.functionArgs f) pkgs // overrides);
    python3 = fakeDrv "python3" {
      withPackages = select: fakeDrv "python3-env" { pythonPackages = map (p: p.pname) (select python3Packages); };
    };
    pkgsStatic.busybox =
      if busyboxDir == "" then fakeDrv "busybox-static" { pname = "busybox"; }
      else builtins.path { path = /. + busyboxDir; name = "busybox-static"; };
    runCommand = name: env: script: fakeDrv name (env // { inherit script; });
    writeShellApplication = args: fakeDrv args.name (args // { meta.mainProgram = args.name; });
    writeText = name: text: builtins.toFile name text;
    # A single file instead of a directory holding default.nix: Nix imports either.
    writeTextDir = name: text: builtins.toFile (baseNameOf name) text;
    mkShell = args: fakeDrv "nix-shell" { inherit args; };
    dockerTools.buildLayeredImage = args: fakeDrv "${args.name}.tar.gz" { inherit args; };
    testers.runNixOSTest = test: test // fakeDrv "vm-test-run-${test.name}" { };
    stdenv.hostPlatform.system = "x86_64-linux";
  };
in
pkgs

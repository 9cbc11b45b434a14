"""The Nix packaging (default.nix, flake.nix, module.nix) and the README's
configuration table, checked against nixery.config.VARIABLES.

There is no nixpkgs here (nor on CI), only Nix itself. So every .nix file is
parsed, and default.nix, flake.nix and module.nix are *evaluated* against a
small stand-in for nixpkgs' `lib` and `pkgs` (STUB_NIX below) whose option
functions return plain data. That is enough to read the NixOS module's
options and the environment its service gets, and to feed that environment to
nixery.config.load. The flake's `lib.imageContents` and the package set of the
flake's VM test are evaluated and built for real, with a static busybox
standing in for nixpkgs' static busybox.

What cannot run here: building the package (it needs nixpkgs' Python
packages) and the NixOS VM test (`nix flake check` on a machine with nixpkgs).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nixery import config as nixery_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SYSTEMS = ("x86_64-linux", "aarch64-linux")

# Options of services.nixery that set no variable of their own.
OPTIONS_WITHOUT_VARIABLE = {"enable", "package", "openFirewall", "environmentFile", "extraEnvironment"}
# Variables the service gets that are Nix's, not Nixery's.
NIX_VARIABLES = {"NIX_REMOTE", "XDG_CACHE_HOME"}
# The options the NixOS module must offer, with the variable each one sets.
REQUIRED_OPTIONS = {
    "port": "PORT",
    "listenAddress": "NIXERY_LISTEN_ADDRESS",
    "channel": "NIXERY_CHANNEL",
    "pkgsRepo": "NIXERY_PKGS_REPO",
    "pkgsPath": "NIXERY_PKGS_PATH",
    "storage.backend": "NIXERY_STORAGE_BACKEND",
    "storage.path": "STORAGE_PATH",
    "bucket": "GCS_BUCKET",
    "signing.keyFile": "GCS_SIGNING_KEY",
    "signing.account": "GCS_SIGNING_ACCOUNT",
    "nixTimeout": "NIX_TIMEOUT",
    "popularityUrl": "NIX_POPULARITY_URL",
    "layerBudget": "NIXERY_LAYER_BUDGET",
    "workers": "NIXERY_WORKERS",
}
PYTHON_DEPENDENCIES = {
    "falcon", "gunicorn", "google-cloud-storage", "google-auth",
    "pygit2", "networkx", "isal", "prometheus-client", "bcrypt", "pyjwt", "cryptography",
}

# A stand-in for the parts of nixpkgs that the packaging uses. Option
# declarations, types and mkIf become plain data; list and attribute set
# functions behave as nixpkgs' do; packages are fake derivations (attribute
# sets with an outPath), except pkgsStatic.busybox, a real store path holding
# bin/busybox when `busyboxDir` is given.
STUB_NIX = r"""
{ busyboxDir ? "" }:
let
  lib = rec {
    inherit (builtins)
      all any attrNames attrValues concatLists concatMap concatStringsSep elem
      filter foldl' head isAttrs isFunction isList isString length listToAttrs
      mapAttrs tail toJSON;

    mkOption = args: args // { _type = "option"; };
    mkEnableOption = name: mkOption {
      type = types.bool; default = false; example = true;
      description = "Whether to enable ${name}.";
    };
    mkPackageOption = pkgs: name: args: mkOption ({
      type = types.package;
      default = pkgs.${name};
      defaultText = literalExpression "pkgs.${name}";
      description = "The ${name} package to use.";
    } // args);
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    literalMD = text: { _type = "literalMD"; inherit text; };
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    mkOverride = priority: content: { _type = "override"; inherit priority content; };
    mkOptionDefault = mkOverride 1500;
    mkDefault = mkOverride 1000;
    mkForce = mkOverride 50;

    types = rec {
      mk = name: extra: { _type = "type"; inherit name; } // extra;
      bool = mk "bool" { };
      str = mk "str" { };
      lines = mk "lines" { };
      int = mk "int" { };
      port = mk "port" { };
      path = mk "path" { };
      package = mk "package" { };
      nullOr = elemType: mk "nullOr" { inherit elemType; };
      listOf = elemType: mk "listOf" { inherit elemType; };
      attrsOf = elemType: mk "attrsOf" { inherit elemType; };
      either = a: b: mk "either" { alternatives = [ a b ]; };
      enum = values: mk "enum" { inherit values; };
      strMatching = pattern: mk "strMatching" { inherit pattern; };
      ints = {
        between = lo: hi: mk "intBetween" { inherit lo hi; };
        positive = mk "intBetween" { lo = 1; hi = null; };
        unsigned = mk "intBetween" { lo = 0; hi = null; };
      };
    };

    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    optionalAttrs = cond: set: if cond then set else { };
    optionalString = cond: s: if cond then s else "";
    nameValuePair = name: value: { inherit name value; };
    mapAttrs' = f: set: listToAttrs (map (n: f n set.${n}) (attrNames set));
    mapAttrsToList = f: set: map (n: f n set.${n}) (attrNames set);
    filterAttrs = pred: set:
      listToAttrs (concatMap (n: if pred n set.${n} then [ (nameValuePair n set.${n}) ] else [ ]) (attrNames set));
    genAttrs = names: f: listToAttrs (map (n: nameValuePair n (f n)) names);
    hasPrefix = prefix: s: builtins.substring 0 (builtins.stringLength prefix) s == prefix;
    escapeRegex = builtins.replaceStrings
      [ "\\" "." "[" "]" "(" ")" "{" "}" "*" "+" "?" "|" "^" "$" ]
      [ "\\\\" "\\." "\\[" "\\]" "\\(" "\\)" "\\{" "\\}" "\\*" "\\+" "\\?" "\\|" "\\^" "\\$" ];
    splitString = sep: s: filter isString (builtins.split (escapeRegex sep) s);
    attrByPath = path: default: set:
      if path == [ ] then set
      else if isAttrs set && set ? ${head path} then attrByPath (tail path) default set.${head path}
      else default;
    getExe = drv: "${drv}/bin/${drv.meta.mainProgram}";
    makeBinPath = packages: concatStringsSep ":" (map (p: "${p}/bin") packages);
    licenses.mit = { spdxId = "MIT"; shortName = "mit"; };
    platforms.linux = [ "x86_64-linux" "aarch64-linux" ];
    # Paths stay strings: nothing is copied (setup.py may not exist yet).
    fileset = {
      toSource = { root, fileset }: {
        _type = "fileset-source";
        root = toString root;
        files = fileset;
      };
      unions = map (f: if builtins.isPath f then toString f else f);
      maybeMissing = path: "maybe:${toString path}";
    };
  };

  fakeDrv = name: extra: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    meta = { };
  } // extra;

  python3Packages = lib.genAttrs [
    "falcon" "gunicorn" "google-cloud-storage" "google-auth" "pygit2" "networkx"
    "isal" "prometheus-client" "pytest" "setuptools"
  ] (name: fakeDrv "python3.12-${name}" { pname = name; }) // {
    python = fakeDrv "python3-3.12" { sitePackages = "lib/python3.12/site-packages"; };
    buildPythonApplication = args:
      fakeDrv "${args.pname}-${args.version}" { inherit args; inherit (args) pname version meta; };
  };

  pkgs = lib.genAttrs [ "nix" "git" "coreutils" "cacert" "bashInteractive" "skopeo" "umoci" "jq" "nixfmt-rfc-style" ]
    (name: fakeDrv name { pname = name; })
  // {
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
    # A single file instead of a directory holding default.nix: Nix imports
    # either, and `builtins.toFile` needs no nixpkgs.
    writeTextDir = name: text: builtins.toFile (baseNameOf name) text;
    mkShell = args: fakeDrv "nix-shell" { inherit args; };
    dockerTools.buildLayeredImage = args: fakeDrv "${args.name}.tar.gz" { inherit args; };
    testers.runNixOSTest = test: test;
    stdenv.hostPlatform.system = "x86_64-linux";
  };
in
{ inherit lib pkgs; }
"""

# Calls module.nix as the module system would, with `config` made of each
# option's default overridden by `settings` (JSON, the user's
# services.nixery), and returns what the tests look at.
EVAL_MODULE_NIX = r"""
{ stub, module, settings ? "{}", busyboxDir ? "" }:
let
  inherit (import (/. + stub) { inherit busyboxDir; }) lib pkgs;
  given = builtins.fromJSON settings;
  isOption = v: (v._type or null) == "option";

  declared = import (/. + module) {
    inherit lib pkgs;
    config.services.nixery = valuesOf nixeryOptions given;
    options.services.nixery = metaOf nixeryOptions given;
  };
  nixeryOptions = declared.options.services.nixery;

  # An option's value: the setting if given, else its default.
  valuesOf = opts: set: builtins.mapAttrs
    (n: o: if isOption o then (if set ? ${n} then set.${n} else o.default or null)
           else valuesOf o (set.${n} or { }))
    opts;
  # What the module system tells about an option: a definition has
  # priority 100, an option's own default 1500.
  metaOf = opts: set: builtins.mapAttrs
    (n: o: if isOption o then { highestPrio = if set ? ${n} then 100 else 1500; isDefined = true; }
           else metaOf o (set.${n} or { }))
    opts;
  # Settings of options the module does not declare.
  undeclared = prefix: opts: set: lib.concatMap
    (n: if !(opts ? ${n}) then [ "${prefix}${n}" ]
        else if isOption opts.${n} then [ ]
        else undeclared "${prefix}${n}." opts.${n} set.${n})
    (builtins.attrNames set);

  flatten = prefix: opts: lib.concatMap (n:
    let o = opts.${n}; name = if prefix == "" then n else "${prefix}.${n}"; in
    if isOption o then [ ({ inherit name; type = o.type; description = o.description or null; }
      // lib.optionalAttrs (o ? default) { default = o.default; }
      // lib.optionalAttrs (o ? defaultText) { inherit (o) defaultText; }
      // lib.optionalAttrs (o ? example) { inherit (o) example; }) ]
    else flatten name o) (builtins.attrNames opts);

  cfgOut = declared.config;
  enabled = if (cfgOut._type or null) == "if" then (if cfgOut.condition then cfgOut.content else null) else cfgOut;
  service = enabled.systemd.services.nixery;
in
assert undeclared "" nixeryOptions given == [ ]
  || throw "undeclared settings: ${toString (undeclared "" nixeryOptions given)}";
{
  options = flatten "" nixeryOptions;
  config = if enabled == null then null else {
    assertions = map (a: { inherit (a) assertion message; }) enabled.assertions;
    failed = map (a: a.message) (builtins.filter (a: !a.assertion) enabled.assertions);
    inherit (service) environment serviceConfig after requires wants wantedBy;
    users = enabled.users;
    firewall = enabled.networking.firewall.allowedTCPPorts;
    tmpfiles = enabled.systemd.tmpfiles.settings;
  };
}
"""

# The flake's outputs with the stub standing in for the nixpkgs input.
FLAKE_NIX = r"""
{ stub, root, busyboxDir ? "" }:
let
  stubbed = import (/. + stub) { inherit busyboxDir; };
  flake = import (/. + root + "/flake.nix");
  outputs = flake.outputs {
    self = outputs // { outPath = root; };
    nixpkgs = {
      inherit (stubbed) lib;
      legacyPackages = stubbed.lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (_: stubbed.pkgs);
    };
  };
in
{ inherit flake outputs; inherit (stubbed) lib pkgs; }
"""


def nix_env() -> dict[str, str]:
    env = dict(os.environ)
    # No binary cache here: do not wait for one.
    env["NIX_CONFIG"] = "substituters =\n" + env.get("NIX_CONFIG", "")
    return env


def run(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, env=nix_env(), timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def nix_eval(expr: str, *, files: dict[str, Path], argstr: dict[str, str] | None = None,
             attr: str | None = None):
    """Evaluate `expr` (a Nix expression taking `files` and `argstr` as string
    arguments) strictly, to JSON. Paths are passed with --argstr, never
    spliced into Nix source."""
    args = ["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", "-E", expr]
    for name, value in {**{k: str(v) for k, v in files.items()}, **(argstr or {})}.items():
        args += ["--argstr", name, value]
    if attr:
        args += ["-A", attr]
    return json.loads(run(*args))


@pytest.fixture(scope="session")
def nix_files(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("nix")
    files = {}
    for name, text in (("stub", STUB_NIX), ("evalModule", EVAL_MODULE_NIX), ("flakeOutputs", FLAKE_NIX)):
        path = directory / f"{name}.nix"
        path.write_text(text)
        files[name] = path
    return files


@pytest.fixture(scope="session")
def busybox_dir(tmp_path_factory) -> Path:
    """A directory holding bin/busybox, standing in for pkgsStatic.busybox."""
    found = shutil.which("busybox") or "/bin/busybox"
    directory = tmp_path_factory.mktemp("busybox-static")
    (directory / "bin").mkdir()
    shutil.copy(found, directory / "bin" / "busybox")
    return directory


def evaluate_module(nix_files, settings: dict | None = None) -> dict:
    expr = "{ evalModule, stub, module, settings }: import (/. + evalModule) { inherit stub module settings; }"
    return nix_eval(expr, files={"evalModule": nix_files["evalModule"], "stub": nix_files["stub"],
                                 "module": ROOT / "module.nix"},
                    argstr={"settings": json.dumps({"enable": True, **(settings or {})})})


def flake_value(nix_files, selector: str, *, busybox_dir: Path | None = None,
                argstr: dict[str, str] | None = None):
    """`selector` applied to { flake, outputs, lib, pkgs } of the stubbed flake
    (and to the names in `argstr`, given as strings), as JSON."""
    extra = "".join(f"{name}, " for name in argstr or {})
    expr = (f"{{ flakeOutputs, stub, root, busyboxDir, {extra}... }}: "
            "let f = import (/. + flakeOutputs) { inherit stub root busyboxDir; }; "
            f"in with f; ({selector})")
    return nix_eval(expr, files={"flakeOutputs": nix_files["flakeOutputs"], "stub": nix_files["stub"],
                                 "root": ROOT},
                    argstr={"busyboxDir": str(busybox_dir) if busybox_dir else "", **(argstr or {})})


def store_name(path: str) -> str:
    """/nix/store/HASH-name -> name"""
    return path.rsplit("/", 1)[-1].split("-", 1)[1]


@pytest.fixture(scope="session")
def module_options(nix_files) -> dict[str, dict]:
    return {o["name"]: o for o in evaluate_module(nix_files)["options"]}


def option_variable(option: dict) -> str | None:
    found = re.findall(r"Sets the environment variable `([A-Z0-9_]+)`\.", option["description"] or "")
    assert len(found) <= 1, option
    return found[0] if found else None


def as_env_value(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else ""
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


VARIABLES = {v.name: v for v in nixery_config.VARIABLES}


# ---------------------------------------------------------------- parsing --

def repository_nix_files() -> list[Path]:
    skip = {".git", ".venv", "node_modules", "result"}
    return sorted(p for p in ROOT.rglob("*.nix")
                  if not any(part in skip or part.startswith("result-") for part in p.relative_to(ROOT).parts))


def test_the_packaging_files_exist():
    names = {p.relative_to(ROOT).as_posix() for p in repository_nix_files()}
    assert {"default.nix", "flake.nix", "module.nix", "nixery/nix/helper.nix"} <= names


@pytest.mark.parametrize("path", repository_nix_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_nix_file_parses(path):
    run("nix-instantiate", "--parse", str(path))


def test_the_stubs_parse(nix_files):
    for path in nix_files.values():
        run("nix-instantiate", "--parse", str(path))


# ------------------------------------------------------------ NixOS module --

def test_every_module_option_is_described(module_options):
    for name, option in module_options.items():
        assert option["description"] and len(option["description"].strip()) > 15, name
        assert option["type"]["_type"] == "type", name


def test_module_options_map_to_known_variables(module_options):
    mapping = {}
    for name, option in module_options.items():
        variable = option_variable(option)
        if name in OPTIONS_WITHOUT_VARIABLE:
            assert variable is None, f"{name} should not set a variable"
            continue
        assert variable is not None, f"services.nixery.{name} does not say which variable it sets"
        assert variable in nixery_config.VARIABLE_NAMES, f"services.nixery.{name} sets unknown {variable}"
        mapping[name] = variable
    for name, variable in REQUIRED_OPTIONS.items():
        assert mapping.get(name) == variable, f"services.nixery.{name} should set {variable}"
    assert len(set(mapping.values())) == len(mapping), "two options set the same variable"


def test_module_option_defaults_are_nixerys_defaults(module_options):
    for name, option in module_options.items():
        variable = option_variable(option)
        if variable is None or VARIABLES[variable].default is None:
            continue
        assert "default" in option, name
        assert as_env_value(option["default"]) == VARIABLES[variable].default, (
            f"services.nixery.{name} defaults to {option['default']!r}, "
            f"Nixery's {variable} to {VARIABLES[variable].default!r}")


def test_module_option_ranges_are_the_ones_nixery_accepts(module_options):
    checked = 0
    for name, option in module_options.items():
        variable, kind = option_variable(option), option["type"]
        if variable is None:
            continue
        extra = {"GCS_BUCKET": "test-bucket"} if variable == "NIXERY_STORAGE_BACKEND" else {}
        if kind["name"] == "intBetween":
            lo, hi = kind["lo"], kind["hi"]
            nixery_config.load({variable: str(lo)})
            nixery_config.load({variable: str(hi)})
            for outside in (lo - 1, hi + 1):
                with pytest.raises(nixery_config.ConfigError):
                    nixery_config.load({variable: str(outside)})
            checked += 1
        elif kind["name"] == "enum":
            for value in kind["values"]:
                nixery_config.load({variable: value, **extra})
            checked += 1
    assert checked >= 5


def test_module_default_environment_is_valid(nix_files):
    result = evaluate_module(nix_files)["config"]
    assert result["failed"] == []
    env = result["environment"]
    assert set(env) <= nixery_config.VARIABLE_NAMES | NIX_VARIABLES, set(env) - nixery_config.VARIABLE_NAMES
    for name, value in env.items():
        if name in VARIABLES and VARIABLES[name].default is not None:
            assert value == VARIABLES[name].default, name
    assert env["NIXERY_STATE_DIR"] == "/var/lib/nixery"
    assert env["STORAGE_PATH"] == "/var/lib/nixery/storage"
    assert env["NIX_REMOTE"] == "daemon"
    assert "GCS_BUCKET" not in env and "NIXERY_PKGS_PATH" not in env
    loaded = nixery_config.load(env)
    assert loaded.port == 8080 and loaded.workers == 2 and loaded.layer_budget == 94
    assert loaded.source == nixery_config.PackageSource(nixery_config.SourceKind.CHANNEL, "nixos-unstable")
    assert str(loaded.storage_path) == "/var/lib/nixery/storage"
    assert str(loaded.state_dir) == "/var/lib/nixery"


def test_module_disabled_configures_nothing(nix_files):
    expr = "{ evalModule, stub, module }: import (/. + evalModule) { inherit stub module; }"
    result = nix_eval(expr, files={"evalModule": nix_files["evalModule"], "stub": nix_files["stub"],
                                   "module": ROOT / "module.nix"})
    assert result["config"] is None


def test_module_full_configuration_reaches_nixery(nix_files, tmp_path):
    packages = tmp_path / "packages"
    packages.mkdir()
    settings = {
        "port": 9000,
        "listenAddress": "::",
        "openFirewall": True,
        "allowedChannels": ["nixos-24.11", "nixos-unstable"],
        "pkgsPath": str(packages),
        "sshKeyFile": "/run/keys/nixery-ssh",
        "storage": {"backend": "gcs", "path": "/srv/unused"},
        "bucket": "my-nixery-layers",
        "signing": {"keyFile": "/run/keys/gcs.pem", "account": "nixery@example.iam.gserviceaccount.com"},
        "nixTimeout": 120,
        "popularityUrl": "https://example.org/popularity.json",
        "layerBudget": 60,
        "workers": 4,
        "threads": 16,
        "logLevel": "DEBUG",
        "environmentFile": "/run/keys/nixery.env",
        "extraEnvironment": {"NIXERY_GIT_TTL": "300"},
    }
    result = evaluate_module(nix_files, settings)["config"]
    assert result["failed"] == []
    env = result["environment"]
    assert env == {
        "PORT": "9000",
        "NIXERY_LISTEN_ADDRESS": "::",
        "NIXERY_CHANNEL_ALLOW": "nixos-24.11,nixos-unstable",
        "NIXERY_PKGS_PATH": str(packages),
        "NIXERY_SSH_KEY": "%d/ssh-key",
        "NIXERY_STORAGE_BACKEND": "gcs",
        "GCS_BUCKET": "my-nixery-layers",
        "GCS_SIGNING_KEY": "%d/gcs-signing-key",
        "GCS_SIGNING_ACCOUNT": "nixery@example.iam.gserviceaccount.com",
        "NIX_TIMEOUT": "120",
        "NIX_POPULARITY_URL": "https://example.org/popularity.json",
        "NIXERY_LAYER_BUDGET": "60",
        "NIXERY_WORKERS": "4",
        "NIXERY_THREADS": "16",
        "NIXERY_LOG_LEVEL": "DEBUG",
        "NIXERY_GIT_TTL": "300",
        "NIXERY_STATE_DIR": "/var/lib/nixery",
        "NIX_REMOTE": "daemon",
        "XDG_CACHE_HOME": "/var/cache/nixery",
    }
    service = result["serviceConfig"]
    # Secrets go through LoadCredential; their paths are nowhere in the environment.
    assert sorted(service["LoadCredential"]) == ["gcs-signing-key:/run/keys/gcs.pem", "ssh-key:/run/keys/nixery-ssh"]
    assert not any("/run/keys" in value for value in env.values())
    assert service["EnvironmentFile"] == ["/run/keys/nixery.env"]
    assert result["firewall"] == [9000]

    # What systemd does with %d, then what Nixery makes of it.
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "gcs-signing-key").write_text("-----BEGIN PRIVATE KEY-----\n")
    (credentials / "ssh-key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    loaded = nixery_config.load({k: v.replace("%d", str(credentials)) for k, v in env.items()})
    assert loaded.port == 9000 and loaded.listen_address == "::"
    assert loaded.source == nixery_config.PackageSource(nixery_config.SourceKind.PATH, str(packages.resolve()))
    assert loaded.channel_allow == ("nixos-24.11", "nixos-unstable")
    assert loaded.storage_backend == "gcs" and loaded.gcs.bucket == "my-nixery-layers"
    assert loaded.gcs.signing_key == credentials / "gcs-signing-key"
    assert loaded.ssh_key == credentials / "ssh-key"
    assert (loaded.nix_timeout, loaded.layer_budget, loaded.workers, loaded.threads) == (120, 60, 4, 16)
    assert loaded.log_level == "DEBUG" and loaded.git_ttl == 300


def test_module_pkgs_repo_replaces_the_channel(nix_files):
    env = evaluate_module(nix_files, {"pkgsRepo": "https://example.org/pkgs.git"})["config"]["environment"]
    assert env["NIXERY_PKGS_REPO"] == "https://example.org/pkgs.git"
    assert "NIXERY_CHANNEL" not in env
    assert nixery_config.load(env).source.kind == nixery_config.SourceKind.GIT


@pytest.mark.parametrize("settings, message", [
    ({"pkgsRepo": "https://example.org/p.git", "pkgsPath": "/srv/p"}, "only one of pkgsRepo and pkgsPath"),
    ({"channel": "nixos-24.11", "pkgsPath": "/srv/p"}, "channel"),
    ({"storage": {"backend": "gcs"}}, "needs services.nixery.bucket"),
    ({"bucket": "my-bucket"}, "only used with storage.backend"),
    ({"storage": {"backend": "gcs"}, "bucket": "my-bucket", "signing": {"keyFile": "/run/k.pem"}},
     "signing.keyFile and signing.account together"),
    ({"signing": {"keyFile": "/run/k.pem", "account": "a@b.c"}}, "only apply to a bucket"),
    ({"storage": {"path": "relative/dir"}}, "absolute"),
    ({"sshKeyFile": "/nix/store/00000000000000000000000000000000-key"}, "outside the Nix store"),
    ({"environmentFile": "secrets.env"}, "outside the Nix store"),
])
def test_module_assertions(nix_files, settings, message):
    failed = evaluate_module(nix_files, settings)["config"]["failed"]
    assert any(message in m for m in failed), failed


def test_module_explicit_default_channel_is_fine(nix_files):
    assert evaluate_module(nix_files, {"channel": "nixos-24.11"})["config"]["failed"] == []


def test_module_storage_outside_the_state_directory(nix_files):
    inside = evaluate_module(nix_files)["config"]
    assert inside["tmpfiles"] == {} and inside["serviceConfig"]["ReadWritePaths"] == []
    outside = evaluate_module(nix_files, {"storage": {"path": "/srv/nixery"}})["config"]
    assert outside["serviceConfig"]["ReadWritePaths"] == ["/srv/nixery"]
    assert outside["tmpfiles"] == {"10-nixery": {"/srv/nixery": {"d": {"user": "nixery", "group": "nixery", "mode": "0750"}}}}
    assert outside["environment"]["STORAGE_PATH"] == "/srv/nixery"
    gcs = evaluate_module(nix_files, {"storage": {"backend": "gcs", "path": "/srv/nixery"}, "bucket": "b-1"})["config"]
    assert "STORAGE_PATH" not in gcs["environment"] and gcs["serviceConfig"]["ReadWritePaths"] == []


def test_module_service_is_hardened_and_uses_the_daemon(nix_files):
    result = evaluate_module(nix_files)["config"]
    service = result["serviceConfig"]
    assert service["User"] == "nixery" and service["Group"] == "nixery"
    assert result["users"]["users"]["nixery"]["isSystemUser"] is True
    assert service["StateDirectory"] == "nixery"
    assert service["ExecStart"].endswith("/bin/nixery")
    assert "nix-daemon.socket" in result["after"] and "nix-daemon.socket" in result["requires"]
    assert result["environment"]["NIX_REMOTE"] == "daemon"
    expected = {
        "ProtectSystem": "strict", "ProtectHome": True, "PrivateTmp": True, "NoNewPrivileges": True,
        "ProtectKernelTunables": True, "ProtectKernelModules": True, "ProtectKernelLogs": True,
        "CapabilityBoundingSet": [""], "AmbientCapabilities": [],
    }
    assert {k: service.get(k) for k in expected} == expected
    assert set(service["RestrictAddressFamilies"]) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in service["SystemCallFilter"]
    assert result["firewall"] == [] and service["LoadCredential"] == []
    privileged = evaluate_module(nix_files, {"port": 80})["config"]["serviceConfig"]
    assert privileged["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert privileged["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]


def test_module_package_defaults_to_this_repository(module_options):
    package = module_options["package"]
    assert package["type"]["name"] == "package"
    assert store_name(package["default"]) == f"nixery-{setup_py_arguments()['version']}"
    assert "pkgs.nixery" in package["defaultText"]["text"]


# ------------------------------------------------------------------ README --

def readme_section(title: str) -> str:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def readme_rows() -> list[tuple[str, str, str]]:
    rows = []
    for line in readme_section("Configuration").splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows.append(tuple(cells))
    return rows


def expected_row(var: nixery_config.Variable) -> tuple[str, str, str]:
    if var.default is None:
        default = "—"
    elif var.default == "":
        default = "(empty)"
    else:
        default = f"`{var.default}`"
    meaning = var.help.replace("|", "\\|") + (" Secret: never logged." if var.secret else "")
    return (f"`{var.name}`", default, meaning)


def expected_table() -> str:
    lines = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    lines += ["| " + " | ".join(expected_row(v)) + " |" for v in nixery_config.VARIABLES]
    return "\n".join(lines)


def test_readme_configuration_table_is_variables():
    rows = readme_rows()
    names = [r[0].strip("`") for r in rows]
    assert set(names) == nixery_config.VARIABLE_NAMES and len(names) == len(set(names)), (
        f"README table and VARIABLES differ: only in README {sorted(set(names) - nixery_config.VARIABLE_NAMES)}, "
        f"only in VARIABLES {sorted(nixery_config.VARIABLE_NAMES - set(names))}; "
        f"the table should read:\n{expected_table()}")
    assert rows == [expected_row(v) for v in nixery_config.VARIABLES], (
        f"README table is out of date; it should read:\n{expected_table()}")


def test_readme_deployment_names_the_three_ways():
    text = readme_section("Deployment")
    assert "nix run" in text
    assert "services.nixery" in text and "nixosModules.default" in text
    assert ".#image" in text and "docker" in text


# ------------------------------------------------------------------- flake --

def test_flake_inputs_and_systems(nix_files):
    assert flake_value(nix_files, "flake.inputs.nixpkgs.url") == "github:NixOS/nixpkgs/nixos-unstable"
    shape = flake_value(nix_files, "builtins.mapAttrs (_: builtins.attrNames) "
                                   "{ inherit (outputs) packages apps checks devShells; }")
    for output, per_system in shape.items():
        assert sorted(per_system) == sorted(SYSTEMS), output
    for system in SYSTEMS:
        assert {"default", "image"} <= set(flake_value(nix_files, f'builtins.attrNames outputs.packages."{system}"'))
        assert {"package", "nixos"} <= set(flake_value(nix_files, f'builtins.attrNames outputs.checks."{system}"'))


def test_flake_package_app_overlay_and_module(nix_files):
    package = flake_value(nix_files, 'with outputs.packages."x86_64-linux".default; { inherit pname meta; }')
    assert package["pname"] == "nixery" and package["meta"]["mainProgram"] == "nixery"
    app = flake_value(nix_files, 'outputs.apps."x86_64-linux".default')
    assert app["type"] == "app" and app["program"].endswith("/bin/nixery")
    assert flake_value(nix_files, "(outputs.overlays.default pkgs pkgs).nixery.pname") == "nixery"
    assert flake_value(nix_files, "builtins.isFunction outputs.nixosModules.default") is True
    # nixosModules.default is module.nix itself: same options.
    names = flake_value(nix_files, "builtins.attrNames (outputs.nixosModules.default "
                                   "{ inherit lib pkgs; config = { }; options = { }; }).options.services.nixery")
    assert "pkgsPath" in names and "storage" in names


def test_default_nix_package(nix_files):
    for selector in ('outputs.packages."x86_64-linux".default.args',
                     'with (import (/. + root + "/default.nix") { inherit pkgs; }); args'):
        args = flake_value(nix_files, selector)
        assert args["pname"] == "nixery" and args["pyproject"] is True
        assert {store_name(d).removeprefix("python3.12-") for d in args["dependencies"]} == PYTHON_DEPENDENCIES
        assert [store_name(d) for d in args["build-system"]] == ["python3.12-setuptools"]
        wrapper = args["makeWrapperArgs"]
        assert wrapper[:3] == ["--prefix", "PATH", ":"]
        bins = wrapper[3].split(":")
        assert any(b.endswith("-nix/bin") for b in bins) and any(b.endswith("-git/bin") for b in bins)
        assert args["meta"]["license"]["spdxId"] == "MIT"
        assert args["meta"]["mainProgram"] == "nixery" and args["meta"]["description"]
        files = args["src"]["files"]
        assert str(ROOT / "setup.py") in files and str(ROOT / "nixery") in files
        assert "nixery/nix/helper.nix" in args["postInstall"]


def setup_py_arguments() -> dict:
    """The keyword arguments of setup() in setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            return {k.arg: ast.literal_eval(k.value) for k in node.keywords
                    if isinstance(k.value, (ast.Constant, ast.List, ast.Dict, ast.Tuple))}
    raise AssertionError("setup.py calls no setup()")


def test_default_nix_agrees_with_setup_py(nix_files):
    setup = setup_py_arguments()
    args = flake_value(nix_files, 'outputs.packages."x86_64-linux".default.args')
    assert args["version"] == setup["version"]
    required = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-")
                for r in setup["install_requires"]}
    assert required == PYTHON_DEPENDENCIES
    assert "nixery = nixery.__main__:main" in setup["entry_points"]["console_scripts"]
    assert any("*.nix" in patterns for patterns in setup["package_data"].values())


def test_dev_shell_has_the_tools_and_the_same_python_dependencies(nix_files):
    packages = flake_value(nix_files, 'outputs.devShells."x86_64-linux".default.args.packages')
    names = {store_name(p) for p in packages}
    assert {"python3-env", "nix", "git", "skopeo", "umoci", "busybox-static"} <= names
    busybox = flake_value(nix_files, 'outputs.devShells."x86_64-linux".default.args.BUSYBOX')
    assert busybox.endswith("-busybox-static/bin/busybox")
    python = flake_value(nix_files, '(builtins.head (builtins.filter (p: p.name == "python3-env") '
                                    'outputs.devShells."x86_64-linux".default.args.packages)).pythonPackages')
    assert set(python) == PYTHON_DEPENDENCIES | {"pytest"}


def test_flake_image(nix_files, tmp_path):
    image = flake_value(nix_files, 'outputs.packages."x86_64-linux".image.args')
    names = {store_name(p) for p in image["contents"]}
    nixery = f"nixery-{setup_py_arguments()['version']}"
    assert {nixery, "nix", "git", "cacert", "bashInteractive", "coreutils", "nixery-container-start"} <= names
    assert image["includeNixDB"] is True
    assert image["config"]["Entrypoint"] == [
        "/nix/store/00000000000000000000000000000000-nixery-container-start/bin/nixery-container-start"]
    assert "8080/tcp" in image["config"]["ExposedPorts"]

    script = flake_value(nix_files, '(builtins.head (builtins.filter (p: p.name or "" == "nixery-container-start") '
                                    'outputs.packages."x86_64-linux".image.args.contents)).text')
    path = tmp_path / "start.sh"
    path.write_text(script)
    run("bash", "-n", str(path))
    for needed in ("sandbox = false", "build-users-group =", "/etc/passwd", "/etc/group", "root:x:0:0",
                   "nixbld", "chmod 1777 /tmp", f"exec /nix/store/00000000000000000000000000000000-{nixery}/bin/nixery"):
        assert needed in script, needed


def test_image_start_script_prepares_the_container(nix_files, busybox_dir, tmp_path):
    """The image's start-up script, run in a chroot holding only a busybox,
    with Nixery replaced by a command that reports what it was given."""
    script = flake_value(nix_files, '(builtins.head (builtins.filter (p: p.name or "" == "nixery-container-start") '
                                    'outputs.packages."x86_64-linux".image.args.contents)).text')
    nixery = f"/nix/store/00000000000000000000000000000000-nixery-{setup_py_arguments()['version']}/bin/nixery"
    assert script.count(nixery) == 1
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox_dir / "bin" / "busybox", root / "bin" / "busybox")
    for applet in ("sh", "mkdir", "chmod", "cat", "echo", "printf", "tr"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "start").write_text(
        "set -o errexit -o nounset\n"
        + script.replace(nixery, "/bin/report"))
    (root / "bin" / "report").write_text('#!/bin/sh\necho "started with $*" > /started\n')
    (root / "bin" / "report").chmod(0o755)
    subprocess.run([chroot, str(root), "/bin/sh", "/start", "--check-config"], check=True,
                   env={"PATH": "/bin"}, timeout=60)
    assert (root / "started").read_text() == "started with --check-config\n"
    conf = (root / "etc" / "nix" / "nix.conf").read_text().splitlines()
    assert "sandbox = false" in conf and "build-users-group =" in conf
    passwd = [line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()]
    assert ["root", "x", "0", "0", "root", "/root", "/bin/bash"] in passwd
    assert sum(1 for entry in passwd if entry[0].startswith("nixbld") and entry[3] == "30000") >= 1
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc" / "group").read_text().splitlines()}
    assert groups["root"][2] == "0" and groups["nixbld"][2] == "30000"
    assert set(groups["nixbld"][3].split(",")) == {e[0] for e in passwd if e[0].startswith("nixbld")}
    assert (root / "tmp").stat().st_mode & 0o7777 == 0o1777
    # A second start keeps what is there (a mounted nix.conf, say).
    (root / "etc" / "nix" / "nix.conf").write_text("sandbox = true\n")
    subprocess.run([chroot, str(root), "/bin/sh", "/start"], check=True, env={"PATH": "/bin"}, timeout=60)
    assert (root / "etc" / "nix" / "nix.conf").read_text() == "sandbox = true\n"


def test_vm_test_script_is_python(nix_files):
    test = flake_value(nix_files, 'with outputs.checks."x86_64-linux".nixos; { inherit name testScript; }')
    compile(test["testScript"], "testScript", "exec")
    assert "skopeo" in test["testScript"] and "manifest" in test["testScript"]


def test_flake_helper_is_the_services_helper(nix_files):
    assert flake_value(nix_files, "toString outputs.lib.helper") == str(ROOT / "nixery" / "nix" / "helper.nix")


def test_vm_test_package_set_builds_through_image_contents(nix_files, busybox_dir, tmp_path):
    """The package set of the flake's VM test, as the module gets it, resolved
    and built with the flake's lib (that is, the service's helper)."""
    node = ('(outputs.checks."x86_64-linux".nixos.nodes.machine { inherit pkgs lib; config = { }; })'
            '.services.nixery')
    settings = flake_value(nix_files, f"{{ inherit ({node}) enable pkgsPath; }}", busybox_dir=busybox_dir)
    pkgs_path = settings["pkgsPath"]
    assert pkgs_path.startswith("/nix/store/") and Path(pkgs_path).exists()

    # What the service would get in the VM, validated by Nixery.
    env = evaluate_module(nix_files, {"pkgsPath": pkgs_path})["config"]["environment"]
    assert nixery_config.load(env).source.argument == pkgs_path

    resolved = flake_value(nix_files, 'outputs.lib.resolve { inherit pkgsPath; '
                                      'packages = [ "hello" "no-such-package" ]; optional = [ "cacert" ]; '
                                      'system = builtins.currentSystem; }',
                           busybox_dir=busybox_dir, argstr={"pkgsPath": pkgs_path})
    assert resolved["unknown"] == ["no-such-package"]
    assert set(resolved["packages"]) == {"hello"}

    expr_file = tmp_path / "contents.nix"
    expr_file.write_text(
        "{ flakeOutputs, stub, root, busyboxDir, pkgsPath }:\n"
        "let f = import (/. + flakeOutputs) { inherit stub root busyboxDir; };\n"
        "in f.outputs.lib.imageContents { inherit pkgsPath; packages = [ \"hello\" ]; system = builtins.currentSystem; }\n")
    args = ["nix-build", str(expr_file), "--no-out-link"]
    for name, value in {"flakeOutputs": nix_files["flakeOutputs"], "stub": nix_files["stub"], "root": ROOT,
                        "busyboxDir": busybox_dir, "pkgsPath": pkgs_path}.items():
        args += ["--argstr", name, str(value)]
    outputs = run(*args).split()
    hello_out = resolved["packages"]["hello"]
    hello_out = hello_out if isinstance(hello_out, str) else hello_out["out"]
    assert outputs == [hello_out] and outputs[0].endswith("-hello-tiny")
    hello = Path(outputs[0]) / "bin" / "hello"
    assert run(str(hello)).strip() == "Hello from Nixery"

# Nixery, the Python application: the one Nix package definition. The flake's
# package, dev shell and container image all take it (and its dependency lists)
# from here.
#
#   nix-build                                   # with <nixpkgs>
#   nix-build --arg pkgs 'import /path/to/nixpkgs { }'
#   pkgs.callPackage ./default.nix { }          # from an overlay or another package set
#
# Every argument has a default taken from `pkgs`, so the file works both as a
# plain `nix-build` entry point and with `callPackage` (which fills them in).
{
  pkgs ? import <nixpkgs> { },
  lib ? pkgs.lib,
  python3Packages ? pkgs.python3Packages,
  nix ? pkgs.nix,
  git ? pkgs.git,
  coreutils ? pkgs.coreutils,
}:

let
  # setup.py's install_requires, as nixpkgs names them. GCS support is always
  # included here (it is the `gcs` extra for pip users).
  dependencies =
    ps: with ps; [
      falcon
      gunicorn
      google-cloud-storage
      google-auth
      pygit2
      networkx
      isal
      prometheus-client
      bcrypt
      pyjwt
      cryptography
      rapidfuzz
    ];

  # setup.py's `test` extra: what the test suite imports besides Nixery's own dependencies.
  testDependencies =
    ps: with ps; [
      pytest
      pytest-xdist
      requests
      gcp-storage-emulator
      websocket-client
      kubernetes-validate
      pyyaml
      packaging
    ];

  # The tests that need neither a network, a Nix store nor root: run at build time.
  offlineTests = [
    "tests/test_image.py"
    "tests/test_layers.py"
    "tests/test_config.py"
    "tests/test_rootfs.py"
  ];
in
python3Packages.buildPythonApplication {
  pname = "nixery";
  # nixery/__init__.py's __version__, which setup.py repeats.
  version = lib.head (
    builtins.match ''.*__version__ = "([^"]+)".*'' (builtins.readFile ./nixery/__init__.py)
  );
  pyproject = true;

  # Only what the build and its offline tests need, so that editing the other
  # tests, the README or the Nix files does not rebuild the package.
  src = lib.fileset.toSource {
    root = ./.;
    fileset = lib.fileset.unions (
      [
        ./setup.py
        ./nixery
        ./static
        ./pytest.ini
        # What the offline tests import besides nixery (tests/test_nix_package_source.py checks).
        ./tests/conftest.py
        ./tests/pkgset.py
        ./tests/support.py
        (lib.fileset.maybeMissing ./setup.cfg)
        (lib.fileset.maybeMissing ./pyproject.toml)
        (lib.fileset.maybeMissing ./MANIFEST.in)
        (lib.fileset.maybeMissing ./README.md)
        ./LICENSE
      ]
      ++ map (test: ./. + "/${test}") offlineTests
    );
  };

  build-system = [ python3Packages.setuptools ];
  dependencies = dependencies python3Packages;

  # The service runs nix-instantiate, nix-build and `nix path-info`/`nix copy`;
  # git is there for the ssh and credential helpers of git package sources.
  makeWrapperArgs = [
    "--prefix"
    "PATH"
    ":"
    (lib.makeBinPath [
      nix
      git
      coreutils
    ])
  ];

  nativeCheckInputs = [ python3Packages.pytestCheckHook ] ++ testDependencies python3Packages;
  enabledTestPaths = offlineTests;
  # The server, GCS, and the module of each subcommand (`nixery gc`, `build`, `push`, `popularity`).
  pythonImportsCheck = [
    "nixery"
    "nixery.app"
    "nixery.preflight"
    "nixery.storage.gcs"
    "nixery.gc_command"
    "nixery.export"
    "nixery.push"
    "nixery.popularity"
  ];

  # The Nix helper and the web page are package data: without them the service cannot work.
  postInstall = ''
    for file in nixery/nix/helper.nix nixery/static/page.html; do
      test -f "$out/${python3Packages.python.sitePackages}/$file" || {
        echo "$file is missing from the package (package_data in setup.py)" >&2
        exit 1
      }
    done
  '';

  passthru = {
    # Functions of a Python package set, for the flake's dev shell (and anyone
    # building an environment around Nixery) instead of a second list.
    inherit dependencies testDependencies;
  };

  meta = {
    description = "Container registry that builds images on demand with Nix";
    longDescription = ''
      Nixery serves container images whose contents are named in the image
      name: pulling HOST/shell/git/htop builds, with Nix, an image holding
      a shell, git and htop from nixpkgs (or from another package set).
      This is the Python implementation, not nixpkgs' `nixery` (Go).
    '';
    # No homepage: this project has no public address yet, and nixery.dev is
    # the original (Go) Nixery's.
    license = lib.licenses.mit;
    mainProgram = "nixery";
    platforms = lib.platforms.linux;
  };
}

# Nixery, the Python application.
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

python3Packages.buildPythonApplication {
  pname = "nixery";
  # nixery/__init__.py's __version__, which setup.py repeats.
  version = lib.head (
    builtins.match ''.*__version__ = "([^"]+)".*'' (builtins.readFile ./nixery/__init__.py)
  );
  pyproject = true;

  # Only what the build needs, so that editing the tests, the README or the
  # Nix files does not rebuild the package.
  src = lib.fileset.toSource {
    root = ./.;
    fileset = lib.fileset.unions [
      ./setup.py
      ./nixery
      ./static
      (lib.fileset.maybeMissing ./setup.cfg)
      (lib.fileset.maybeMissing ./pyproject.toml)
      (lib.fileset.maybeMissing ./MANIFEST.in)
      (lib.fileset.maybeMissing ./README.md)
      (lib.fileset.maybeMissing ./LICENSE)
    ];
  };

  build-system = [ python3Packages.setuptools ];

  dependencies = with python3Packages; [
    falcon
    gunicorn
    google-cloud-storage
    google-auth
    pygit2
    networkx
    isal
    prometheus-client
  ];

  # The service runs nix-instantiate, nix-store and `nix path-info`; git is
  # there for the ssh and credential helpers of git package sources.
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

  # The test suite drives a real Nix store (and a daemon), which the build
  # sandbox does not have; importing the modules is checked instead.
  doCheck = false;
  pythonImportsCheck = [
    "nixery"
    "nixery.app"
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

  meta = {
    description = "Container registry that builds images on demand with Nix";
    longDescription = ''
      Nixery serves container images whose contents are named in the image
      name: pulling HOST/shell/git/htop builds, with Nix, an image holding
      a shell, git and htop from nixpkgs (or from another package set).
    '';
    homepage = "https://nixery.dev";
    license = lib.licenses.mit;
    mainProgram = "nixery";
    platforms = lib.platforms.linux;
  };
}

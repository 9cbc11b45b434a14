"""`nixery` / `python -m nixery`: validate the configuration, then serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from . import __version__, config as configuration

# A mistake in the configuration (a bad value, an unknown NIXERY_ variable) stops start-up with
# sysexits.h's EX_CONFIG: starting again cannot get past it, so the NixOS unit names this status in
# RestartPreventExitStatus instead of restarting every few seconds for ever. Whatever else stops
# start-up (storage, Nix, the port, a configured file not there yet) may pass by itself:
# EXIT_CANNOT_SERVE, and systemd tries again.
EXIT_CONFIG = 78
EXIT_CANNOT_SERVE = 2


def _help_text() -> str:
    lines = ["Configuration comes from the environment (read once, at start-up):", ""]
    for var in configuration.VARIABLES:
        default = f" (default: {var.default})" if var.default else ""
        secret = " Secret: never logged or shown." if var.secret else ""
        lines.append(f"  {var.name:<28} {var.help}{default}{secret}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["popularity"]:
        from .popularity import main as popularity_main
        return popularity_main(argv[1:])
    if argv[:1] == ["gc"]:
        from .gc_command import main as gc_main
        return gc_main(argv[1:])
    if argv[:1] == ["build"]:
        from .export import main as build_main
        return build_main(argv[1:])
    if argv[:1] == ["push"]:
        from .push import main as push_main
        return push_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="nixery",
        description="A container registry that builds images on demand with Nix: "
                    "pulling HOST/shell/git gives an image holding those nixpkgs packages.",
        epilog=_help_text() + "\n\n`nixery popularity --help`: compute popularity data for a package set."
               "\n`nixery build --help`: write an image to a file; `nixery push --help`: push it to a registry."
               "\n`nixery gc --help`: collect storage once.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nixery {__version__}")
    parser.add_argument("--check-config", action="store_true",
                        help="a dry run of start-up: validate the configuration (an unknown NIXERY_ variable is an "
                             "error), check that Nix can build, storage can be written and the port bound, evaluate "
                             "the package set once, print the configuration (secrets redacted), then \"ok\"")
    args = parser.parse_args(argv)
    try:
        config = configuration.load(os.environ)
    except configuration.ConfigError as e:
        print(f"nixery: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG if e.lasting else EXIT_CANNOT_SERVE
    from . import logs, preflight
    logs.setup(config.log_level, config.log_format)
    from .app import create_app, make_nix, make_source, make_storage, with_platforms
    from .popularity import PopularityError
    from .storage import StorageError
    try:
        storage = make_storage(config)
    except StorageError as e:
        print(f"nixery: storage cannot be used: {e}", file=sys.stderr)
        return EXIT_CANNOT_SERVE
    # The set is evaluated by a dry run, and at start-up where that is cheap: a local set.
    nix = make_nix(config)
    source = preflight.SourceCheck(
        resolve=lambda: make_source(config).resolve("latest"),
        names=lambda source_args: nix.attribute_names(source_args, None)[""],
        evaluate=args.check_config or config.source.kind is configuration.SourceKind.PATH,
        strict=args.check_config)
    findings = preflight.run(config, os.environ, storage, source, dry_run=args.check_config)
    for finding in findings:
        if finding.fatal:
            print(f"nixery: {finding.message}", file=sys.stderr)
        else:
            logging.getLogger("nixery.preflight").warning(finding.message)
    fatal = [finding for finding in findings if finding.fatal]
    if fatal:
        return EXIT_CONFIG if any(finding.lasting for finding in fatal) else EXIT_CANNOT_SERVE
    # Nix's platforms are read here, once: the workers inherit the result.
    config = with_platforms(config)
    if args.check_config:
        import json
        print(json.dumps(config.summary(), indent=2))
        print("ok")
        return 0
    try:
        # Each worker builds its own app after the fork; building one here first
        # turns bad popularity data into a start-up error.
        create_app(config, storage)
    except (StorageError, PopularityError) as e:
        print(f"nixery: {e}", file=sys.stderr)
        return EXIT_CANNOT_SERVE
    from .server import run
    run(config, create_app, example_image(config.source.kind, source.offered))
    return 0


def example_image(kind: configuration.SourceKind, offered: Optional[Sequence[str]]) -> str:
    """The name the start-up line suggests pulling: shell/hello where the set has hello (nixpkgs
    does; a set not evaluated yet is assumed to be nixpkgs-like), else shell."""
    if offered is None:
        return "shell/hello" if kind is not configuration.SourceKind.PATH else "shell"
    if "hello" not in offered:
        return "shell"
    return "shell/hello" if {"bashInteractive", "coreutils"} <= set(offered) else "hello"


if __name__ == "__main__":
    sys.exit(main())

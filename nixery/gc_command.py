"""`nixery gc [--dry-run]`: one collection of storage now, whatever the interval, with the
server's configuration; prints what it removed and kept (nixery/gc_schedule.py runs the server's)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .collector import Collector, describe
from .gc_schedule import collect_once


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`nixery gc`: one collection now, whatever the interval (the configuration is the server's)."""
    parser = argparse.ArgumentParser(
        prog="nixery gc",
        description="Runs one collection of storage under NIXERY_STORAGE_LIMIT and NIXERY_STORAGE_MAX_AGE "
                    "(configured as for the server) and prints what it removed and kept.")
    parser.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    args = parser.parse_args(argv)
    from . import cli, config as configuration
    from .app import make_storage
    from .pulls import Pulls
    from .storage import StorageError
    try:
        config = cli.load()
        storage = make_storage(config)
    except (configuration.ConfigError, StorageError) as e:
        print(f"nixery gc: {e}", file=sys.stderr)
        return 2
    collector = Collector(storage, config.gc)
    pulls = Pulls(storage, config.state, config.gc.grace)
    try:
        report = collector.collect(dry_run=True) if args.dry_run else collect_once(storage, collector)
    except StorageError as e:
        print(f"nixery gc: {e}", file=sys.stderr)
        return 1
    if report is None:
        print("nixery gc: another collection is running (the lease is held); try again later", file=sys.stderr)
        return 1
    for line in describe(report, lambda digest: pulls.known(digest) or ""):
        print(line)
    return 0

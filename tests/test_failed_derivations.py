"""The table of failed derivations (nixery/failures.py, in the store of nixery/state.py) on its own: shared by every reader of the
state directory (the workers), kept for the TTL, and bounded whatever is remembered."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid

import pytest

from pkgset import BUSYBOX
from support import NIX_ENV
from nixery.config import StateLayout
from nixery.failures import DERIVATION_CAPACITY, DERIVATION_RECORD_SIZE, FailedDerivations
from nixery.nix import BuildFailed, BuildTimedOut, Nix


def failure(i: int) -> BuildFailed:
    drv = f"/nix/store/{i:032d}-pkg-{i}.drv"
    return BuildFailed("", f"some output\nerror: builder for '{drv}' failed with exit code 3;\nmore", drv)


def test_a_failure_is_seen_by_another_worker_until_its_ttl(tmp_path, monkeypatch):
    one, other = (FailedDerivations(StateLayout.under(tmp_path), 60) for _ in range(2))
    assert other.recall() == {}
    one.remember(failure(1))
    drv = "/nix/store/00000000000000000000000000000001-pkg-1.drv"
    [(key, error)] = other.recall().items()
    assert key == error.derivation == drv and type(error) is BuildFailed
    assert error.log == f"error: builder for '{drv}' failed with exit code 3;", "Nix's line, for the next image's reason"
    slow = "/nix/store/00000000000000000000000000000002-slow.drv"
    line = f"error: building of '{slow}!out' from .drv file timed out after 60 seconds"
    one.remember(BuildTimedOut(f"building failed: {line}", f"building '{slow}'...\n{line}\n", slow))
    timed_out = other.recall()[slow]
    assert type(timed_out) is BuildTimedOut and timed_out.reason == f"building failed: {line}"
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)
    assert other.recall() == {}, "forgotten after the TTL"


def test_the_table_stays_bounded_and_keeps_the_newest(tmp_path):
    memory = FailedDerivations(StateLayout.under(tmp_path), 60)
    capacity = DERIVATION_CAPACITY
    for i in range(capacity * 3):
        memory.remember(failure(i))
    kept = memory.recall()
    assert StateLayout.under(tmp_path).store.stat().st_size <= capacity * DERIVATION_RECORD_SIZE
    assert len(kept) > capacity // 2
    assert f"/nix/store/{capacity * 3 - 1:032d}-pkg-{capacity * 3 - 1}.drv" in kept


def test_nothing_is_kept_without_a_ttl(tmp_path):
    memory = FailedDerivations(StateLayout.under(tmp_path), 0)
    memory.remember(failure(1))
    assert memory.recall() == {} and not StateLayout.under(tmp_path).store.exists()


def test_a_builder_cannot_blame_another_derivation(tmp_path, monkeypatch):
    """A builder (the code of any commit a client names) prints Nix's failure line naming another
    derivation before failing: the failure is its own, and only its own is remembered, so that the
    other derivation's images still build."""
    for key, value in NIX_ENV.items():
        monkeypatch.setenv(key, value)
    bindir = tmp_path / "set" / "busybox-static" / "bin"
    bindir.mkdir(parents=True)
    shutil.copy2(BUSYBOX, bindir / "busybox")
    salt = uuid.uuid4().hex
    (tmp_path / "set" / "default.nix").write_text(f'''
let
  bbdir = builtins.path {{ path = ./busybox-static; name = "busybox-static"; }};
  mk = name: script: derivation {{ inherit name; system = builtins.currentSystem; builder = "${{bbdir}}/bin/busybox";
    args = [ "sh" "-c" script ]; salt = "{salt}"; }};
in rec {{
  victim = mk "victim" "echo ok > $out";
  forger = mk "forger" ("echo \\"error: builder for '${{builtins.unsafeDiscardStringContext victim.drvPath}}' "
    + "failed with exit code 1;\\" >&2; exit 1");
}}''')

    def instantiate(attribute: str) -> str:
        return subprocess.run(["nix-instantiate", str(tmp_path / "set"), "-A", attribute], check=True,
                              capture_output=True, text=True).stdout.strip()

    victim, forger = instantiate("victim"), instantiate("forger")
    with pytest.raises(BuildFailed) as failed:
        Nix(60, tmp_path / "gcroots").realise([f"{forger}!out"])
    assert failed.value.derivation == forger and victim not in failed.value.reason, failed.value.reason
    memory = FailedDerivations(StateLayout.under(tmp_path), 60)
    memory.remember(failed.value)
    assert list(memory.recall()) == [forger]
    assert victim not in memory.recall()[forger].reason

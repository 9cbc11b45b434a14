"""The state database (nixery/state.py) when things go wrong: a worker killed in the middle of a
write, a database left by another version, many threads of many processes writing at once."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from nixery.stats import BuildStats
from nixery.config import StateLayout
from nixery.history import BuildHistory, entry
from nixery.memo import CAPACITY, BuildMemo
from nixery.state import BUSY_TIMEOUT, SCHEMA_VERSION

from support import ROOT

# A worker that records one build, then starts recording another and is killed before it commits.
HOLDER = """
import sys, time
from pathlib import Path
from nixery.stats import BuildStats
from nixery.config import StateLayout
from nixery.history import BuildHistory, entry
from nixery.state import Store

state = StateLayout.under(Path(sys.argv[1]))
BuildHistory(state).record(entry(BuildStats(image="committed"), time.time()))
with Store.at(state.store).write() as connection:
    connection.execute("INSERT INTO builds (item) VALUES (?)", ('{"image": "never-committed"}',))
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_worker_killed_holding_a_write_leaves_the_store_readable_and_writable(tmp_path):
    state = StateLayout.under(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "holding"
        history = BuildHistory(state)
        # WAL: a reader does not wait for the writer, and sees only what was committed.
        assert [b["image"] for b in history.builds()] == ["committed"]
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert [b["image"] for b in BuildHistory(state).builds()] == ["committed"], "the half-made write is gone"
    start = time.monotonic()
    history.record(entry(BuildStats(image="after"), time.time()))
    assert time.monotonic() - start < BUSY_TIMEOUT / 2, "the dead writer's lock went with it"
    assert [b["image"] for b in history.builds()] == ["after", "committed"]
    with sqlite3.connect(state.store) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_database_of_another_version_starts_afresh(tmp_path):
    state = StateLayout.under(tmp_path)
    with sqlite3.connect(state.store) as old:
        old.execute("CREATE TABLE builds (line TEXT)")
        old.execute("INSERT INTO builds VALUES ('an older version wrote this')")
        old.execute(f"PRAGMA user_version={SCHEMA_VERSION - 1}")
    assert BuildHistory(state).builds() == []
    BuildMemo(state).remember("key", "sha256:" + "0" * 64)
    assert BuildMemo(state).recall("key", time.time()) == "sha256:" + "0" * 64


def _write_from_threads(store_dir: str, worker: int) -> None:
    history = BuildHistory(StateLayout.under(Path(store_dir)), builds_kept=10_000)

    def write(thread: int) -> None:
        for i in range(20):
            history.record(entry(BuildStats(image=f"w{worker}/t{thread}/n{i}", reason="why", status=500),
                                 time.time()))

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_threads_of_several_processes_lose_no_write(tmp_path):
    with multiprocessing.get_context("fork").Pool(3) as pool:
        pool.starmap(_write_from_threads, [(str(tmp_path), w) for w in range(3)])
    history = BuildHistory(StateLayout.under(tmp_path))
    images = [b["image"] for b in history.builds()]
    assert len(set(images)) == len(images) == 3 * 8 * 20
    assert len(history.errors()) == 20, "errors_kept of the failed builds, the newest"


def test_the_build_memo_keeps_its_newest_entries_only(tmp_path):
    memo = BuildMemo(StateLayout.under(tmp_path))
    for i in range(CAPACITY + 10):
        memo.remember(f"key {i}", f"sha256:{i:064x}")
    now = time.time()
    assert memo.recall("key 9", now) is None, "the oldest entries are collected"
    assert memo.recall(f"key {CAPACITY + 9}", now) == f"sha256:{CAPACITY + 9:064x}"
    assert memo.store.query("SELECT count(*) FROM build_memo") == [(CAPACITY,)]

"""Atomic files and folders, and the locks that keep shared caches and run directories single-writer."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from cft_adapters.errors import CftError
from cft_adapters.util.fs import RunLock, build_cached_dir, write_atomic


def _build_slowly(target: str, log: str) -> None:
    def build(tmp: Path) -> None:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # long enough for the other process to arrive while this one builds
        (tmp / "weights.bin").write_bytes(b"x" * 10)
        (tmp / "config.json").write_text("{}")

    build_cached_dir(Path(target), build, ready="config.json")


def test_concurrent_builders_of_one_cache_entry_build_it_once(tmp_path) -> None:
    target, log = tmp_path / "cache" / "model-abc", tmp_path / "builds.log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_build_slowly, args=(str(target), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(log.read_text().splitlines()) == 1
    assert sorted(os.listdir(target)) == ["config.json", "weights.bin"]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".model-abc-")]  # no temp left


def test_an_incomplete_cache_entry_is_moved_aside_and_rebuilt(tmp_path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_text("half")  # an older build cut short: no config.json
    build_cached_dir(target, lambda tmp: (tmp / "config.json").write_text("{}"), ready="config.json")
    assert (target / "config.json").is_file()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("model.incomplete-")]
    assert len(aside) == 1 and (aside[0] / "weights.bin").read_text() == "half"


def test_a_failed_build_leaves_nothing_behind(tmp_path) -> None:
    def broken(tmp: Path) -> None:
        (tmp / "part").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_cached_dir(tmp_path / "m", broken, ready="config.json")
    assert not (tmp_path / "m").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_written_files_get_the_umask_mode(tmp_path) -> None:
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


def _hold(run_dir: str, ready: str) -> None:
    lock = RunLock(Path(run_dir))
    lock.acquire()
    Path(ready).write_text("held")
    time.sleep(30)


def test_a_held_run_lock_names_its_holder(tmp_path) -> None:
    run, ready = tmp_path / "run", tmp_path / "ready"
    run.mkdir()
    proc = multiprocessing.get_context("spawn").Process(target=_hold, args=(str(run), str(ready)))
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline, "timed out waiting for the holder"
            time.sleep(0.05)
        with pytest.raises(CftError, match=rf"in use by pid {proc.pid} on .*\.cft\.lock"):
            RunLock(run).acquire()
    finally:
        proc.kill()
        proc.join()
    lock = RunLock(run)  # the OS released the dead holder's lock
    lock.acquire()
    lock.release()

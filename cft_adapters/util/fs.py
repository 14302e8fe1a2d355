"""Atomic files and directories, and the locks that make shared folders safe to build.

Everything written goes to a temporary sibling first, is fsynced, then renamed into place, so a
reader (or a process killed halfway) only ever sees the old file or the complete new one. Files and
folders get the mode the user's umask gives (mkstemp/mkdtemp alone would make them private).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cft_adapters.errors import CftError


def _umask() -> int:
    """The process umask, read without changing it (Linux reports it in /proc/self/status; setting and
    restoring it would open a window in which another thread creates world-writable files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # elsewhere: the brief window errs on the private side
    os.umask(mask)
    return mask


def cache_dir() -> Path:
    """Where built models, scans and probes are cached: $CFT_CACHE_DIR, else ~/.cache/cft_adapters."""
    return Path(os.environ.get("CFT_CACHE_DIR", Path.home() / ".cache" / "cft_adapters"))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for a library to write to (a plot, a binary file); renamed
    over `path` when the block ends without an error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        fsync_path(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            fsync_path(path)
    fsync_path(root)


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh temporary folder beside the target (same filesystem, so the rename is atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def publish_dir(tmp: Path, target: Path) -> None:
    """Give `tmp`'s files the umask's modes (libraries such as safetensors write private files),
    fsync it, and rename it to `target` (which must not exist) in one step."""
    mask = _umask()
    for path in tmp.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    os.chmod(tmp, 0o777 & ~mask)
    fsync_tree(tmp)
    os.rename(tmp, target)
    fsync_path(target.parent)


def stamped_path(parent: Path, stem: str) -> Path:
    """`parent/<stem>-<timestamp>`, with `-2`, `-3`... appended when that name is taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = parent / f"{stem}-{stamp}", 1
    while path.exists():
        n += 1
        path = parent / f"{stem}-{stamp}-{n}"
    return path


def move_aside(path: Path, reason: str) -> Path:
    """Rename `path` to `<name>.<reason>-<timestamp>` beside it; never deletes. Returns the new path."""
    aside = stamped_path(path.parent, f"{path.name}.{reason}")
    os.rename(path, aside)
    return aside


@contextlib.contextmanager
def file_lock(lock_path: Path, timeout: float = -1) -> Iterator[None]:
    """An exclusive lock (filelock) held for the block; released when the process dies."""
    from filelock import FileLock

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path), timeout=timeout):
        yield


def build_cached_dir(target: Path, build: Callable[[Path], None], *, ready: str) -> Path:
    """Build a shared cache folder once, safe against concurrent builders and kills.

    `ready` names the file whose presence means the folder is complete. Builders take a lock beside
    the folder, build into a temporary sibling and rename it into place; a second process waits on
    the lock and then finds the folder ready. A folder left incomplete by an older version is moved
    aside, never deleted."""
    if (target / ready).is_file():
        return target
    with file_lock(target.with_name(f".{target.name}.lock")):
        if (target / ready).is_file():
            return target
        if target.exists():
            move_aside(target, "incomplete")
        tmp = make_temp_dir(target.parent, f".{target.name}-")
        try:
            build(tmp)
            publish_dir(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


class RunLock:
    """The exclusive lock one `cft-train` holds on its run directory for the whole run.

    The lock itself is a filelock on `<run>/.cft.lock` (released by the OS if the process dies);
    `<run>/.cft.lock.json` says who holds it, so a second process can name the holder."""

    LOCK = ".cft.lock"
    HOLDER = ".cft.lock.json"
    _held: set[str] = set()  # run directories this process holds

    @classmethod
    def held_here(cls, run_dir: Path) -> bool:
        return str(run_dir.resolve()) in cls._held

    def __init__(self, run_dir: Path):
        from filelock import FileLock

        self.run_dir = run_dir
        self._lock = FileLock(str(run_dir / self.LOCK), timeout=0)

    def acquire(self) -> None:
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            raise CftError(f"{self.run_dir}: in use by {self.holder()} (lock {self.run_dir / self.LOCK}); "
                           f"one process owns a run directory. Wait for it, or use another output_dir.") from None
        try:
            write_atomic(self.run_dir / self.HOLDER, json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        except BaseException:
            self._lock.release()
            raise
        RunLock._held.add(str(self.run_dir.resolve()))

    def holder(self) -> str:
        try:
            info = json.loads((self.run_dir / self.HOLDER).read_text())
            return f"pid {info['pid']} on {info['host']} (since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        if self._lock.is_locked:
            (self.run_dir / self.HOLDER).unlink(missing_ok=True)
            RunLock._held.discard(str(self.run_dir.resolve()))
            self._lock.release()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

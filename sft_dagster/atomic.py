"""Atomic writes: every file and folder the pipeline publishes appears whole or not at all.

A reader (a later stage, another run, the CLI, a person) sees the old content or the new one, never
half of a file: content goes to a uniquely named temp file in the same folder, is flushed and fsynced,
then renamed over the target (`os.replace`, atomic on POSIX within one filesystem). Folders (adapters,
checkpoints, registry versions) are built under a temp name and renamed into place the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", validate: Callable[[Path], Any] | None = None,
                **open_kwargs) -> Iterator[IO]:
    """Open a temp file beside `path`; on a clean exit it replaces `path` (fsynced), on error it is removed.

    `validate(temp_path)` runs on the complete new content before the rename: when it raises, `path`
    keeps its old content and the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if validate is not None:
            validate(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[Path]:
    """An exclusive lock for a read-modify-replace of `path`, held on the lock file `<path>.lock` beside it.

    `fcntl.flock` (Linux and macOS): a process that dies releases its lock with its file descriptor, so a
    crash never leaves the file locked. The lock file stays (removing it would race with the next locker).
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield lock
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_file(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    return Path(path)


def write_json(path: str | Path, obj: Any, **dumps_kwargs) -> Path:
    dumps_kwargs = {"indent": 2, "default": str} | dumps_kwargs
    return write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def write_parquet(path: str | Path, df) -> Path:
    """A DataFrame as Parquet (pyarrow), atomically."""
    with atomic_file(path, "wb") as fh:
        df.to_parquet(fh, engine="pyarrow", index=False)
    return Path(path)


def write_csv(path: str | Path, df) -> Path:
    with atomic_file(path, "w", encoding="utf-8", newline="") as fh:
        df.to_csv(fh, index=False)
    return Path(path)


def torch_save(path: str | Path, obj: Any) -> Path:
    import torch

    with atomic_file(path, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder under a temp name beside `path`; on a clean exit it replaces `path`.

    An existing `path` is first moved aside and removed after the new folder is in place, so at every
    moment `path` is either the complete old folder, absent for the instant between two renames, or the
    complete new one; never a mix. On error the temp folder is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in tmp.rglob("*"):
        if f.is_file():
            with contextlib.suppress(OSError):
                fd = os.open(f, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.old"
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def locked(path: str | Path, timeout: float = 60.0) -> Iterator[Path]:
    """Hold an exclusive lock on `<path>.lock` (a lock file beside `path`) for a read-modify-replace.

    `fcntl.flock` locks (Linux and macOS) are released by the kernel when the holder exits or is killed,
    so a crashed writer never leaves the file locked. Waits up to `timeout` seconds, then raises
    TimeoutError naming the lock file.
    """
    import fcntl
    import time

    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{lock_path}: still locked by another writer after {timeout:.0f} s") from None
                time.sleep(0.02)
        yield lock_path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


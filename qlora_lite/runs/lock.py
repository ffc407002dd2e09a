"""One process owns a run folder: an exclusive flock on `<run>/.qlora-lite.lock`.

Two `qlora-lite run`s into one output.dir would interleave metrics and checkpoints of two
runs; an export of a folder being trained would read a half-trained adapter. The lock is
taken before anything is written and held to the end. It is an OS lock on an open file, so
the kernel releases it when the process dies, kill -9 included: a stale lock file never
blocks anyone. The holder writes its PID and command into the file so that the refusal can
say who holds it. The file itself stays (deleting it would let a second process lock a new
file of the same name while the first still holds the old one).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
from pathlib import Path

from ..errors import QloraError

LOCK_NAME = ".qlora-lite.lock"


class RunFolderBusy(QloraError):
    """Another process holds the run folder's lock."""


def holder(folder: str | Path) -> str:
    """What the lock file says about its holder ("PID 123, qlora-lite run, since 18:40:02")."""
    try:
        text = (Path(folder) / LOCK_NAME).read_text().strip()
    except OSError:
        text = ""
    return text or "PID unknown"


@contextlib.contextmanager
def run_lock(folder: str | Path, command: str = "run", enabled: bool = True, create: bool = True):
    """Hold the exclusive lock of run folder `folder` for the `with` body.

    Args:
        folder (str | Path): the run folder (created when missing and `create`).
        command (str): what this process does there, shown to a refused second process.
            Default "run".
        enabled (bool): False yields without locking; in a multi-process run only the
            rank that writes the folder takes the lock. Default True.
        create (bool): create the folder and lock file if missing; False for readers
            (export), which then lock only when a writer has left a lock file. Default True.

    Raises:
        RunFolderBusy: another process holds the lock; the message names its PID.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    if not enabled or (not create and not path.is_file()):
        yield
        return
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if not create and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            yield  # a read-only run folder: nothing can be writing it
            return
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(
                f"{str(folder)!r} is in use by another qlora-lite process ({holder(folder)}); wait for it "
                "to finish or stop it, or use another folder. A killed process holds nothing: the OS "
                "releases its lock.") from None
        stamp = f"PID {os.getpid()}, qlora-lite {command}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, stamp.encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def owning_run(path: str | Path) -> Path | None:
    """The run folder that `path` (a run, its adapter/ or checkpoints/step-N/adapter) lies in, if any."""
    # Lexical parents first, so messages show the folder as the user typed it.
    for p in (Path(path), Path(path).resolve()):
        for candidate in (p, *p.parents[:3]):
            if (candidate / LOCK_NAME).is_file():
                return candidate
    return None


def clear_run_folder(folder: str | Path) -> None:
    """Delete everything in `folder` except its lock file, which this process holds (`--overwrite`)."""
    for p in Path(folder).iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def has_content(folder: str | Path) -> bool:
    """Whether `folder` holds anything besides a lock file."""
    return any(p.name != LOCK_NAME for p in Path(folder).iterdir())

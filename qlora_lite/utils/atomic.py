"""Atomic file and folder writes: a crash, Ctrl-C or a full disk never leaves a half-written file.

A write that fails for lack of space (a full disk, a quota, a file-size limit) raises
NoSpaceError naming the file as it would have been called and the bytes it needed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import QloraError

# Full disk, file-size limit (ulimit -f), disk quota.
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


class NoSpaceError(QloraError):
    """A file that could not be written for lack of space; nothing half-written is left.

    Args:
        path (Path): the file as it would have been named.
        nbytes (int | None): its size, None when unknown.
        reason (str): the OS's words (e.g. "No space left on device").
        note (str): what the caller kept, e.g. the previous checkpoint. Default "".
    """

    def __init__(self, path, nbytes: int | None, reason: str, note: str = ""):
        self.path, self.nbytes, self.reason, self.note = Path(path), nbytes, reason, note
        need = f"{nbytes:,} bytes ({human_bytes(nbytes)})" if nbytes is not None else "more space than is left"
        limit = " (or raise the file-size limit, ulimit -f)" if reason == os.strerror(errno.EFBIG) else ""
        super().__init__(f"could not write {str(path)!r}: {reason}. It needed {need}; free at least that much on "
                         f"its disk{limit} and run the command again.{note}")


def human_bytes(n: int) -> str:
    """Decimal units, as disks and `df -H` count them."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def space_errno(e: BaseException) -> int | None:
    """The errno of a lack-of-space failure, also from safetensors' "os error N" messages; else None."""
    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else None
    return code if code in SPACE_ERRNOS else None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it.

    Raises NoSpaceError (the temporary file removed) when the disk, a quota or the file-size
    limit has no room for `data`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if space_errno(e):
            raise NoSpaceError(path, len(data), e.strerror) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log file in a single O_APPEND write, fsynced: a crash leaves the earlier
    lines whole and at most this one cut, which readers of such logs skip."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    except OSError as e:
        if space_errno(e):
            raise NoSpaceError(path, len(data), e.strerror) from None
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `path`; on success rename it to `path`.

    On any exception (Ctrl-C included) the temporary folder is removed and `path` is
    untouched, so readers only ever see complete folders.

    Args:
        path (str | PathLike): the final folder.
        overwrite (bool): replace an existing `path`. Default False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists; remove it or choose another output folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # Named as the user will look for it, not by the temporary folder that is gone now.
        if isinstance(e, NoSpaceError):
            raise NoSpaceError(_in_final(e.path, tmp, path), e.nbytes, e.reason, e.note) from None
        if isinstance(e, OSError) and space_errno(e):  # a writer of ours or a library's (save_pretrained)
            where = _in_final(Path(e.filename), tmp, path) if e.filename else path
            raise NoSpaceError(where, None, e.strerror) from None
        raise


def _in_final(file: Path, tmp: Path, final: Path) -> Path:
    """`file` inside the temporary folder `tmp`, renamed to where it would have been in `final`."""
    try:
        return final / Path(file).relative_to(tmp)
    except ValueError:
        return Path(file)


def require_space(path: str | os.PathLike, nbytes: int) -> None:
    """Raise NoSpaceError before a long job when the disk that will hold `path` has less than `nbytes` free."""
    where = Path(path).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < nbytes:
        raise NoSpaceError(path, nbytes, f"only {human_bytes(free)} are free on its disk")


def write_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' save_file into a folder from `atomic_dir`, lack of space raised as NoSpaceError.

    Straight to the file, not through a bytes copy: an export shard can be gigabytes.
    """
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:  # safetensors reports the OS error inside its own message
        code = space_errno(e)
        if code is None:
            raise
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        raise NoSpaceError(path, nbytes, os.strerror(code)) from None

"""Outputs that appear whole or not at all: write a temporary sibling, fsync it, rename it into place.

A reader (or a restarted job) then finds the old output or the new one, never a part: a file through
`replacing` / `write_atomically` (the batch job's results and errors, rejection's outputs), a directory
through `directory` (`convert` and `save`, whose checkpoints `load` must never half-accept).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
from collections.abc import Iterable, Iterator
from typing import BinaryIO

__all__ = ["directory", "fsync_dir", "replacing", "write_atomically"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` when the block ends without an error (`path`.tmp until then)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomically(path: str | os.PathLike, data: bytes | str | Iterable[bytes]) -> None:
    """Replace `path` by `data` (bytes, text as UTF-8, or byte lines) all at once."""
    with replacing(path) as f:
        if isinstance(data, str):
            data = data.encode()
        f.write(data if isinstance(data, bytes) else b"".join(data))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(dst: pathlib.Path) -> None:
    """Remove temporaries left by killed writers of `dst` (their process no longer runs)."""
    for p in dst.parent.glob(f".{dst.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def directory(dst: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A fresh hidden sibling `.DST.tmp-<pid>` to fill; renamed to `dst` (replacing it) when the block ends
    without an error, removed otherwise. Temporaries of writers that were killed are removed first."""
    dst = pathlib.Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

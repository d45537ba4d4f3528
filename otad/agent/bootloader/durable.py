"""Durable small-file writes: what survives a power cut is either the old or the new content.

Two ways, each with its use:

* :func:`replace_file` - write a temp file next to the target, fsync it, rename it over the
  target, fsync the directory. Atomic on POSIX file systems (ext4, tmpfs); used for the journal
  and the sim state.
* :func:`overwrite_file` - rewrite an existing file of the same size in place and fsync it. The
  file keeps its blocks, which is what GRUB's ``save_env`` needs (it writes through the file's
  block list) and what a FAT file system handles best (no directory entry is rewritten apart
  from the time stamp). Not atomic: callers keep two copies (see :mod:`.grub`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__layer__ = "adapter"


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename in it is durable (no-op where directories cannot be
    opened, which only happens on exotic file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        # FAT (vfat) rejects fsync on a directory with EINVAL on some kernels: the rename
        # itself was already issued, and the file's own fsync has run.
        pass
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Atomically replace ``path`` with ``data`` (temp, fsync, rename, fsync dir)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def overwrite_file(path: Path, data: bytes) -> None:
    """Rewrite ``path`` in place (no truncation, same blocks) and fsync it.

    The file must already have exactly ``len(data)`` bytes; otherwise FileNotFoundError or
    ValueError, and the caller falls back to :func:`replace_file`.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size != len(data):
            raise ValueError(f"{path}: has {size} bytes, expected {len(data)}")
        view = memoryview(data)
        offset = 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
        os.fsync(fd)
    finally:
        os.close(fd)

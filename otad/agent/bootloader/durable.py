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
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

__layer__ = "adapter"


@contextlib.contextmanager
def held_lock(path: Path, failed: Callable[[OSError], Exception]) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``path`` (created if missing, never the env itself) for one
    read-modify-write, so two writers (the daemon and the CLI, or ``fw_setenv``) never read
    the same env and lose one change. ``failed`` turns an OSError opening it into the
    caller's error."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise failed(exc) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last fd of the open file releases the flock


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


#: A test-only fault hook: called with a point name in the middle of an env write (after the
#: first half reached the medium). The crash matrix passes one that ends the process there.
FaultHook = Callable[[str], None]
HALF_WRITTEN = "bootloader_env_half_written"


def overwrite_file(
    path: Path,
    data: bytes,
    *,
    offset: int = 0,
    size: int | None = None,
    fault: FaultHook | None = None,
) -> None:
    """Rewrite ``path`` in place at ``offset`` (no truncation, same blocks) and fsync it.

    A regular file must already have exactly ``offset + len(data)`` bytes (``size``: the
    expected total, default that) - otherwise FileNotFoundError or ValueError, and the caller
    falls back to :func:`replace_file`. With ``fault``, the bytes up to the middle of the
    changed range are written and fsync'd, then ``fault(HALF_WRITTEN)`` runs: a torn write for
    tests (the middle of the *change*, so the tear really splits old and new content).
    """
    # read access only for the test-only tear, which looks at the bytes it replaces
    fd = os.open(path, (os.O_RDWR if fault is not None else os.O_WRONLY) | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        expected = size if size is not None else offset + len(data)
        if stat.S_ISREG(st.st_mode) and st.st_size != expected:
            raise ValueError(f"{path}: has {st.st_size} bytes, expected {expected}")
        view = memoryview(data)
        done = 0
        if fault is not None:
            half = _middle_of_change(os.pread(fd, len(data), offset), data)
            while done < half:
                done += os.pwrite(fd, view[done:half], offset + done)
            os.fsync(fd)
            fault(HALF_WRITTEN)
        while done < len(data):
            done += os.pwrite(fd, view[done:], offset + done)
        os.fsync(fd)
    finally:
        os.close(fd)


def _middle_of_change(old: bytes, new: bytes) -> int:
    """An offset in the middle of the bytes that differ between ``old`` and ``new``."""
    length = len(new)
    old = old.ljust(length, b"\0")
    first = next((i for i in range(length) if old[i] != new[i]), None)
    if first is None:
        return length // 2
    last = next(i for i in range(length - 1, -1, -1) if old[i] != new[i])
    return max(first + 1, (first + last + 1) // 2)

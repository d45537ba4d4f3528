"""Slots: where A and B live, which one runs, and the only code that writes one.

Slot layout (from the agent config, a mapping slot name -> location)::

    A = "/dev/mmcblk0p2"          a path (block device, or a pre-sized file in tests/sim)
    B = "PARTLABEL=rootfs_b"      a GPT partition name, resolved through
                                  /dev/disk/by-partlabel, then udev (pyudev), then sysfs

The booted slot comes from the kernel command line (``otad.slot=A``; RAUC's ``rauc.slot=A`` is
accepted too) and, for block-device slots, is cross-checked against the device mounted at ``/``
(``st_dev`` of ``/`` must equal the slot's ``st_rdev``): a command line that lies stops the
agent instead of pointing the writer at the running system. File-backed slots (tests, the fleet
simulator) skip the cross-check and name the booted slot with an explicit override.

:class:`SlotWriter` refuses the booted slot by identity (device number for block devices,
``(st_dev, st_ino)`` for files, never by name), refuses a mounted block device, opens without
truncating (like a partition, a slot file keeps its size), and after the last byte fsyncs, drops
the page cache for the range and re-reads it to hash what is really on the medium.
It is synchronous and meant to run in a worker thread.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import re
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from otad.agent.bootloader import SLOTS, check_slot, other_slot
from otad.errors import (
    BootedSlotWrite,
    ConfigError,
    NoSpace,
    SlotError,
    SlotNotFound,
    SlotTooSmall,
    SlotVerifyFailed,
    SlotWriteFailed,
)

__layer__ = "adapter"

log = structlog.get_logger(__name__)

CMDLINE_PATH = Path("/proc/cmdline")
BY_PARTLABEL = Path("/dev/disk/by-partlabel")
SYS_BLOCK = Path("/sys/class/block")
MOUNTINFO = Path("/proc/self/mountinfo")
# re-read buffers, reused (hashlib releases the GIL on them). Through the page cache the
# kernel's readahead batches device reads, so a small buffer costs no speed; a direct read is
# one device request, so it stays large.
_READ_CHUNK = 256 << 10
_DIRECT_READ = 1 << 20
_DIRECT_ALIGN = 4096  # O_DIRECT offsets and sizes: a multiple of any logical block size
_DROP_EVERY = 32 << 20  # re-read pages are dropped from the cache in steps of this size
_WRITEBACK_STEP = 16 << 20  # written pages are sent to the medium in steps of this size
# the writer's read-back thread flushes and re-reads the slot in steps of this size (0: only
# in finish); see _ReadBack
READ_BACK_STEP = 64 << 20
_LABEL_PREFIXES = ("PARTLABEL=", "partlabel:")
_SLOT_ARG = re.compile(r"^(?:otad|rauc)\.slot=(.*)$")


# --- layout ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotSpec:
    """One slot: a path, or a GPT partition label resolved when needed."""

    name: str
    path: Path | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        check_slot(self.name)
        if (self.path is None) == (self.label is None):
            raise ConfigError(f"slots: slot {self.name} needs exactly one of a path or a label")

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"PARTLABEL={self.label}"


class SlotLayout:
    """The two slots of a device."""

    def __init__(
        self,
        slots: Mapping[str, SlotSpec],
        *,
        by_partlabel: Path = BY_PARTLABEL,
        sys_block: Path = SYS_BLOCK,
        dev_dir: Path = Path("/dev"),
    ) -> None:
        if set(slots) != set(SLOTS):
            raise ConfigError(f"slots: need exactly the slots {SLOTS}, got {sorted(slots)}")
        self.slots = dict(slots)
        self._by_partlabel = by_partlabel
        self._sys_block = sys_block
        self._dev_dir = dev_dir

    @classmethod
    def from_config(cls, mapping: Mapping[str, str], **kwargs: Path) -> SlotLayout:
        """``{"A": "/dev/vda2", "B": "PARTLABEL=rootfs_b"}`` -> a layout."""
        specs: dict[str, SlotSpec] = {}
        for name, where in mapping.items():
            if name not in SLOTS:
                raise ConfigError(f"slots: unknown slot name {name!r} (use A and B)")
            if not isinstance(where, str) or not where.strip():
                raise ConfigError(f"slots: slot {name} has an empty location")
            label = next((where[len(p) :] for p in _LABEL_PREFIXES if where.startswith(p)), None)
            if label is not None:
                if not label or "/" in label:
                    raise ConfigError(f"slots: slot {name} has an invalid label {label!r}")
                specs[name] = SlotSpec(name, label=label)
            else:
                specs[name] = SlotSpec(name, path=Path(where))
        return cls(specs, **kwargs)

    def other(self, slot: str) -> str:
        return other_slot(slot)

    def path(self, slot: str) -> Path:
        """The slot's file or device node (labels resolved now; SlotNotFound if absent)."""
        spec = self.slots[check_slot(slot)]
        if spec.path is not None:
            return spec.path
        assert spec.label is not None  # guaranteed by SlotSpec.__post_init__
        return self._resolve_label(spec.label, slot)

    def _resolve_label(self, label: str, slot: str) -> Path:
        link = self._by_partlabel / label
        if link.exists():
            return link.resolve()
        found = _udev_lookup(label) or _sysfs_lookup(label, self._sys_block, self._dev_dir)
        if found is not None:
            return found
        raise SlotNotFound(
            f"slots: no partition labelled {label!r} for slot {slot} "
            f"(looked in {self._by_partlabel}, udev and {self._sys_block})",
            slot=slot,
        )


def _udev_lookup(label: str) -> Path | None:
    try:
        import pyudev
    except ImportError:  # pragma: no cover - pyudev is a dependency
        return None
    try:
        context = pyudev.Context()
        for device in context.list_devices(subsystem="block", DEVTYPE="partition"):
            if device.get("ID_PART_ENTRY_NAME") == label and device.device_node:
                return Path(device.device_node)
    except (OSError, pyudev.DeviceNotFoundError, ImportError):
        return None
    return None


def _sysfs_lookup(label: str, sys_block: Path, dev_dir: Path) -> Path | None:
    """GPT partition names are in each partition's ``uevent`` as PARTNAME= (no udev needed)."""
    try:
        entries = sorted(sys_block.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            lines = (entry / "uevent").read_text().splitlines()
        except OSError:
            continue
        fields = dict(line.split("=", 1) for line in lines if "=" in line)
        if fields.get("PARTNAME") == label and fields.get("DEVNAME"):
            return dev_dir / fields["DEVNAME"]
    return None


# --- the booted slot -------------------------------------------------------------------------


def slot_from_cmdline(cmdline: str) -> str | None:
    """The slot named by ``otad.slot=`` (preferred) or ``rauc.slot=``; None when absent.

    SlotError when the value is not a slot name or two arguments disagree.
    """
    found: dict[str, str] = {}
    for arg in cmdline.split():
        if arg == "--":  # everything after is for init, not the kernel
            break
        m = _SLOT_ARG.match(arg)
        if m:
            key = arg.split(".", 1)[0]
            value = m.group(1)
            if value not in SLOTS:
                raise SlotError(f"slots: kernel command line names an unknown slot: {arg!r}")
            if key in found and found[key] != value:
                raise SlotError(f"slots: kernel command line names two slots: {key}.slot")
            found[key] = value
    if "otad" in found and "rauc" in found and found["otad"] != found["rauc"]:
        raise SlotError(
            f"slots: kernel command line disagrees: otad.slot={found['otad']} "
            f"rauc.slot={found['rauc']}"
        )
    return found.get("otad") or found.get("rauc")


def booted_slot(
    layout: SlotLayout,
    *,
    override: str | None = None,
    cmdline_path: Path = CMDLINE_PATH,
    root: Path = Path("/"),
) -> str:
    """The running slot: the override, else the kernel command line, cross-checked against /.

    SlotError when nothing names the slot, or when ``/`` is on the other slot's device.
    """
    if override is not None:
        slot = check_slot(override)
        log.info("booted_slot_detected", slot=slot, source="override")
        return slot
    try:
        named = slot_from_cmdline(cmdline_path.read_text())
    except OSError as exc:
        raise SlotError(f"slots: cannot read {cmdline_path}: {exc}") from exc
    root_dev = os.stat(root).st_dev
    on_root = [s for s in SLOTS if _rdev_of(layout, s) == root_dev]
    if named is None:
        if len(on_root) == 1:
            log.info("booted_slot_detected", slot=on_root[0], source="root device")
            return on_root[0]
        raise SlotError(
            f"slots: the kernel command line has no otad.slot= (or rauc.slot=) and {root} "
            "is on neither slot device"
        )
    other = other_slot(named)
    if on_root == [other]:
        raise SlotError(
            f"slots: kernel command line says slot {named}, but {root} is mounted from slot "
            f"{other} ({layout.slots[other].describe()}); refusing to guess"
        )
    log.info("booted_slot_detected", slot=named, source="cmdline", cross_checked=bool(on_root))
    return named


def _rdev_of(layout: SlotLayout, slot: str) -> int | None:
    try:
        st = os.stat(layout.path(slot))
    except (OSError, SlotNotFound):
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


# --- the writer --------------------------------------------------------------------------------


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...


@dataclass(frozen=True)
class WriteResult:
    size: int
    sha256: str


def _identity(st: os.stat_result) -> tuple[str, int, int]:
    if stat.S_ISBLK(st.st_mode):
        return ("block", st.st_rdev, 0)
    return ("file", st.st_dev, st.st_ino)


def _mounted_devices(mountinfo: Path) -> set[int]:
    devs: set[int] = set()
    try:
        text = mountinfo.read_text()
    except OSError:
        return devs
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 2 and ":" in fields[2]:
            major, _, minor = fields[2].partition(":")
            if major.isdigit() and minor.isdigit():
                devs.add(os.makedev(int(major), int(minor)))
    return devs


class SlotWriter:
    """Writes one image into the target slot. Use as a context manager or call close().

    ``booted``: the running slot's path; the target is refused when it is the same file or
    device. ``image_size``: when known, refused up front if larger than the slot.
    ``offset``: resume writing at this offset; the bytes before it are hashed from the medium.
    ``hash_writes``: keep a running hash of what was written, to compare with the re-read in
    :meth:`finish`. A caller that passes the expected hash to ``finish`` and already hashes
    the image elsewhere (the bundle verifier does) turns it off to save a pass over the data.
    """

    def __init__(
        self,
        target: Path,
        *,
        booted: Path | None,
        image_size: int | None = None,
        offset: int = 0,
        slot: str = "?",
        root: Path = Path("/"),
        mountinfo: Path = MOUNTINFO,
        hash_writes: bool = True,
        read_back_step: int = READ_BACK_STEP,
        on_progress: Callable[[], object] | None = None,
    ) -> None:
        self.target = Path(target)
        # called (from any thread) at each step of a re-read: a re-read of a big slot on a slow
        # medium can take minutes, and each step it makes shows the agent is not hung
        self.on_progress = on_progress
        self._read_back: _ReadBack | None = None
        self._read_back_step = read_back_step
        self.slot = slot
        self._fd: int | None = None
        self._hash = hashlib.sha256() if hash_writes else None
        try:
            st = os.stat(self.target)
        except FileNotFoundError as exc:
            raise SlotNotFound(f"slots: slot {slot} at {self.target} does not exist") from exc
        except OSError as exc:
            raise SlotWriteFailed(
                f"slots: cannot stat slot {slot} at {self.target}: {exc}"
            ) from exc
        self._check_not_booted(st, booted, root, mountinfo)
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise SlotWriteFailed(
                f"slots: slot {slot} at {self.target} is neither a block device nor a file"
            )
        flags = os.O_WRONLY | os.O_CLOEXEC
        # A block device is re-read with O_DIRECT (see _hash_range); a file through the cache.
        self._direct_reads = stat.S_ISBLK(st.st_mode)
        if stat.S_ISBLK(st.st_mode):
            # O_EXCL on a block device: the kernel refuses it while the device is mounted or
            # held exclusively by anyone else - a last guard below the identity checks
            flags |= os.O_EXCL
        try:
            fd = os.open(self.target, flags)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise BootedSlotWrite(
                    f"slots: refusing to write slot {slot}: {self.target} is in use "
                    "(mounted or opened exclusively)"
                ) from exc
            raise SlotWriteFailed(
                f"slots: cannot open slot {slot} at {self.target}: {exc}"
            ) from exc
        self._fd = fd
        try:
            self.capacity = os.lseek(fd, 0, os.SEEK_END)
            if image_size is not None and image_size > self.capacity:
                raise SlotTooSmall(
                    f"slots: image of {image_size} bytes does not fit slot {slot} "
                    f"({self.capacity} bytes at {self.target})",
                    image_size=image_size,
                    capacity=self.capacity,
                )
            if offset < 0 or offset > self.capacity:
                raise SlotWriteFailed(f"slots: resume offset {offset} outside slot {slot}")
            if offset and self._hash is not None:
                self._hash_range(0, offset, self._hash)
        except BaseException:
            self.close()
            raise
        self.offset = offset
        self._flushed = offset  # [0, _flushed) is on the medium (see durable_offset)
        self._advised = self._dropped = offset  # see _write_back
        self._read_back_asked = offset
        log.info("slot_opened", slot=slot, path=str(self.target), capacity=self.capacity)

    def _check_not_booted(
        self, st: os.stat_result, booted: Path | None, root: Path, mountinfo: Path
    ) -> None:
        mine = _identity(st)
        if booted is not None:
            try:
                theirs = _identity(os.stat(booted))
            except OSError as exc:
                raise SlotError(f"slots: cannot stat the booted slot {booted}: {exc}") from exc
            if mine == theirs:
                raise BootedSlotWrite(
                    f"slots: refusing to write slot {self.slot}: {self.target} is the booted "
                    f"slot ({booted})",
                    slot=self.slot,
                )
        if stat.S_ISBLK(st.st_mode):
            if st.st_rdev == os.stat(root).st_dev:
                raise BootedSlotWrite(
                    f"slots: refusing to write {self.target}: it holds the mounted root file system"
                )
            if st.st_rdev in _mounted_devices(mountinfo):
                raise BootedSlotWrite(f"slots: refusing to write {self.target}: it is mounted")

    def write(self, data: bytes | memoryview) -> int:
        """Write ``data`` at the current offset; returns the new offset."""
        fd = self._require_open()
        view = memoryview(data).cast("B")
        end = self.offset + len(view)
        if end > self.capacity:
            raise SlotTooSmall(
                f"slots: image does not fit slot {self.slot}: more than {self.capacity} bytes",
                capacity=self.capacity,
            )
        pos = 0
        while pos < len(view):
            try:
                n = os.pwrite(fd, view[pos:], self.offset + pos)
            except OSError as exc:
                raise self._translate(exc, self.offset + pos) from exc
            if n == 0:  # pragma: no cover - pwrite returns 0 only for an empty buffer
                raise SlotWriteFailed(f"slots: short write to slot {self.slot}")
            pos += n
        if self._hash is not None:
            self._hash.update(view)
        self.offset = end
        if end - self._advised >= 2 * _WRITEBACK_STEP:
            self._write_back(end - _WRITEBACK_STEP)
        if self._read_back is not None and self._read_back.error is not None:
            # the medium failed behind us: writing the rest of the image cannot help
            raise self._read_back.error
        if self._read_back_step and end - self._read_back_asked >= self._read_back_step:
            self._read_back_asked = end
            if self._read_back is None:
                self._read_back = _ReadBack(self)
            self._read_back.ask(end)
        return end

    def _write_back(self, upto: int) -> None:
        """Start writing ``[.., upto)`` back now instead of all of it in the final fsync.

        POSIX_FADV_DONTNEED on dirty pages starts their writeback without waiting (and drops
        pages that are already clean). Each range is advised twice, one step apart: the first
        call starts the writeback, the second drops the pages it wrote. So the final fsync has
        only the last steps left to flush, and an install does not fill the page cache with
        the whole image (on a device that would push out everything else). Durability is
        still the fsync's job; this only moves work earlier.
        """
        fd = self._require_open()
        # [_dropped, _advised) was advised once (its writeback started): drop it now;
        # [_advised, upto) is new: start its writeback
        try:
            os.posix_fadvise(fd, self._dropped, upto - self._dropped, os.POSIX_FADV_DONTNEED)
        except OSError as exc:  # advice only: a medium that does not take it is still written
            log.debug("slot_writeback_advice_failed", slot=self.slot, error=str(exc))
        self._dropped, self._advised = self._advised, upto

    def flush(self) -> None:
        """fsync what was written so far (a resume point that survives a power cut)."""
        fd = self._require_open()
        offset = self.offset
        try:
            os.fsync(fd)
        except OSError as exc:
            raise self._translate(exc, self.offset) from exc
        self._flushed = max(self._flushed, offset)

    @property
    def durable_offset(self) -> int:
        """Bytes from the slot's start known to be on the medium: by :meth:`flush`, or by the
        read-back thread's flushes behind the writes. (Bytes written at a resumed writer's
        start offset were made durable by the writer before it.)"""
        read_back = self._read_back
        synced = read_back.synced if read_back is not None else 0
        return max(self._flushed, synced)

    def finish(self, expected_sha256: str | None = None) -> WriteResult:
        """fsync, drop the cached pages, re-read and hash; SlotVerifyFailed on any mismatch."""
        if self._hash is None and expected_sha256 is None:
            raise ValueError("slots: finish() needs the expected hash when hash_writes is off")
        self.flush()
        if self._read_back is not None:
            # the thread hashed [0, done) from the medium already; the rest is read here
            reread, done = self._read_back.stop()
            self._read_back = None
        else:
            reread, done = hashlib.sha256(), 0
        self._hash_range(done, self.offset, reread, drop_cache=True)
        on_disk = reread.hexdigest()
        written = self._hash.hexdigest() if self._hash is not None else on_disk
        if on_disk != written:
            raise SlotVerifyFailed(
                f"slots: slot {self.slot} reads back different bytes than were written "
                f"(sha256 {on_disk[:16]}... vs {written[:16]}...)"
            )
        if expected_sha256 is not None and on_disk != expected_sha256.lower():
            raise SlotVerifyFailed(
                f"slots: slot {self.slot} holds sha256 {on_disk[:16]}..., expected "
                f"{expected_sha256[:16]}..."
            )
        log.info("slot_verified", slot=self.slot, size=self.offset, sha256=on_disk)
        return WriteResult(self.offset, on_disk)

    def close(self) -> None:
        if self._read_back is not None:
            read_back, self._read_back = self._read_back, None
            read_back.cancel()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> SlotWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> int:
        if self._fd is None:
            raise SlotWriteFailed(f"slots: writer for slot {self.slot} is closed")
        return self._fd

    def _translate(self, exc: OSError, offset: int) -> SlotError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return NoSpace(
                f"slots: no space left writing slot {self.slot} at {self.target} (offset {offset})",
                offset=offset,
            )
        if exc.errno == errno.EFBIG:
            return SlotTooSmall(f"slots: slot {self.slot} cannot grow past offset {offset}")
        return SlotWriteFailed(
            f"slots: writing slot {self.slot} at {self.target} failed at offset {offset}: "
            f"{exc.strerror or exc}",
            offset=offset,
        )

    def _hash_range(
        self,
        start: int,
        end: int,
        hasher: _Hasher,
        *,
        drop_cache: bool = False,
        cancelled: threading.Event | None = None,
    ) -> None:
        """Hash ``[start, end)`` of the slot as read back, into one reused buffer.

        ``drop_cache``: read the medium, not the page cache. The bytes a later boot sees are the
        ones on the medium, so those are the ones to hash; hashing the cache would only re-hash
        what we wrote. A block device is read with O_DIRECT: the kernel writes back any dirty
        cached pages of the range first and then reads from the device, whatever the cache
        holds, and it costs ~0.6 CPU-s per GiB less than going through the cache (measured on a
        loop device). A file slot (tests, the simulator, the benchmark) goes through the cache:
        after fsync the written pages are clean, POSIX_FADV_DONTNEED evicts them and the reads
        go to the file system's blocks, dropped again as we go so a 2 GiB re-read does not push
        the working set out of memory. (On ext4, direct reads of a file wait for its inode lock
        against the buffered writes still going on: 7 % slower installs measured.) A medium
        that refuses O_DIRECT is read the cache way.
        """
        if self.on_progress is not None:
            hasher = _Reporting(hasher, self.on_progress)
        if drop_cache and self._direct_reads and end > start:
            try:
                direct = os.open(self.target, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
            except OSError:
                direct = -1  # the medium refuses O_DIRECT (or is gone: the cache way says so)
            if direct >= 0:
                try:
                    if _hash_direct(direct, start, end, hasher, cancelled, self.slot):
                        return
                except OSError as exc:
                    raise SlotVerifyFailed(
                        f"slots: re-reading slot {self.slot} failed: {exc}"
                    ) from exc
                finally:
                    os.close(direct)
        try:
            fd = os.open(self.target, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SlotVerifyFailed(f"slots: cannot re-open slot {self.slot}: {exc}") from exc
        try:
            self._hash_cached(fd, start, end, hasher, drop_cache, cancelled)
        except OSError as exc:
            raise SlotVerifyFailed(f"slots: re-reading slot {self.slot} failed: {exc}") from exc
        finally:
            os.close(fd)

    def _hash_cached(
        self,
        fd: int,
        start: int,
        end: int,
        hasher: _Hasher,
        drop_cache: bool,
        cancelled: threading.Event | None,
    ) -> None:
        if end > start:
            if drop_cache:
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_SEQUENTIAL)
        buffer = memoryview(bytearray(_READ_CHUNK))
        pos = dropped = start
        while pos < end:
            if cancelled is not None and cancelled.is_set():
                return
            n = os.preadv(fd, [buffer[: min(_READ_CHUNK, end - pos)]], pos)
            if not n:
                raise SlotVerifyFailed(
                    f"slots: slot {self.slot} ends at {pos} bytes, expected {end}"
                )
            hasher.update(buffer[:n])
            pos += n
            if drop_cache and pos - dropped >= _DROP_EVERY:
                os.posix_fadvise(fd, dropped, pos - dropped, os.POSIX_FADV_DONTNEED)
                dropped = pos


def _hash_direct(
    fd: int,
    start: int,
    end: int,
    hasher: _Hasher,
    cancelled: threading.Event | None,
    slot: str,
) -> bool:
    """Hash ``[start, end)`` read with O_DIRECT through ``fd``; False if the medium refuses it.

    Reads are aligned: from ``start`` rounded down, in whole aligned buffers (the last one may
    come back short at the end of the device); only ``[start, end)`` is hashed."""
    with mmap.mmap(-1, _DIRECT_READ) as buffer:  # page-aligned, as O_DIRECT needs
        view = memoryview(buffer)
        try:
            pos = start - start % _DIRECT_ALIGN
            skip = start - pos
            first = True
            while pos < end:
                if cancelled is not None and cancelled.is_set():
                    return True
                want = min(_DIRECT_READ, -(-(end - pos) // _DIRECT_ALIGN) * _DIRECT_ALIGN)
                try:
                    n = os.preadv(fd, [view[:want]], pos)
                except OSError as exc:
                    if first and exc.errno == errno.EINVAL:
                        return False  # alignment rules we do not meet: the cache way then
                    raise
                first = False
                take = min(n, end - pos)
                if take <= skip:
                    raise SlotVerifyFailed(
                        f"slots: slot {slot} ends at {pos + n} bytes, expected {end}"
                    )
                hasher.update(view[skip:take])
                skip = 0
                pos += n
            return True
        finally:
            view.release()


class _Reporting:
    """A hasher that calls ``on_progress`` after each piece it hashes."""

    def __init__(self, hasher: _Hasher, on_progress: Callable[[], object]) -> None:
        self._hasher = hasher
        self._on_progress = on_progress

    def update(self, data: bytes | memoryview, /) -> None:
        self._hasher.update(data)
        self._on_progress()


class _ReadBack:
    """Re-reads, on its own thread, what the writer wrote and flushed, while it writes more.

    The re-read after the last byte is the slowest step left after a download (a SHA-256 over
    the whole image, on one core). This moves most of it into the download: every
    ``read_back_step`` bytes the writer asks, the thread fdatasyncs the slot (the bytes are
    on the medium, the device cache flushed), drops those pages from the page cache and reads
    them back from the medium into a running SHA-256. :meth:`SlotWriter.finish` still fsyncs
    and re-reads whatever the thread had not reached, then compares the one hash over all of
    ``[0, offset)`` with the expected one. So every byte is still hashed as read from the
    medium after it was flushed there; the writer only moves forward, so nothing rewrites a
    range after it was read back.
    """

    def __init__(self, writer: SlotWriter) -> None:
        self._writer = writer
        self._hash = hashlib.sha256()
        self._done = 0  # [0, _done) is hashed
        self.synced = 0  # [0, synced) is on the medium
        self._asked = 0
        self.error: SlotError | None = None  # set once, by the thread
        self._cancelled = threading.Event()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="otad-slot-readback", daemon=True)
        self._thread.start()

    def ask(self, upto: int) -> None:
        with self._wake:
            self._asked = upto
            self._wake.notify()

    def stop(self) -> tuple[hashlib._Hash, int]:
        """Wait for the step in progress; the hash so far and where it ends (SlotVerifyFailed)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self._hash, self._done

    def cancel(self) -> None:
        self._cancelled.set()
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        writer = self._writer
        try:
            fd = os.open(writer.target, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.error = SlotVerifyFailed(f"slots: cannot re-open slot {writer.slot}: {exc}")
            return
        try:
            while True:
                with self._wake:
                    while self._asked <= self._done and not self._closing:
                        self._wake.wait()
                    if self._closing:
                        return
                    upto = self._asked
                os.fdatasync(fd)  # flushes the file's dirty pages, whoever's fd wrote them
                self.synced = upto
                writer._hash_range(
                    self._done, upto, self._hash, drop_cache=True, cancelled=self._cancelled
                )
                if self._cancelled.is_set():
                    return
                self._done = upto
        except OSError as exc:  # fdatasync: the medium refused what was written (ENOSPC, EIO)
            self.error = writer._translate(exc, self.synced)
        except SlotVerifyFailed as exc:
            self.error = exc
        finally:
            os.close(fd)


def open_target(
    layout: SlotLayout,
    booted: str,
    *,
    image_size: int | None = None,
    offset: int = 0,
    hash_writes: bool = True,
    read_back_step: int = READ_BACK_STEP,
    on_progress: Callable[[], object] | None = None,
) -> SlotWriter:
    """A writer for the slot that is not ``booted``, refusing the booted one by identity."""
    target = other_slot(booted)
    return SlotWriter(
        layout.path(target),
        booted=layout.path(booted),
        image_size=image_size,
        offset=offset,
        slot=target,
        hash_writes=hash_writes,
        read_back_step=read_back_step,
        on_progress=on_progress,
    )

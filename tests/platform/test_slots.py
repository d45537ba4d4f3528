"""Slots: layout, booted-slot detection with the root cross-check, and the safe writer."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import resource
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otad.agent.slots import (
    SlotLayout,
    SlotWriter,
    booted_slot,
    open_target,
    slot_from_cmdline,
)
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

MiB = 1 << 20


@pytest.fixture
def file_slots(tmp_path: Path) -> SlotLayout:
    for name in ("a.img", "b.img"):
        with (tmp_path / name).open("wb") as f:
            f.truncate(4 * MiB)
    (tmp_path / "a.img").write_bytes(b"old system A" + bytes(4 * MiB - 12))
    return SlotLayout.from_config({"A": str(tmp_path / "a.img"), "B": str(tmp_path / "b.img")})


# --- layout and cmdline ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "slot"),
    [
        ("root=PARTLABEL=rootfs_a rw otad.slot=A console=ttyS0", "A"),
        ("quiet rauc.slot=B", "B"),
        ("otad.slot=B rauc.slot=B", "B"),
        ("root=/dev/vda2 quiet", None),
        ("quiet -- otad.slot=A", None),  # after "--" the arguments belong to init
        ("", None),
    ],
)
def test_slots_cmdline_names_the_slot(cmdline: str, slot: str | None) -> None:
    assert slot_from_cmdline(cmdline) == slot


@pytest.mark.parametrize(
    "cmdline", ["otad.slot=C", "otad.slot=", "otad.slot=A otad.slot=B", "otad.slot=A rauc.slot=B"]
)
def test_slots_bad_cmdline_is_an_error(cmdline: str) -> None:
    with pytest.raises(SlotError):
        slot_from_cmdline(cmdline)


@pytest.mark.parametrize(
    "mapping",
    [
        {"A": "/dev/x"},
        {"A": "/dev/x", "B": "/dev/y", "C": "/dev/z"},
        {"A": "/dev/x", "B": ""},
        {"A": "/dev/x", "B": "PARTLABEL="},
        {"A": "/dev/x", "B": "PARTLABEL=a/b"},
    ],
)
def test_slots_bad_layout_is_a_config_error(mapping: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        SlotLayout.from_config(mapping)


def test_slots_label_resolves_through_by_partlabel(tmp_path: Path) -> None:
    (tmp_path / "by-partlabel").mkdir()
    (tmp_path / "vdb3").touch()
    (tmp_path / "by-partlabel" / "rootfs_b").symlink_to(tmp_path / "vdb3")
    layout = SlotLayout.from_config(
        {"A": "/dev/vdb2", "B": "PARTLABEL=rootfs_b"}, by_partlabel=tmp_path / "by-partlabel"
    )
    assert layout.path("B") == tmp_path / "vdb3"
    assert layout.path("A") == Path("/dev/vdb2")


def test_slots_label_resolves_through_sysfs_uevent(tmp_path: Path) -> None:
    sysblock = tmp_path / "sys"
    for dev, name in (("vdb2", "rootfs_a"), ("vdb3", "rootfs_b"), ("vdb", None)):
        (sysblock / dev).mkdir(parents=True)
        extra = f"PARTNAME={name}\n" if name else ""
        (sysblock / dev / "uevent").write_text(f"MAJOR=254\nMINOR=3\nDEVNAME={dev}\n{extra}")
    layout = SlotLayout.from_config(
        {"A": "partlabel:rootfs_a", "B": "PARTLABEL=rootfs_b"},
        by_partlabel=tmp_path / "none",
        sys_block=sysblock,
        dev_dir=tmp_path / "dev",
    )
    assert layout.path("A") == tmp_path / "dev" / "vdb2"
    assert layout.path("B") == tmp_path / "dev" / "vdb3"


def test_slots_missing_label_is_slot_not_found(tmp_path: Path) -> None:
    layout = SlotLayout.from_config(
        {"A": "PARTLABEL=otad_test_no_such_label", "B": "/dev/null"},
        by_partlabel=tmp_path,
        sys_block=tmp_path,
    )
    with pytest.raises(SlotNotFound, match="otad_test_no_such_label"):
        layout.path("A")


def test_slots_booted_override_wins(file_slots: SlotLayout) -> None:
    assert booted_slot(file_slots, override="B") == "B"
    with pytest.raises(ValueError, match="unknown slot"):
        booted_slot(file_slots, override="C")


@pytest.fixture
def block_nodes(tmp_path: Path) -> tuple[Path, Path]:
    """Two device nodes: one with the number of the disk holding /, one for loop0's number.

    Nothing is ever written through them: the tests check the identity checks that run before
    any open for writing.
    """
    root_dev = os.stat("/").st_dev
    a, b = tmp_path / "root-disk", tmp_path / "other-disk"
    os.mknod(a, stat.S_IFBLK | 0o600, root_dev)
    os.mknod(b, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    return a, b


def test_slots_cmdline_is_cross_checked_against_the_root_device(
    tmp_path: Path, block_nodes: tuple[Path, Path]
) -> None:
    a, b = block_nodes
    layout = SlotLayout.from_config({"A": str(a), "B": str(b)})
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=PARTLABEL=rootfs_a otad.slot=A\n")
    assert booted_slot(layout, cmdline_path=cmdline) == "A"
    cmdline.write_text("root=PARTLABEL=rootfs_b otad.slot=B\n")
    with pytest.raises(SlotError, match="mounted from slot A"):
        booted_slot(layout, cmdline_path=cmdline)
    cmdline.write_text("quiet\n")
    assert booted_slot(layout, cmdline_path=cmdline) == "A"  # derived from the root device


def test_slots_no_cmdline_and_file_slots_is_an_error(
    tmp_path: Path, file_slots: SlotLayout
) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("quiet\n")
    with pytest.raises(SlotError, match=r"no otad\.slot="):
        booted_slot(file_slots, cmdline_path=cmdline)
    with pytest.raises(SlotError, match="cannot read"):
        booted_slot(file_slots, cmdline_path=tmp_path / "missing")


# --- the writer ----------------------------------------------------------------------------


def test_slots_writer_refuses_the_booted_slot_by_inode(
    file_slots: SlotLayout, tmp_path: Path
) -> None:
    a = file_slots.path("A")
    before = a.read_bytes()
    with pytest.raises(BootedSlotWrite, match="booted"):
        SlotWriter(a, booted=a, slot="A")
    # a different name for the same inode is refused too
    alias = tmp_path / "alias.img"
    os.link(a, alias)
    with pytest.raises(BootedSlotWrite):
        SlotWriter(alias, booted=a, slot="B")
    link = tmp_path / "sym.img"
    link.symlink_to(a)
    with pytest.raises(BootedSlotWrite):
        SlotWriter(link, booted=a, slot="B")
    assert a.read_bytes() == before


def test_slots_writer_refuses_the_root_block_device(block_nodes: tuple[Path, Path]) -> None:
    a, b = block_nodes
    with pytest.raises(BootedSlotWrite, match="mounted root"):
        SlotWriter(a, booted=b, slot="A")
    with pytest.raises(BootedSlotWrite, match="booted"):
        SlotWriter(b, booted=b, slot="B")


def test_slots_writer_refuses_a_mounted_block_device(
    tmp_path: Path, block_nodes: tuple[Path, Path]
) -> None:
    _, b = block_nodes
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("27 1 7:0 / /mnt/x rw,relatime - ext4 /dev/loop0 rw\n")
    with pytest.raises(BootedSlotWrite, match="mounted"):
        SlotWriter(b, booted=None, slot="B", mountinfo=mountinfo)


def test_slots_writer_writes_hashes_and_rereads(file_slots: SlotLayout) -> None:
    image = os.urandom(3 * MiB + 123)
    a_before = file_slots.path("A").read_bytes()
    with open_target(file_slots, "A", image_size=len(image)) as w:
        assert w.slot == "B"
        for i in range(0, len(image), 64 * 1024):
            w.write(memoryview(image)[i : i + 64 * 1024])
        result = w.finish(hashlib.sha256(image).hexdigest())
    assert result.size == len(image)
    assert result.sha256 == hashlib.sha256(image).hexdigest()
    b = file_slots.path("B").read_bytes()
    assert b[: len(image)] == image and len(b) == 4 * MiB  # no truncation, like a partition
    assert file_slots.path("A").read_bytes() == a_before


def _read_back_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "otad-slot-readback"]


def _writer(layout: SlotLayout, **kwargs: Any) -> SlotWriter:
    return SlotWriter(layout.path("B"), booted=layout.path("A"), slot="B", **kwargs)


@pytest.mark.parametrize("hash_writes", [True, False])
def test_slots_writer_reads_back_behind_the_writes(
    file_slots: SlotLayout, hash_writes: bool
) -> None:
    # a small step: the thread flushes and re-reads while the writes go on; finish reads the rest
    image = os.urandom(4 * MiB - 5)
    with _writer(file_slots, hash_writes=hash_writes, read_back_step=MiB // 2) as w:
        for i in range(0, len(image), 100_000):
            w.write(image[i : i + 100_000])
        assert len(_read_back_threads()) == 1
        result = w.finish(hashlib.sha256(image).hexdigest())
        assert not _read_back_threads()
    assert result.sha256 == hashlib.sha256(image).hexdigest()


def test_slots_writer_read_back_still_catches_a_wrong_image(file_slots: SlotLayout) -> None:
    image = os.urandom(3 * MiB)
    with _writer(file_slots, hash_writes=False, read_back_step=MiB // 4) as w:
        for i in range(0, len(image), MiB // 8):
            w.write(image[i : i + MiB // 8])
        with pytest.raises(SlotVerifyFailed, match="expected"):
            w.finish(hashlib.sha256(image[:-1] + b"?").hexdigest())


def test_slots_writer_stops_accepting_bytes_once_the_read_back_failed(
    file_slots: SlotLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The medium fails a re-read early on (EIO here): the next writes refuse the rest of the
    image instead of downloading and writing it all before finish() says so."""
    real_preadv = os.preadv
    failed = threading.Event()

    def failing_preadv(fd: int, buffers: Any, offset: int) -> int:
        if threading.current_thread().name == "otad-slot-readback":
            failed.set()
            raise OSError(errno.EIO, "Input/output error")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", failing_preadv)
    piece = os.urandom(MiB // 8)

    def write_whole_slot(w: SlotWriter) -> None:
        for _ in range(32):  # 4 MiB, the whole slot
            w.write(piece)
            if _read_back_threads():  # a step was asked: let it fail before the next write
                assert failed.wait(5)
                time.sleep(0.05)  # the thread records its error right after the read

    with _writer(file_slots, hash_writes=False, read_back_step=MiB // 4) as w:
        with pytest.raises(SlotVerifyFailed, match="Input/output error"):
            write_whole_slot(w)
        assert w.offset < 4 * MiB


def test_slots_writer_close_stops_the_read_back(file_slots: SlotLayout) -> None:
    w = _writer(file_slots, read_back_step=MiB // 4)
    for _ in range(8):
        w.write(os.urandom(MiB // 4))
    w.close()  # an abandoned job: no finish
    assert not _read_back_threads()
    with pytest.raises(SlotWriteFailed, match="closed"):
        w.write(b"x")


def test_slots_writer_resumes_at_an_offset(file_slots: SlotLayout) -> None:
    image = os.urandom(2 * MiB)
    with open_target(file_slots, "A") as w:
        w.write(image[: MiB + 7])
        w.flush()
    with open_target(file_slots, "A", offset=MiB + 7) as w:
        w.write(image[MiB + 7 :])
        assert w.finish(hashlib.sha256(image).hexdigest()).size == len(image)


def test_slots_writer_detects_a_hash_mismatch(file_slots: SlotLayout) -> None:
    with open_target(file_slots, "A") as w:
        w.write(b"x" * 1000)
        with pytest.raises(SlotVerifyFailed, match="expected"):
            w.finish(hashlib.sha256(b"y" * 1000).hexdigest())


def test_slots_writer_detects_bytes_changed_under_it(file_slots: SlotLayout) -> None:
    with open_target(file_slots, "A") as w:
        w.write(b"x" * 1000)
        with file_slots.path("B").open("r+b") as f:
            f.seek(500)
            f.write(b"!")
        with pytest.raises(SlotVerifyFailed, match="reads back different"):
            w.finish()


def test_slots_writer_refuses_an_image_larger_than_the_slot(file_slots: SlotLayout) -> None:
    with pytest.raises(SlotTooSmall, match=r"does not fit slot B \(4194304 bytes"):
        open_target(file_slots, "A", image_size=4 * MiB + 1)
    with open_target(file_slots, "A") as w:
        w.write(bytes(4 * MiB))
        with pytest.raises(SlotTooSmall, match="more than 4194304"):
            w.write(b"1")


def test_slots_writer_missing_slot_is_not_found(tmp_path: Path, file_slots: SlotLayout) -> None:
    with pytest.raises(SlotNotFound, match="does not exist"):
        SlotWriter(tmp_path / "nope.img", booted=file_slots.path("A"), slot="B")


def test_slots_writer_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(SlotWriteFailed, match="neither a block device nor a file"):
        SlotWriter(tmp_path, booted=None, slot="B")


def test_slots_writer_closed_writer_refuses(file_slots: SlotLayout) -> None:
    w = open_target(file_slots, "A")
    w.close()
    with pytest.raises(SlotWriteFailed, match="closed"):
        w.write(b"x")


def test_slots_writer_file_size_limit_reports_slot_too_small(tmp_path: Path) -> None:
    # RLIMIT_FSIZE makes writes past the limit fail with EFBIG (SIGXFSZ ignored), a real
    # kernel error path: the slot file claims 2 MiB but the process may only write 1 MiB.
    slot = tmp_path / "b.img"
    with slot.open("wb") as f:
        f.truncate(2 * MiB)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (MiB, old_limit[1]))
    try:
        with SlotWriter(slot, booted=None, slot="B") as w:
            w.write(bytes(MiB))
            with pytest.raises(SlotTooSmall, match="cannot grow"):
                w.write(b"x")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_slots_writer_full_file_system_is_no_space(tmp_path: Path) -> None:
    # a sparse slot file on a tiny tmpfs: the kernel returns ENOSPC when the blocks run out
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=False
    ).returncode:
        pytest.fail("mounting a tmpfs is required for the ENOSPC test")
    try:
        slot = mnt / "b.img"
        with slot.open("wb") as f:
            f.truncate(8 * MiB)
        with SlotWriter(slot, booted=None, slot="B") as w:
            w.write(bytes(range(256)) * 2048)  # half a MiB fits
            with pytest.raises(NoSpace, match="no space left") as info:
                w.write(bytes(range(256)) * 4096)  # one more MiB does not
            assert info.value.code == "no_space"
            assert info.value.__cause__ is not None
            assert getattr(info.value.__cause__, "errno", None) == errno.ENOSPC
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture
def loop_slots(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two real block devices: loop devices over 4 MiB files (detached afterwards)."""
    devices: list[str] = []
    try:
        for name in ("a.img", "b.img"):
            backing = tmp_path / name
            with backing.open("wb") as f:
                f.truncate(4 * MiB)
            proc = subprocess.run(
                ["losetup", "-f", "--show", str(backing)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if proc.returncode != 0:
                pytest.fail(f"losetup is needed for the block-device tests: {proc.stderr.strip()}")
            devices.append(proc.stdout.strip())
        yield Path(devices[0]), Path(devices[1])
    finally:
        for dev in devices:
            subprocess.run(["losetup", "-d", dev], timeout=30, check=False)


def test_slots_writer_on_a_real_block_device(loop_slots: tuple[Path, Path]) -> None:
    a, b = loop_slots
    layout = SlotLayout.from_config({"A": str(a), "B": str(b)})
    image = os.urandom(MiB + 4096)
    with open_target(layout, "A", image_size=len(image)) as w:
        assert w.capacity == 4 * MiB and w.slot == "B"
        w.write(image)
        result = w.finish(hashlib.sha256(image).hexdigest())
    assert result.size == len(image)
    with b.open("rb") as f:
        assert f.read(len(image)) == image
    with pytest.raises(BootedSlotWrite, match="booted"):
        SlotWriter(b, booted=b, slot="B")
    with pytest.raises(SlotTooSmall):
        open_target(layout, "A", image_size=4 * MiB + 1)


def test_slots_writer_reads_a_block_device_from_the_medium_not_the_cache(
    loop_slots: tuple[Path, Path], tmp_path: Path
) -> None:
    """A page of the device that stays cached (here: mapped by another reader, which
    POSIX_FADV_DONTNEED does not evict) must not stand in for the medium: the re-read goes
    to the device, and a medium that changed underneath fails the check."""
    a, b = loop_slots
    layout = SlotLayout.from_config({"A": str(a), "B": str(b)})
    image = os.urandom(2 * MiB)
    with open_target(layout, "A", hash_writes=False) as w:
        w.write(image)
        w.flush()
        reader = os.open(b, os.O_RDONLY)
        try:
            with mmap.mmap(reader, len(image), prot=mmap.PROT_READ) as pinned:
                assert pinned[:] == image  # every page of the image is now cached and mapped
                with (tmp_path / "b.img").open("r+b") as medium:  # the loop device's backing
                    medium.seek(MiB + 4096)
                    medium.write(b"\0" * 4096)
                    medium.flush()
                    os.fsync(medium.fileno())
                assert pinned[MiB + 4096 : MiB + 8192] == image[MiB + 4096 : MiB + 8192]
                with pytest.raises(SlotVerifyFailed, match="expected"):
                    w.finish(hashlib.sha256(image).hexdigest())
        finally:
            os.close(reader)


def test_slots_writer_rereads_unaligned_ranges_of_a_block_device(
    loop_slots: tuple[Path, Path],
) -> None:
    """Direct reads need aligned offsets and sizes; a resumed write and an image that ends
    inside a block still hash exactly [0, size)."""
    a, b = loop_slots
    image = os.urandom(3 * MiB + 1234)
    with SlotWriter(b, booted=a, slot="B", hash_writes=False, read_back_step=MiB + 777) as w:
        for at in range(0, len(image), 700_001):  # read back from unaligned ends of writes
            w.write(image[at : at + 700_001])
        assert w.finish(hashlib.sha256(image).hexdigest()).size == len(image)
    with SlotWriter(b, booted=a, slot="B", offset=MiB + 99) as w:  # [0, offset) re-read first
        w.write(image[MiB + 99 :])
        assert w.finish(hashlib.sha256(image).hexdigest()).size == len(image)


def test_slots_writer_without_running_hash_still_verifies_the_medium(
    file_slots: SlotLayout,
) -> None:
    image = os.urandom(MiB)
    with open_target(file_slots, "A", hash_writes=False) as w:
        w.write(image)
        with pytest.raises(ValueError, match="expected hash"):
            w.finish()
        assert w.finish(hashlib.sha256(image).hexdigest()).size == MiB
    with open_target(file_slots, "A", hash_writes=False, offset=MiB // 2) as w:
        w.write(b"x")  # changes the image: the medium no longer matches
        with pytest.raises(SlotVerifyFailed, match="expected"):
            w.finish(hashlib.sha256(image).hexdigest())


def test_slots_writer_refuses_a_block_device_in_use(loop_slots: tuple[Path, Path]) -> None:
    a, b = loop_slots
    holder = os.open(b, os.O_RDONLY | os.O_EXCL)  # what a mount does to the device
    try:
        with pytest.raises(BootedSlotWrite, match="in use"):
            SlotWriter(b, booted=a, slot="B")
    finally:
        os.close(holder)
    with SlotWriter(b, booted=a, slot="B") as w:  # free again
        w.write(b"ok")

"""The shipped grub.cfg under the real GRUB 2.06 (i386-pc, SeaBIOS, QEMU TCG), no kernel.

A tiny disk holds only an ESP with grub.cfg and the two env copies, and GRUB's core image. The
slots have no kernel, so after choosing a slot and saving its try mark GRUB fails to load
``linux``, prints why, and reboots; QEMU (``-no-reboot``) exits. The test reads the serial log
("otad: -> slot X") and the env copies GRUB wrote back, so it checks with GRUB itself what the
agent's reader assumes: which copy is current, torn copies ignored, X_TRY saved before boot,
fallback, rescue.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from otad.agent.bootloader.grub import GrubBootloader, initial_values, read_copy, render

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
MODULES = [
    "biosdisk", "part_gpt", "fat", "normal", "loadenv", "test", "echo", "search",
    "search_label", "linux", "configfile", "reboot", "serial", "terminal", "sleep", "halt",
]  # fmt: skip
TOOLS = ["qemu-system-x86_64", "grub-mkimage", "mkfs.vfat", "mcopy", "sfdisk"]


def run(cmd: list[str | Path], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=120, **kw)  # type: ignore[call-overload,no-any-return]


@pytest.fixture(scope="module")
def core_img(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [t for t in TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if missing or not Path("/usr/lib/grub/i386-pc/boot.img").exists():
        pytest.fail(
            f"qemu group needs {missing or 'grub-pc-bin'} (scripts/install-system-deps qemu)"
        )
    out = tmp_path_factory.mktemp("grub") / "core.img"
    run(["grub-mkimage", "-O", "i386-pc", "-o", out, "-p", "(hd0,gpt1)/EFI/otad", *MODULES])
    return out


class Disk:
    """ESP (8 MiB FAT) at 1 MiB, bios_grub (1 MiB) at 9 MiB: a 10 MiB GPT disk image."""

    def __init__(
        self, path: Path, core: Path, envs: dict[str, bytes], local_cfg: str | None = None
    ) -> None:
        self.path = path
        work = path.parent
        esp = work / "esp.img"
        esp.unlink(missing_ok=True)
        run(["mkfs.vfat", "-C", "-n", "ESP", esp, "8192"])
        self.mt = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        run(["mmd", "-i", esp, "::/EFI", "::/EFI/otad"], env=self.mt)
        run(["mcopy", "-i", esp, REPO / "boot/grub/grub.cfg", "::/EFI/otad/grub.cfg"], env=self.mt)
        if local_cfg is not None:
            (work / "otad-local.cfg").write_text(local_cfg)
            envs = {**envs, "otad-local.cfg": local_cfg.encode()}
        for name, data in envs.items():
            (work / name).write_bytes(data)
            run(["mcopy", "-i", esp, work / name, f"::/EFI/otad/{name}"], env=self.mt)
        with path.open("wb") as f:
            f.truncate(11 * MIB)
        table = (
            "label: gpt\nunit: sectors\n"
            "start=2048, size=16384, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp\n"
            "start=18432, size=2048, type=21686148-6449-6E6F-744E-656564454649, name=bios_grub\n"
        )
        run(["sfdisk", "-q", path], input=table.encode())
        boot = bytearray(Path("/usr/lib/grub/i386-pc/boot.img").read_bytes())
        core_bytes = bytearray(core.read_bytes())
        lba = 18432
        struct.pack_into("<Q", boot, 0x5C, lba)  # where boot.img finds core.img
        boot[0x66:0x68] = b"\x90\x90"  # boot from whatever drive the BIOS says
        struct.pack_into("<Q", core_bytes, 0x1F4, lba + 1)  # core.img's own block list
        with path.open("r+b") as f:
            f.write(boot[:440])
            f.seek(MIB)
            f.write(esp.read_bytes())
            f.seek(lba * 512)
            f.write(core_bytes)

    def boot(self) -> str:
        log = self.path.parent / "serial.log"
        log.unlink(missing_ok=True)
        subprocess.run(
            [
                "qemu-system-x86_64", "-accel", "tcg", "-m", "128", "-display", "none",
                "-no-reboot", "-serial", f"file:{log}", "-monitor", "none",
                "-drive", f"file={self.path},format=raw,if=ide",
            ],
            check=True, timeout=180, capture_output=True,
        )  # fmt: skip
        return log.read_text(errors="replace")

    def env(self, name: str) -> Path:
        out = self.path.parent / f"read-{name}"
        out.unlink(missing_ok=True)
        run(["mcopy", "-n", "-i", f"{self.path}@@1M", f"::/EFI/otad/{name}", out], env=self.mt)
        return out


def chosen(log: str) -> str:
    lines = [line for line in log.splitlines() if "otad: -> slot" in line]
    assert lines, log[-2000:]
    return lines[-1].split("otad: -> slot ")[1][0]


def test_grub_real_boots_the_newer_copy_and_saves_the_try_mark(
    tmp_path: Path, core_img: Path
) -> None:
    old = initial_values()
    new = {**initial_values(("B", "A")), "otad_trial": "B"}
    disk = Disk(
        tmp_path / "disk.img", core_img, {"grubenv.0": render(old, 5), "grubenv.1": render(new, 6)}
    )
    log = disk.boot()
    assert "seq0=5 seq1=6" in log and chosen(log) == "B"
    assert read_copy(disk.env("grubenv.1")).values["B_TRY"] == "1"  # saved into the current copy
    assert read_copy(disk.env("grubenv.0")).values["B_TRY"] == "0"  # the other one untouched
    # the agent's reader sees what GRUB did: B has used its try, the next boot is A
    envdir = tmp_path / "env"
    envdir.mkdir()
    for name in ("grubenv.0", "grubenv.1"):
        shutil.copy(disk.env(name), envdir / name)
    state = GrubBootloader(envdir).state()
    assert state.slot("B").tries_left == 0 and state.next_boot() == "A"


def test_grub_real_ignores_a_torn_copy(tmp_path: Path, core_img: Path) -> None:
    good = initial_values()
    torn_new = render({**initial_values(("B", "A"))}, 8)
    old_copy = render(good, 6)
    cut = torn_new.index(b"SEQ_END")  # the power went before the new SEQ_END got written
    torn = torn_new[:cut] + old_copy[cut:]
    disk = Disk(tmp_path / "disk.img", core_img, {"grubenv.0": render(good, 7), "grubenv.1": torn})
    log = disk.boot()
    assert "seq0=7 seq1=" in log and "seq1=8" not in log
    assert chosen(log) == "A"
    assert read_copy(disk.env("grubenv.0")).values["A_TRY"] == "1"


def test_grub_real_falls_back_when_the_try_is_used_up(tmp_path: Path, core_img: Path) -> None:
    values = {**initial_values(("B", "A")), "B_TRY": "1", "otad_trial": "B"}
    local = "set otad_dev_a=hd0,gpt1\nset otad_label_a=no_such_label\n"
    disk = Disk(tmp_path / "disk.img", core_img, {"grubenv.0": render(values, 3)}, local)
    log = disk.boot()  # grubenv.1 missing: copy 0 alone is used
    assert chosen(log) == "A"
    assert "otad: -> slot A (hd0,gpt1)" in log  # otad-local.cfg was sourced
    assert read_copy(disk.env("grubenv.0")).values["A_TRY"] == "1"


def test_grub_real_rescue_boot_without_a_valid_copy(tmp_path: Path, core_img: Path) -> None:
    disk = Disk(tmp_path / "disk.img", core_img, {"grubenv.0": b"\0" * 1024})
    log = disk.boot()
    assert "rescue boot of slot A" in log and chosen(log) == "A"
    assert disk.env("grubenv.0").read_bytes() == b"\0" * 1024  # nothing saved


def test_grub_real_last_resort_boots_the_committed_slot(tmp_path: Path, core_img: Path) -> None:
    # B committed, A marked bad by a failed update, B's confirmation lost to a power cut
    values = {**initial_values(("B", "A")), "A_OK": "0", "B_TRY": "1", "otad_trial": ""}
    disk = Disk(tmp_path / "disk.img", core_img, {"grubenv.0": render(values, 4)})
    before = disk.env("grubenv.0").read_bytes()
    log = disk.boot()
    assert "rescue boot of slot B" in log and chosen(log) == "B"
    assert disk.env("grubenv.0").read_bytes() == before  # nothing saved


def test_grub_real_last_resort_skips_the_slot_on_trial(tmp_path: Path, core_img: Path) -> None:
    # B on trial used its try; A's confirmation after the fallback was lost: A, never B
    values = {**initial_values(("B", "A")), "A_TRY": "1", "B_TRY": "1", "otad_trial": "B"}
    disk = Disk(tmp_path / "disk.img", core_img, {"grubenv.0": render(values, 4)})
    log = disk.boot()
    assert "rescue boot of slot A" in log and chosen(log) == "A"

"""The shipped boot.cmd under the real U-Boot 2023.01 (qemu_arm64, TCG), no kernel.

U-Boot's own env (pflash 1, built with mkenvimage) only says where the script and the env file
are, and replaces the kernel start with an ``echo`` of the kernel command line and a
``poweroff``. The A/B state lives in ``uboot.env`` on a FAT partition (the ``otad_envfile``
variant of boot.cmd: QEMU's pflash cannot take ``saveenv``), written and read back with the
agent's codec. Checks: the slot choice, the counter decremented and saved before the kernel,
the command line, fallback, and the rescue boot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from otad.agent.bootloader import ubootenv
from otad.agent.bootloader.uboot import EnvLocation, UBootBootloader, scheme_state
from otad.errors import BootloaderEnvCorrupt

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
UBOOT = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
MIB = 1 << 20
ENV_SIZE = 0x4000
TOOLS = ["qemu-system-aarch64", "mkimage", "mkenvimage", "mkfs.vfat", "mcopy", "sfdisk"]
FLASH_ENV = """bootdelay=0
bootcmd=virtio scan; load virtio 0:1 0x40200000 boot.scr && source 0x40200000; poweroff
otad_envfile=uboot.env
otad_envdev=virtio 0:1
otad_boot=echo OTAD-BOOTARGS: ${bootargs}; poweroff
"""


def run(cmd: list[str | Path], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=120, **kw)  # type: ignore[call-overload,no-any-return]


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    missing = [t for t in TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if missing or not UBOOT.exists():
        pytest.fail(
            f"needs {missing or 'u-boot-qemu'} (apt-get install qemu-system-arm u-boot-qemu)"
        )
    work = tmp_path_factory.mktemp("uboot")
    flash0 = work / "flash0.img"
    flash0.write_bytes(UBOOT.read_bytes())
    with flash0.open("r+b") as f:
        f.truncate(64 * MIB)
    script = work / "boot.scr"
    run(
        [
            "mkimage",
            "-A",
            "arm64",
            "-T",
            "script",
            "-C",
            "none",
            "-d",
            REPO / "boot/u-boot/boot.cmd",
            script,
        ]
    )
    return flash0, script


class Machine:
    def __init__(self, work: Path, firmware: tuple[Path, Path], env_file: bytes) -> None:
        self.work = work
        self.flash0, script = firmware
        txt = work / "env.txt"
        txt.write_text(FLASH_ENV)
        self.flash1 = work / "flash1.img"
        run(["mkenvimage", "-s", "0x40000", "-o", self.flash1, txt])
        with self.flash1.open("r+b") as f:
            f.truncate(64 * MIB)
        fat = work / "fat.img"
        fat.unlink(missing_ok=True)
        run(["mkfs.vfat", "-C", fat, "8192"])
        self.mt = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        (work / "uboot.env").write_bytes(env_file)
        run(["mcopy", "-i", fat, script, "::/boot.scr"], env=self.mt)
        run(["mcopy", "-i", fat, work / "uboot.env", "::/uboot.env"], env=self.mt)
        self.disk = work / "disk.img"
        with self.disk.open("wb") as f:
            f.truncate(10 * MIB)
        run(["sfdisk", "-q", self.disk], input=b"label: dos\nstart=2048, size=16384, type=c\n")
        with self.disk.open("r+b") as f:
            f.seek(MIB)
            f.write(fat.read_bytes())

    def boot(self) -> str:
        log = self.work / "serial.log"
        log.unlink(missing_ok=True)
        subprocess.run(
            [
                "qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57", "-m", "256",
                "-accel", "tcg", "-display", "none", "-no-reboot", "-monitor", "none",
                "-serial", f"file:{log}",
                "-drive", f"if=pflash,format=raw,file={self.flash0},readonly=on",
                "-drive", f"if=pflash,format=raw,file={self.flash1}",
                "-drive", f"if=none,file={self.disk},format=raw,id=d0",
                "-device", "virtio-blk-device,drive=d0",
            ],
            check=True, timeout=120, capture_output=True,
        )  # fmt: skip
        return log.read_text(errors="replace")

    def env_file(self) -> bytes:
        out = self.work / "read-uboot.env"
        out.unlink(missing_ok=True)
        run(["mcopy", "-n", "-i", f"{self.disk}@@1M", "::/uboot.env", out], env=self.mt)
        return out.read_bytes()


def bootargs(log: str) -> str:
    lines = [line for line in log.splitlines() if line.startswith("OTAD-BOOTARGS:")]
    assert lines, log[-3000:]
    return lines[-1]


def env(**values: str) -> bytes:
    return ubootenv.encode(values, ENV_SIZE)


def test_uboot_real_boots_the_slot_on_trial_and_saves_the_counter(
    tmp_path: Path, firmware: tuple[Path, Path]
) -> None:
    m = Machine(
        tmp_path,
        firmware,
        env(BOOT_ORDER="B A", BOOT_A_LEFT="3", BOOT_B_LEFT="1", otad_trial="B", otad_extra="x=1"),
    )
    line = bootargs(m.boot())
    assert "otad.slot=B" in line and "root=PARTLABEL=rootfs_b" in line and "x=1" in line
    after = ubootenv.decode(m.env_file())
    assert after.values["BOOT_B_LEFT"] == "0" and after.values["BOOT_A_LEFT"] == "3"
    assert after.values["otad_trial"] == "B"  # kept for the agent
    state = scheme_state(after.values)
    assert state.slot("B").tries_left == 0 and state.next_boot() == "A"


def test_uboot_real_falls_back_when_the_counter_is_spent(
    tmp_path: Path, firmware: tuple[Path, Path]
) -> None:
    m = Machine(tmp_path, firmware, env(BOOT_ORDER="B A", BOOT_A_LEFT="3", BOOT_B_LEFT="0"))
    assert "otad.slot=A" in bootargs(m.boot())
    assert ubootenv.decode(m.env_file()).values["BOOT_A_LEFT"] == "2"


def test_uboot_real_bad_slot_is_not_in_the_order(
    tmp_path: Path, firmware: tuple[Path, Path]
) -> None:
    m = Machine(tmp_path, firmware, env(BOOT_ORDER="A", BOOT_A_LEFT="1", BOOT_B_LEFT="3"))
    assert "otad.slot=A" in bootargs(m.boot())
    assert ubootenv.decode(m.env_file()).values["BOOT_A_LEFT"] == "0"


def test_uboot_real_rescue_boot_with_a_corrupt_env(
    tmp_path: Path, firmware: tuple[Path, Path]
) -> None:
    corrupt = bytearray(env(BOOT_ORDER="B A", BOOT_A_LEFT="3", BOOT_B_LEFT="3"))
    corrupt[20] ^= 0xFF  # CRC no longer matches: env import -c refuses it
    m = Machine(tmp_path, firmware, bytes(corrupt))
    log = m.boot()
    line = bootargs(log)
    assert "otad.slot=A" in line and "otad.rescue=1" in line
    assert "BOOT_ORDER=[]: rescue boot of slot A" in log
    assert m.env_file() == bytes(corrupt)  # nothing saved


def test_uboot_real_last_resort_boots_the_committed_slot(
    tmp_path: Path, firmware: tuple[Path, Path]
) -> None:
    # B committed, A marked bad (not in BOOT_ORDER), B's confirmations lost: B, nothing saved
    before = env(BOOT_ORDER="B", BOOT_A_LEFT="0", BOOT_B_LEFT="0", otad_trial="")
    m = Machine(tmp_path, firmware, before)
    log = m.boot()
    line = bootargs(log)
    assert "otad.slot=B" in line and "otad.rescue=1" in line
    assert "rescue boot of slot B" in log
    assert m.env_file() == before


def test_uboot_real_last_resort_skips_the_slot_on_trial(
    tmp_path: Path, firmware: tuple[Path, Path]
) -> None:
    m = Machine(
        tmp_path,
        firmware,
        env(BOOT_ORDER="B A", BOOT_A_LEFT="0", BOOT_B_LEFT="0", otad_trial="B"),
    )
    line = bootargs(m.boot())
    assert "otad.slot=A" in line and "otad.rescue=1" in line


def test_uboot_real_repaired_env_still_autoboots(
    tmp_path: Path, firmware: tuple[Path, Path]
) -> None:
    # The agent repairs U-Boot's own env storage (pflash 1) after its CRC went bad. U-Boot uses
    # a stored env with a valid CRC instead of its built-in default, so the repaired env must
    # carry the default env (bootcmd...), here the board's u-boot-initial-env, or U-Boot would
    # stop at its prompt. The A/B state is in that env too (no otad_envfile).
    m = Machine(tmp_path, firmware, env(BOOT_ORDER="A B", BOOT_A_LEFT="3", BOOT_B_LEFT="3"))
    initial_env = tmp_path / "u-boot-initial-env"
    initial_env.write_text(
        "bootdelay=0\n"
        "bootcmd=virtio scan; load virtio 0:1 0x40200000 boot.scr && source 0x40200000; poweroff\n"
        "otad_boot=echo OTAD-BOOTARGS: ${bootargs}; poweroff\n"
    )
    with m.flash1.open("r+b") as f:  # a bit flip: the stored env's CRC no longer matches
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    ub = UBootBootloader(
        locations=(EnvLocation(m.flash1, 0, 0x40000),),
        default_env=initial_env,
        lock_file=tmp_path / "fw_printenv.lock",
    )
    with pytest.raises(BootloaderEnvCorrupt):
        ub.state()
    ub.repair("B")
    log = m.boot()
    assert "otad: -> slot B" in log, log[-3000:]
    line = bootargs(log)
    assert "otad.slot=B" in line and "otad.rescue" not in line

"""U-Boot env codec and backend, against the real fw_printenv / fw_setenv / mkenvimage."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from plugins.threads import assert_concurrent_marks_lose_nothing

from otad.agent.bootloader import Bootloader, ubootenv
from otad.agent.bootloader.uboot import (
    LOCK_FILE,
    EnvLocation,
    UBootBootloader,
    parse_default_env,
    parse_fw_env_config,
    scheme_state,
)
from otad.errors import BootloaderEnvCorrupt, BootloaderError, ConfigError

SIZE = 0x4000
names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="=\0"),
    min_size=1,
    max_size=12,
)
values = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40
)


def run(*cmd: str, stdin: str | None = None) -> str:
    return subprocess.run(
        list(cmd), check=True, capture_output=True, text=True, timeout=30, input=stdin
    ).stdout


def printenv(cfg: Path) -> dict[str, str]:
    out = run("fw_printenv", "-c", str(cfg))
    return dict(line.split("=", 1) for line in out.splitlines())


#: A board's default env as `make u-boot-initial-env` writes it (sorted name=value lines).
DEFAULT_ENV = (
    "arch=arm\n"
    "baudrate=115200\n"
    "bootcmd=run distro_bootcmd\n"
    "bootdelay=2\n"
    "distro_bootcmd=for target in ${boot_targets}; do run bootcmd_${target}; done\n"
    "fdtcontroladdr=40000000\n"
    "stdin=pl011@9000000\n"
)


def backend(cfg: Path, tmp_path: Path, **kw: object) -> UBootBootloader:
    """The backend over ``cfg`` with a default env file and a lock file in ``tmp_path``."""
    default_env = tmp_path / "u-boot-initial-env"
    if not default_env.exists():
        default_env.write_text(DEFAULT_ENV)
    return UBootBootloader(
        cfg,
        default_env=default_env,
        lock_file=tmp_path / "fw_printenv.lock",
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def redundant(tmp_path: Path) -> tuple[UBootBootloader, Path]:
    cfg = tmp_path / "fw_env.config"
    cfg.write_text(
        f"# two copies\n{tmp_path}/uboot.env 0x0 0x4000\n{tmp_path}/uboot-redund.env 0x0 0x4000\n"
    )
    ub = backend(cfg, tmp_path)
    ub.initialize(create=True)
    return ub, cfg


@pytest.fixture
def single(tmp_path: Path) -> tuple[UBootBootloader, Path]:
    cfg = tmp_path / "fw_env.config"
    cfg.write_text(f"{tmp_path}/uboot.env 0x0 0x4000\n")
    ub = backend(cfg, tmp_path)
    ub.initialize(create=True)
    return ub, cfg


# --- codec -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(names, values, max_size=8), st.booleans(), st.integers(0, 255))
def test_ubootenv_round_trips(env: dict[str, str], redundant: bool, flags: int) -> None:
    blob = ubootenv.encode(env, 1024, redundant=redundant, flags=flags)
    assert len(blob) == 1024
    got = ubootenv.decode(blob, redundant=redundant)
    assert dict(got.values) == env
    assert got.flags == (flags if redundant else None)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_ubootenv_garbage_never_crashes_the_parser(data: bytes, redundant: bool) -> None:
    with contextlib.suppress(BootloaderEnvCorrupt):
        ubootenv.decode(data, redundant=redundant)
    # a correct CRC over garbage data: still only BootloaderEnvCorrupt or a result
    header = 5 if redundant else 4
    forged = struct.pack("<I", zlib.crc32(data)) + b"\x01" * (header - 4) + data
    with contextlib.suppress(BootloaderEnvCorrupt):
        ubootenv.decode(forged, redundant=redundant)


def test_ubootenv_bad_crc_and_bad_entries_are_corrupt() -> None:
    blob = bytearray(ubootenv.encode({"a": "1"}, 256))
    blob[10] ^= 1
    with pytest.raises(BootloaderEnvCorrupt, match="bad CRC"):
        ubootenv.decode(bytes(blob))
    for data in (b"noequals\0\0", b"=value\0\0", b"a=1" + b"\xff" * 10):
        data = data.ljust(64, b"\xff")
        forged = struct.pack("<I", zlib.crc32(data)) + data
        with pytest.raises(BootloaderEnvCorrupt):
            ubootenv.decode(forged)
    with pytest.raises(BootloaderEnvCorrupt, match="too short"):
        ubootenv.decode(b"\0\0\0")


def test_ubootenv_encode_refuses_bad_input() -> None:
    with pytest.raises(BootloaderError, match="invalid variable"):
        ubootenv.encode({"a=b": "1"}, 256)
    with pytest.raises(BootloaderError, match="invalid variable"):
        ubootenv.encode({"a": "x\0y"}, 256)
    with pytest.raises(BootloaderError, match="do not fit"):
        ubootenv.encode({"a": "x" * 300}, 256)
    with pytest.raises(BootloaderError, match="too small"):
        ubootenv.encode({}, 6)
    with pytest.raises(BootloaderError, match="flags"):
        ubootenv.encode({}, 64, redundant=True, flags=256)


@pytest.mark.parametrize(
    ("f0", "f1", "current"),
    [(1, 1, 0), (2, 1, 0), (1, 2, 1), (0xFF, 0, 1), (0, 0xFF, 0), (0x7F, 0x80, 1), (5, 3, 0)],
)
def test_ubootenv_newer_copy_rule(f0: int, f1: int, current: int) -> None:
    assert ubootenv.newer(f0, f1) == current
    assert ubootenv.next_flags(0xFF) == 0


# --- against the real tools ---------------------------------------------------------------


def test_ubootenv_mkenvimage_images_are_read(tmp_path: Path) -> None:
    txt = tmp_path / "env.txt"
    txt.write_text("BOOT_ORDER=B A\nBOOT_A_LEFT=3\nBOOT_B_LEFT=1\nbootcmd=run x; run y\n")
    single, red = tmp_path / "s.env", tmp_path / "r.env"
    run("mkenvimage", "-s", str(SIZE), "-o", str(single), str(txt))
    run("mkenvimage", "-r", "-s", str(SIZE), "-o", str(red), str(txt))
    expected = {
        "BOOT_ORDER": "B A",
        "BOOT_A_LEFT": "3",
        "BOOT_B_LEFT": "1",
        "bootcmd": "run x; run y",
    }
    assert dict(ubootenv.decode(single.read_bytes()).values) == expected
    env = ubootenv.decode(red.read_bytes(), redundant=True)
    assert dict(env.values) == expected and env.flags == 1


def test_ubootenv_fw_printenv_reads_single_copy(single: tuple[UBootBootloader, Path]) -> None:
    ub, cfg = single
    ub.try_once("B")
    env = printenv(cfg)
    assert env["BOOT_ORDER"] == "B A" and env["BOOT_B_LEFT"] == "1" and env["otad_trial"] == "B"


def test_ubootenv_we_read_fw_setenv_single(single: tuple[UBootBootloader, Path]) -> None:
    ub, cfg = single
    run("fw_setenv", "-c", str(cfg), "BOOT_ORDER", "B")
    run("fw_setenv", "-c", str(cfg), "multi", "a b\nc")
    assert ub.values()["BOOT_ORDER"] == "B" and ub.values()["multi"] == "a b\nc"
    assert ub.state().slot("A").bad


def test_ubootenv_redundant_alternates_with_fw_setenv(
    redundant: tuple[UBootBootloader, Path],
) -> None:
    ub, cfg = redundant
    flags_seen = []
    for i in range(6):
        if i % 2:
            run("fw_setenv", "-c", str(cfg), "BOOT_A_LEFT", str(i))
        else:
            ub.write({"BOOT_A_LEFT": str(i)})
        env = printenv(cfg)
        assert env["BOOT_A_LEFT"] == str(i), f"step {i}"
        values, _, flags = ub.read()
        assert values["BOOT_A_LEFT"] == str(i)
        flags_seen.append(flags)
    assert flags_seen == [2, 3, 4, 5, 6, 7]  # initialize wrote flags 0 and 1


def test_ubootenv_flags_wrap_around(
    redundant: tuple[UBootBootloader, Path], tmp_path: Path
) -> None:
    ub, cfg = redundant
    env0 = ubootenv.encode({"BOOT_ORDER": "A B", "x": "old"}, SIZE, redundant=True, flags=0xFE)
    env1 = ubootenv.encode({"BOOT_ORDER": "A B", "x": "new"}, SIZE, redundant=True, flags=0xFF)
    (tmp_path / "uboot.env").write_bytes(env0)
    (tmp_path / "uboot-redund.env").write_bytes(env1)
    assert ub.values()["x"] == "new" and printenv(cfg)["x"] == "new"
    ub.write({"x": "wrapped"})  # goes to copy 0 with flags 0x00
    assert ubootenv.decode((tmp_path / "uboot.env").read_bytes(), redundant=True).flags == 0
    assert ub.values()["x"] == "wrapped" and printenv(cfg)["x"] == "wrapped"


def test_ubootenv_copies_at_an_offset_in_one_device(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\xaa" * 0x30000)
    cfg = tmp_path / "fw_env.config"
    cfg.write_text(f"{disk} 0x10000 0x4000\n{disk} 0x20000 0x4000\n")
    ub = backend(cfg, tmp_path)
    ub.initialize()  # the device exists: nothing to create
    ub.mark_bad("B")
    assert printenv(cfg)["BOOT_ORDER"] == "A"
    data = disk.read_bytes()
    assert data[:0x10000] == b"\xaa" * 0x10000 and data[0x14000:0x20000] == b"\xaa" * 0xC000


# --- backend -------------------------------------------------------------------------------


def test_uboot_scheme_operations(redundant: tuple[UBootBootloader, Path]) -> None:
    ub, cfg = redundant
    assert isinstance(ub, Bootloader)
    assert ub.primary() == "A" and ub.state().slot("B").good
    ub.mark_bad("B")
    env = printenv(cfg)
    assert env["BOOT_ORDER"] == "A" and env["BOOT_B_LEFT"] == "0"
    assert ub.state().slot("B").bad and ub.primary() == "A"
    ub.try_once("B")
    env = printenv(cfg)
    assert (env["BOOT_ORDER"], env["BOOT_B_LEFT"], env["otad_trial"]) == ("B A", "1", "B")
    assert ub.state().slot("B").on_trial and ub.state().slot("A").good
    # what boot.cmd does at boot: decrement and save
    run("fw_setenv", "-c", str(cfg), "BOOT_B_LEFT", "0")
    assert ub.primary() == "A"
    ub.mark_good("B")
    env = printenv(cfg)
    assert (env["BOOT_ORDER"], env["BOOT_B_LEFT"], env["otad_trial"]) == ("B A", "3", "")
    assert ub.state().slot("B").good


def test_uboot_mark_good_keeps_a_bad_slot_out_of_the_order(
    redundant: tuple[UBootBootloader, Path],
) -> None:
    ub, _ = redundant
    ub.mark_bad("B")
    ub.mark_good("A")
    assert ub.values()["BOOT_ORDER"] == "A"


def test_uboot_scheme_state_tolerates_junk_values() -> None:
    st_ = scheme_state({"BOOT_ORDER": "B B X A", "BOOT_A_LEFT": "x", "BOOT_B_LEFT": "2"})
    assert st_.order == ("B", "A") and st_.slot("A").tries_left == 0 and st_.next_boot() == "B"
    assert scheme_state({}).next_boot() is None


@pytest.mark.parametrize("cut", [0, 1, 4, 5, 30, 50, 100, SIZE // 2, SIZE - 1, SIZE])
def test_uboot_torn_redundant_write_keeps_the_previous_state(
    redundant: tuple[UBootBootloader, Path], tmp_path: Path, cut: int
) -> None:
    ub, cfg = redundant
    ub.try_once("B")
    before = ub.state()
    _, index, _ = ub.read()
    target = ub.locations[1 - index].device  # where the next write goes
    old = target.read_bytes()
    ub.mark_bad("B")
    new = target.read_bytes()
    after = ub.state()
    target.write_bytes(new[:cut] + old[cut:])  # the power went after `cut` bytes
    # the copy is whole once every differing byte got through (the rest is equal padding)
    whole = new[cut:] == old[cut:]
    assert ub.state() == (after if whole else before)
    assert printenv(cfg)["BOOT_ORDER"] == ("A" if whole else "B A")  # libubootenv agrees


def test_uboot_torn_single_write_is_detected(single: tuple[UBootBootloader, Path]) -> None:
    ub, _ = single
    path = ub.locations[0].device
    old = path.read_bytes()
    ub.mark_bad("B")
    new = path.read_bytes()
    path.write_bytes(new[:20] + old[20:])  # torn inside the entries
    with pytest.raises(BootloaderEnvCorrupt, match="bad CRC"):
        ub.state()


def test_uboot_both_copies_corrupt_is_env_corrupt(redundant: tuple[UBootBootloader, Path]) -> None:
    ub, _ = redundant
    for loc in ub.locations:
        loc.device.write_bytes(b"\0" * SIZE)
    with pytest.raises(BootloaderEnvCorrupt, match="no valid env copy"):
        ub.state()


@pytest.mark.parametrize("copies", [1, 2])
def test_uboot_missing_env_device_is_an_error_not_a_corrupt_env(
    tmp_path: Path, copies: int
) -> None:
    # fw_env.config names a device that is not there (wrong name, not probed yet): not an env
    # to repair, and repair must not create a regular file where the device should be
    dev = tmp_path / "mmcblk1"
    cfg = tmp_path / "fw_env.config"
    cfg.write_text("".join(f"{dev} {0x3C0000 + i * 0x20000:#x} 0x2000\n" for i in range(copies)))
    ub = backend(cfg, tmp_path)
    for call in (ub.state, lambda: ub.mark_bad("B"), lambda: ub.repair("A"), ub.initialize):
        with pytest.raises(BootloaderError, match=r"env device .*mmcblk1 does not exist") as e:
            call()
        assert not isinstance(e.value, BootloaderEnvCorrupt)
    assert not dev.exists()


def test_uboot_one_missing_copy_of_two_is_an_error(redundant: tuple[UBootBootloader, Path]) -> None:
    ub, _ = redundant
    ub.locations[1].device.unlink()
    with pytest.raises(BootloaderError, match=r"uboot-redund\.env does not exist") as e:
        ub.state()
    assert not isinstance(e.value, BootloaderEnvCorrupt)
    with pytest.raises(BootloaderError, match="does not exist"):
        ub.repair("A")
    assert not ub.locations[1].device.exists()


def test_uboot_unwritable_env_is_a_bootloader_error(
    redundant: tuple[UBootBootloader, Path],
) -> None:
    ub, _ = redundant
    _, index, _ = ub.read()
    other = ub.locations[1 - index].device
    other.unlink()
    other.mkdir()
    with pytest.raises(BootloaderError, match="cannot write env"):
        ub.mark_bad("B")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "one or two"),
        ("/a 0 0x4000\n/b 0 0x4000\n/c 0 0x4000\n", "one or two"),
        ("/a 0\n", "need"),
        ("/a zero 0x4000\n", "bad number"),
        ("/a 0 4\n", "bad offset or size"),
        ("/a 0 0x4000\n/b 0 0x2000\n", "same size"),
        # raw flash: erase cycles and other flag values; written the block way, U-Boot would
        # not read it back
        ("/dev/mtd1 0x0 0x10000 0x10000\n/dev/mtd2 0x0 0x10000 0x10000\n", "raw MTD"),
        ("/dev/mtd0 0x3c0000 0x20000\n", "raw MTD"),
    ],
)
def test_uboot_bad_fw_env_config_is_a_config_error(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_fw_env_config(text)


def test_uboot_fw_env_config_parses_comments_and_sectors() -> None:
    locs = parse_fw_env_config(
        "# c\n/dev/mmcblk0 0x3c0000 0x20000 0x200 # env\n\n/dev/mmcblk0 0x3e0000 0x20000\n"
    )
    assert locs == (
        EnvLocation(Path("/dev/mmcblk0"), 0x3C0000, 0x20000),
        EnvLocation(Path("/dev/mmcblk0"), 0x3E0000, 0x20000),
    )


def test_uboot_shipped_fw_env_config_example_parses() -> None:
    example = Path(__file__).resolve().parents[2] / "boot" / "u-boot" / "fw_env.config"
    locs = parse_fw_env_config(example.read_text())
    assert len(locs) == 2


@pytest.mark.parametrize("attempts", [0, 10])
def test_uboot_attempts_stay_one_digit(tmp_path: Path, attempts: int) -> None:
    with pytest.raises(ConfigError, match=r"1\.\.9"):
        UBootBootloader(locations=(EnvLocation(tmp_path / "e", 0, SIZE),), attempts=attempts)


# --- the shipped boot script ---------------------------------------------------------------

BOOT_CMD = Path(__file__).resolve().parents[2] / "boot" / "u-boot" / "boot.cmd"


def test_uboot_boot_cmd_compiles_with_mkimage(tmp_path: Path) -> None:
    out = tmp_path / "boot.scr"
    run("mkimage", "-A", "arm64", "-T", "script", "-C", "none", "-d", str(BOOT_CMD), str(out))
    info = run("mkimage", "-l", str(out))
    assert "Script" in info and out.stat().st_size > BOOT_CMD.stat().st_size


def test_uboot_boot_cmd_uses_the_backend_variables() -> None:
    script = BOOT_CMD.read_text()
    for name in (
        "BOOT_ORDER",
        "BOOT_A_LEFT",
        "BOOT_B_LEFT",
        "otad_trial",
        "otad.slot=${otad_slot}",
    ):
        assert name in script
    # balanced hush blocks
    words = script.split()
    assert words.count("if") == words.count("fi")
    assert words.count("do") == words.count("done")


def test_uboot_repair_rewrites_a_lost_env(redundant: tuple[UBootBootloader, Path]) -> None:
    ub, cfg = redundant
    for loc in ub.locations:
        loc.device.write_bytes(b"\0" * SIZE)
    with pytest.raises(BootloaderEnvCorrupt):
        ub.state()
    ub.repair("B")
    env = printenv(cfg)
    assert env["BOOT_ORDER"] == "B" and env["BOOT_B_LEFT"] == "3" and env["BOOT_A_LEFT"] == "0"
    assert ub.state().slot("A").bad and ub.primary() == "B"


@pytest.mark.parametrize("layout", ["redundant", "single"])
def test_uboot_repair_keeps_u_boots_default_env(
    layout: str, request: pytest.FixtureRequest
) -> None:
    # U-Boot uses a stored env with a valid CRC instead of its built-in default: an env of only
    # otad's variables has no bootcmd and U-Boot stops at its prompt
    ub, cfg = request.getfixturevalue(layout)
    for loc in ub.locations:
        loc.device.write_bytes(b"\0" * SIZE)
    ub.repair("A")
    env = printenv(cfg)
    default = dict(line.split("=", 1) for line in DEFAULT_ENV.splitlines())
    assert {k: env.get(k) for k in default} == default
    assert env["bootcmd"] == "run distro_bootcmd"
    assert env["BOOT_ORDER"] == "A" and env["BOOT_A_LEFT"] == "3" and env["BOOT_B_LEFT"] == "0"
    assert env["otad_trial"] == ""
    assert ub.primary() == "A" and ub.state().slot("B").bad


def test_uboot_fresh_env_keeps_u_boots_default_env(redundant: tuple[UBootBootloader, Path]) -> None:
    _, cfg = redundant
    env = printenv(cfg)
    assert env["bootcmd"] == "run distro_bootcmd" and env["baudrate"] == "115200"
    assert env["BOOT_ORDER"] == "A B" and env["BOOT_A_LEFT"] == env["BOOT_B_LEFT"] == "3"


def test_uboot_repair_without_default_env_writes_nothing(
    redundant: tuple[UBootBootloader, Path], tmp_path: Path
) -> None:
    ub, _ = redundant
    for loc in ub.locations:
        loc.device.write_bytes(b"\0" * 100 + b"\x5a" * (SIZE - 100))
    before = [loc.device.read_bytes() for loc in ub.locations]
    missing = tmp_path / "no-such-initial-env"
    lost = UBootBootloader(
        locations=ub.locations, default_env=missing, lock_file=tmp_path / "fw_printenv.lock"
    )
    with pytest.raises(BootloaderError, match=r"default env .*no-such-initial-env"):
        lost.repair("A")
    assert [loc.device.read_bytes() for loc in ub.locations] == before


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("# only a comment\n\n", "empty"),
        ("bootcmd=run x\nno equals sign\n", r":2: not a 'name=value' line"),
        ("=value\n", r":1: not a 'name=value' line"),
    ],
)
def test_uboot_bad_default_env_is_refused(text: str, match: str) -> None:
    with pytest.raises(BootloaderError, match=match):
        parse_default_env(text)


def test_uboot_default_env_format() -> None:
    text = "# comment\nbootcmd=run a; run b\n\nbootargs=console=ttyS0 x=y\nempty=\n"
    assert parse_default_env(text) == {
        "bootcmd": "run a; run b",
        "bootargs": "console=ttyS0 x=y",
        "empty": "",
    }


class Crash(Exception):
    """Stands for os._exit in the crash matrix: the process ends in the middle of a write."""


def test_uboot_fault_hook_tears_a_real_write(redundant: tuple[UBootBootloader, Path]) -> None:
    ub, cfg = redundant

    def fault(point: str) -> None:
        raise Crash(point)

    torn = backend(cfg, cfg.parent, fault=fault)
    before = ub.state()
    with pytest.raises(Crash, match="bootloader_env_half_written"):
        torn.mark_bad("B")
    assert ub.state() == before
    assert printenv(cfg)["BOOT_ORDER"] == "A B"
    ub.mark_bad("B")  # the next write goes over the torn copy and wins
    assert printenv(cfg)["BOOT_ORDER"] == "A"


def test_uboot_concurrent_writers_never_lose_an_update(
    redundant: tuple[UBootBootloader, Path], tmp_path: Path
) -> None:
    # the daemon and `otad agent mark-bad`: separate instances, real flock on separate fds
    one, cfg = redundant
    assert_concurrent_marks_lose_nothing(one, backend(cfg, tmp_path))


def test_uboot_agent_and_fw_setenv_never_lose_each_others_change(tmp_path: Path) -> None:
    # fw_setenv (libubootenv) flocks /var/lock/fw_printenv.lock: the agent must take the same
    if not os.access(LOCK_FILE.parent, os.W_OK):
        pytest.skip(f"{LOCK_FILE.parent} is not writable here")
    cfg = tmp_path / "fw_env.config"
    cfg.write_text(f"{tmp_path}/e0 0 0x2000\n{tmp_path}/e1 0 0x2000\n")
    (tmp_path / "u-boot-initial-env").write_text(DEFAULT_ENV)
    ub = UBootBootloader(cfg, default_env=tmp_path / "u-boot-initial-env")
    assert ub.lock_file == LOCK_FILE
    ub.initialize(create=True)
    for i in range(150):
        ub.mark_bad("B")
        tool = subprocess.Popen(["fw_setenv", "-c", str(cfg), "serial_note", f"n{i}"])
        agent = threading.Thread(target=lambda: ub.try_once("B"))
        agent.start()
        agent.join(30)
        assert tool.wait(30) == 0
        env = printenv(cfg)
        assert env["otad_trial"] == "B" and env["serial_note"] == f"n{i}", f"round {i}"
        assert env["bootcmd"] == "run distro_bootcmd"

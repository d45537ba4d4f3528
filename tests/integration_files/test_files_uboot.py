"""meta-otad's U-Boot glue: boot.scr from the repository's boot.cmd, the initial environment
written by the agent's own backend at the offsets of the repository's fw_env.config, and the
wks layout that keeps the environment below the first partition. Checked with the real
`mkimage`, `fw_printenv` and `fw_setenv` on files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from integration_files.layerfiles import LAYER, REPO, bitbake_assignments, parse_env, parse_wks
from otad.agent.bootloader.uboot import UBootBootloader, parse_fw_env_config

RECIPE = LAYER / "recipes-bsp" / "otad-uboot" / "otad-uboot_1.0.bb"
SCRIPT = RECIPE.parent / "files" / "otad-initial-ubootenv.py"
FW_ENV = REPO / "boot" / "u-boot" / "fw_env.config"
WKS = LAYER / "wic" / "otad-ab-uboot.wks"


def kib(value: str) -> int:
    assert value.endswith("K"), value
    return int(value[:-1]) * 1024


def run(*argv: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_uboot_recipe_fetches_the_repository_files() -> None:
    assigns = bitbake_assignments(RECIPE.read_text())
    (extra,) = [v for _, v in assigns["FILESEXTRAPATHS:prepend"]]
    directory = (RECIPE.parent / extra.removeprefix("${THISDIR}/").rstrip(":")).resolve()
    assert directory == (REPO / "boot" / "u-boot").resolve()
    (uri,) = [v for _, v in assigns["SRC_URI"]]
    fetched = {u.removeprefix("file://") for u in uri.split()}
    assert {"boot.cmd", "fw_env.config"} <= fetched
    assert all(
        (directory / f).is_file() or (RECIPE.parent / "files" / f).is_file() for f in fetched
    )


#: What the U-Boot recipe deploys as u-boot-initial-env (`make u-boot-initial-env`).
DEFAULT_ENV = "bootcmd=run distro_bootcmd\nbootdelay=2\ndistro_bootcmd=run bootcmd_mmc0\n"


def test_uboot_initial_env_lands_where_fw_env_config_says(tmp_path: Path) -> None:
    out = tmp_path / "env"
    default_env = tmp_path / "u-boot-initial-env"
    default_env.write_text(DEFAULT_ENV)
    run(sys.executable, SCRIPT, FW_ENV, default_env, out)
    locations = parse_fw_env_config(FW_ENV.read_text())
    assert len(locations) == 2, "the shipped fw_env.config uses the redundant layout"
    offsets = dict(line.split() for line in (out / "offsets").read_text().splitlines())
    assert [int(offsets[f"copy{i}.bin"]) for i in range(2)] == [loc.offset for loc in locations]
    # Assemble a disk the way wic's rawcopy lines do, then read it back as a device would.
    _, parts = parse_wks(WKS.read_text())
    raw = [p for p in parts if p.options.get("--source") == "rawcopy"]
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(8 * 1024 * 1024)
        for part in raw:
            name = part.options["--sourceparams"].removeprefix("file=otad-uboot/")
            f.seek(kib(part.options["--offset"]))
            f.write((out / name).read_bytes())
    config = tmp_path / "fw_env.config"
    config.write_text("".join(f"{disk} {hex(loc.offset)} {hex(loc.size)}\n" for loc in locations))
    state = UBootBootloader(config).state()
    assert state.order == ("A", "B")
    printed = run("fw_printenv", "-c", config)
    assert "BOOT_ORDER=A B" in printed and "BOOT_A_LEFT=3" in printed
    # U-Boot uses this env instead of its built-in one: its bootcmd must be there
    assert "bootcmd=run distro_bootcmd" in printed and "bootdelay=2" in printed
    # libubootenv can write it too (it flips to the other copy): the format is the real one.
    run("fw_setenv", "-c", config, "BOOT_B_LEFT", "0")
    assert "BOOT_B_LEFT=0" in run("fw_printenv", "-c", config)


def test_uboot_initial_env_needs_the_default_env(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(FW_ENV), str(tmp_path / "missing"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0 and "default env" in result.stderr
    assert not list((tmp_path / "o").glob("copy*.bin"))


def test_uboot_wks_keeps_the_env_below_the_first_partition() -> None:
    locations = parse_fw_env_config(FW_ENV.read_text())
    _, parts = parse_wks(WKS.read_text())
    raw = [p for p in parts if p.options.get("--source") == "rawcopy"]
    assert sorted(kib(p.options["--offset"]) for p in raw) == sorted(
        loc.offset for loc in locations
    )
    first = next(p for p in parts if "--no-table" not in p.options)
    start = int(first.options["--align"]) * 1024
    assert max(loc.offset + loc.size for loc in locations) <= start


def test_uboot_boot_script_defaults_match_the_layout() -> None:
    """boot.cmd's GPT names and partition numbers agree with the wks and the names file."""
    text = (REPO / "boot" / "u-boot" / "boot.cmd").read_text()
    names = parse_env((LAYER / "wic" / "otad-partitions.env").read_text())
    _, parts = parse_wks(WKS.read_text())
    named = [p for p in parts if "--no-table" not in p.options]
    number = {p.options["--part-name"]: i + 1 for i, p in enumerate(named)}
    for slot, key in (("a", "OTAD_PART_ROOTFS_A"), ("b", "OTAD_PART_ROOTFS_B")):
        label = names[key]
        assert f"setenv otad_label_{slot} {label}\n" in text
        assert f"setenv otad_part_{slot} {number[label]}\n" in text

"""The layer's own recipe code, executed: the shell tasks with /bin/sh and the python handlers
with a small stand-in for BitBake's datastore. BitBake would first expand ``${VAR}``; the tests
do that from the recipes' own defaults plus the values a build provides (D, sysconfdir, ...),
failing on any variable they do not know. Native tools are this machine's: `nativepython3` is
this checkout's Python, `uboot-mkimage` is u-boot-tools' `mkimage`.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from integration_files.layerfiles import (
    LAYER,
    REPO,
    SYSTEMD,
    FakeBitbake,
    FakeDatastore,
    bitbake_assignments,
    expand_python,
    parse_unit,
    python_task,
    shell_function,
    unit_values,
)
from otad.agent.bootloader.grub import GrubBootloader
from otad.agent.bootloader.uboot import UBootBootloader
from otad.agent.config import parse as parse_agent_config
from otad.bundle import generate_private_key, key_id_of, public_key_pem

CONF = LAYER / "recipes-otad" / "otad-conf" / "otad-conf_1.0.bb"
OTAD = next((LAYER / "recipes-otad" / "otad").glob("otad_*.bb"))
GRUBENV = LAYER / "recipes-bsp" / "otad-grubenv" / "otad-grubenv_1.0.bb"
UBOOT = LAYER / "recipes-bsp" / "otad-uboot" / "otad-uboot_1.0.bb"
SANITY = LAYER / "classes-global" / "otad-sanity.bbclass"
BUNDLE_CLASS = LAYER / "classes-recipe" / "otad-bundle.bbclass"
IMAGE_CLASS = LAYER / "classes-recipe" / "otad-image.bbclass"

BUILD = {
    "MACHINE": "qemux86-64",
    "sysconfdir": "/etc",
    "bindir": "/usr/bin",
    "nonarch_libdir": "/usr/lib",
    "systemd_system_unitdir": "/usr/lib/systemd/system",
}
# BitBake runs shell tasks with /bin/sh and its logging functions; the native tools are
# commands on PATH (put there as small wrapper scripts).
SHIMS = """
set -e
bbwarn() { echo "WARNING: $*" >&2; }
bbfatal() { echo "FATAL: $*" >&2; exit 1; }
"""
NATIVE_TOOLS = {
    "nativepython3": f'exec "{sys.executable}" "$@"',
    "uboot-mkimage": 'exec mkimage "$@"',
}


def defaults(recipe: Path) -> dict[str, str]:
    """Every plain assignment of the recipe (its last one wins, like a parse without overrides)."""
    return {var: values[-1][1] for var, values in bitbake_assignments(recipe.read_text()).items()}


def stage_sources(recipe: Path, unpack: Path, variables: dict[str, str]) -> None:
    """Copy the recipe's file:// SRC_URI entries into UNPACKDIR as the fetcher would."""
    extra = variables.get("FILESEXTRAPATHS:prepend", "").removeprefix("${THISDIR}/").rstrip(":")
    search = [recipe.parent / "files", *([recipe.parent / extra] if extra else [])]
    unpack.mkdir(parents=True, exist_ok=True)
    for uri in expand_python(variables["SRC_URI"], variables).split():
        name = uri.removeprefix("file://").split(";")[0]
        source = next((d / name for d in search if (d / name).exists()), None)
        assert source is not None, f"{recipe.name}: {uri} not found in {search}"
        if source.is_dir():
            shutil.copytree(source, unpack / name)
        else:
            shutil.copy2(source, unpack / name)


def run_shell(recipe: Path, function: str, variables: dict[str, str], cwd: Path) -> str:
    body = shell_function(recipe.read_text(), function)
    script = SHIMS + expand_python(body, variables)
    tools = cwd / ".native-bin"
    tools.mkdir(exist_ok=True)
    for name, line in NATIVE_TOOLS.items():
        (tools / name).write_text(f"#!/bin/sh\n{line}\n")
        (tools / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{tools}:{os.environ['PATH']}")
    result = subprocess.run(
        ["sh", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


def conf_variables(tmp_path: Path, **overrides: str) -> dict[str, str]:
    variables = defaults(CONF) | BUILD | overrides
    variables.update(D=str(tmp_path / "image"), UNPACKDIR=str(tmp_path / "unpack"))
    stage_sources(CONF, tmp_path / "unpack", variables)
    return variables


# --- otad-conf --------------------------------------------------------------------------------


def test_conf_install_builds_a_tree_the_agent_accepts(tmp_path: Path) -> None:
    data = tmp_path / "data" / "otad"
    (data / "identity").mkdir(parents=True)
    (data / "identity" / "device-id").write_text("dev-000123\n")
    variables = conf_variables(tmp_path, OTAD_DATA_DIR=str(data))
    warnings = run_shell(CONF, "do_install", variables, tmp_path)
    image = tmp_path / "image"
    toml = image / "etc" / "otad" / "otad.toml"
    assert stat.S_IMODE(toml.stat().st_mode) == 0o644
    config = parse_agent_config(tomllib.loads(toml.read_text()))
    assert config.device_id == "dev-000123" and config.compatible == "qemux86-64"
    assert (config.slots.a.label, config.slots.b.label) == ("rootfs_a", "rootfs_b")
    assert config.bootloader.grub_env_dir == Path("/boot/efi/EFI/BOOT")
    assert (image / "etc" / "otad" / "ca.pem").is_file()
    assert len(list((image / "etc" / "otad" / "keyring").glob("*.pem"))) == 1
    units = image / "usr" / "lib" / "systemd" / "system"
    assert "What=/dev/disk/by-partlabel/data" in (units / "data.mount").read_text()
    assert "What=/dev/disk/by-partlabel/esp" in (units / "boot-efi.mount").read_text()
    # The same directories, seen from the device, are the ones systemd/otad.tmpfiles creates.
    tmpfiles = (SYSTEMD / "otad.tmpfiles").read_text()
    on_device = Path(defaults(CONF)["OTAD_DATA_DIR"])
    assert config.broker.key is not None
    for local in (config.state_dir, config.broker.key.parent):
        assert f" {on_device / local.relative_to(data)} " in tmpfiles
    # The shipped examples are flagged, both of them.
    assert warnings.count("WARNING: otad-conf:") == 2 and "EXAMPLE" in warnings


def test_conf_install_is_quiet_with_own_keys(tmp_path: Path) -> None:
    variables = conf_variables(tmp_path)
    own = tmp_path / "unpack" / "product-keyring"
    own.mkdir()
    key = generate_private_key()
    (own / f"{key_id_of(key)}.pem").write_bytes(public_key_pem(key))
    (own / "revoked").write_text("0000000000000000\n")
    ca = tmp_path / "unpack" / "product-ca.pem"
    ca.write_bytes(public_key_pem(generate_private_key()))  # any other file: not the example
    variables.update(OTAD_KEYRING_DIR="product-keyring", OTAD_CA_FILE="product-ca.pem")
    warnings = run_shell(CONF, "do_install", variables, tmp_path)
    assert warnings == ""
    keyring = tmp_path / "image" / "etc" / "otad" / "keyring"
    assert sorted(p.name for p in keyring.iterdir()) == [f"{key_id_of(key)}.pem", "revoked"]


def test_conf_mount_units_verify_clean(tmp_path: Path) -> None:
    run_shell(CONF, "do_install", conf_variables(tmp_path), tmp_path)
    units = tmp_path / "image" / "usr" / "lib" / "systemd" / "system"
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "data.mount", "boot-efi.mount"],
        cwd=units,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    assert "Where=/data\n" in (units / "data.mount").read_text()
    assert "Where=/boot/efi\n" in (units / "boot-efi.mount").read_text()


def test_conf_grub_env_dir_is_where_the_image_puts_the_env(tmp_path: Path) -> None:
    """otad-conf's grub_env_dir, otad-image's ESP destinations and otad-grubenv's output agree."""
    data = tmp_path / "data" / "otad"
    (data / "identity").mkdir(parents=True)
    (data / "identity" / "device-id").write_text("dev-000123\n")
    run_shell(CONF, "do_install", conf_variables(tmp_path, OTAD_DATA_DIR=str(data)), tmp_path)
    toml = (tmp_path / "image" / "etc" / "otad" / "otad.toml").read_text()
    config = parse_agent_config(tomllib.loads(toml))
    deploy = build_grubenv(tmp_path / "grubenv", initramfs="")
    esp = tmp_path / "esp"
    for entry in defaults(IMAGE_CLASS)["OTAD_IMAGE_GRUB_FILES"].split():
        source, dest = entry.split(";")
        (esp / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(deploy.parent / source, esp / dest)
    env_dir = esp / config.bootloader.grub_env_dir.relative_to("/boot/efi")
    assert GrubBootloader(env_dir).state().order == ("A", "B")
    assert (env_dir / "otad-local.cfg").is_file()  # grub.cfg sources it from ${prefix}
    assert (REPO / "boot" / "grub" / "grub.cfg").read_text().count('"${prefix}/otad-local.cfg"')


def unit_service_values(key: str) -> list[str]:
    return unit_values(parse_unit((SYSTEMD / "otad.service").read_text()), "Service", key)


def writable(path: Path) -> bool:
    """Whether otad.service's sandbox lets the agent write ``path``."""
    roots = [Path(p.lstrip("-")) for v in unit_service_values("ReadWritePaths") for p in v.split()]
    return any(path == root or root in path.parents for root in roots)


DEVICE_GROUPS = {
    "mmcblk": "block-mmc",
    "sd": "block-sd",
    "nvme": "block-blkext",
    "vd": "block-virtblk",
}


def test_agent_sandbox_allows_what_the_default_config_writes(tmp_path: Path) -> None:
    """state dir, GRUB env dir and U-Boot env copies of the shipped configs are writable."""
    variables = conf_variables(tmp_path, OTAD_DATA_DIR="/data/otad")
    run_shell(CONF, "do_install", variables, tmp_path)
    raw = tomllib.loads((tmp_path / "image" / "etc" / "otad" / "otad.toml").read_text())
    assert writable(Path(raw["state_dir"]))
    assert writable(Path(raw["bootloader"]["grub_env_dir"]))
    allowed = {a.split()[0] for a in unit_service_values("DeviceAllow")}
    fw_env = (REPO / "boot" / "u-boot" / "fw_env.config").read_text()
    for line in fw_env.splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        device = Path(fields[0])
        if device.parent == Path("/dev"):
            group = next(g for prefix, g in DEVICE_GROUPS.items() if device.name.startswith(prefix))
            assert group in allowed, f"{device}: add DeviceAllow={group} rw"
        else:
            assert writable(device), f"{device} is not in ReadWritePaths"
    # the FAT-file variant the file documents in its comments, too
    for line in fw_env.splitlines():
        words = line.lstrip("# ").split()
        if words and words[0].startswith("/boot/"):
            assert writable(Path(words[0])), words[0]


# --- otad: units and tmpfiles -------------------------------------------------------------------


def test_otad_install_ships_the_repository_units(tmp_path: Path) -> None:
    variables = defaults(OTAD) | BUILD | {"D": str(tmp_path / "image"), "S": str(REPO)}
    run_shell(OTAD, "do_install:append:class-target", variables, tmp_path)
    units = tmp_path / "image" / "usr" / "lib" / "systemd" / "system"
    for name in ("otad.service", "otad-health.service"):
        assert (units / name).read_text() == (SYSTEMD / name).read_text()
    tmpfiles = tmp_path / "image" / "usr" / "lib" / "tmpfiles.d" / "otad.conf"
    assert tmpfiles.read_text() == (SYSTEMD / "otad.tmpfiles").read_text()
    systemd_service = defaults(OTAD)["SYSTEMD_SERVICE:${PN}"].split()
    assert sorted(systemd_service) == sorted(p.name for p in units.iterdir())


# --- otad-grubenv ---------------------------------------------------------------------------------


def build_grubenv(work: Path, initramfs: str) -> Path:
    """Run otad-grubenv's do_compile and do_deploy; the deployed otad-grub/ directory."""
    variables = defaults(GRUBENV) | BUILD
    variables.update(
        KERNEL_IMAGETYPE="bzImage",
        INITRAMFS_IMAGE=initramfs,
        UNPACKDIR=str(work / "unpack"),
        B=str(work / "build"),
        DEPLOYDIR=str(work / "deploy"),
    )
    stage_sources(GRUBENV, work / "unpack", variables)
    (work / "build").mkdir(parents=True)
    run_shell(GRUBENV, "do_compile", variables, work / "build")
    run_shell(GRUBENV, "do_deploy", variables, work)
    return work / "deploy" / "otad-grub"


@pytest.mark.parametrize("initramfs", ["", "core-image-minimal-initramfs"])
def test_grubenv_compile_writes_env_the_agent_reads(tmp_path: Path, initramfs: str) -> None:
    deployed = build_grubenv(tmp_path, initramfs)
    assert GrubBootloader(deployed).state().order == ("A", "B")
    listed = subprocess.run(
        ["grub-editenv", str(deployed / "grubenv.0"), "list"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.split()
    assert ("otad_noinitrd=1" in listed) == (initramfs == "")
    local = (deployed / "otad-local.cfg").read_text().splitlines()
    assert local == ["set otad_kernel=/boot/bzImage", "set otad_console=ttyS0,115200"]


# --- otad-uboot -----------------------------------------------------------------------------------


def test_uboot_compile_and_deploy(tmp_path: Path) -> None:
    assert shutil.which("mkimage"), "mkimage is missing (package u-boot-tools)"
    variables = defaults(UBOOT) | BUILD
    variables.update(
        UBOOT_ARCH="arm64",
        UNPACKDIR=str(tmp_path / "unpack"),
        B=str(tmp_path / "build"),
        DEPLOYDIR=str(tmp_path / "deploy"),
        # what u-boot.inc deploys into DEPLOY_DIR_IMAGE (do_compile depends on that deploy)
        DEPLOY_DIR_IMAGE=str(tmp_path / "deploy-image"),
    )
    (tmp_path / "deploy-image").mkdir()
    (tmp_path / "deploy-image" / "u-boot-initial-env").write_text("bootcmd=run distro_bootcmd\n")
    stage_sources(UBOOT, tmp_path / "unpack", variables)
    (tmp_path / "build").mkdir()
    run_shell(UBOOT, "do_compile", variables, tmp_path / "build")
    run_shell(UBOOT, "do_deploy", variables, tmp_path)
    deployed = tmp_path / "deploy" / "otad-uboot"
    info = subprocess.run(
        ["mkimage", "-l", str(deployed / "boot.scr")],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    assert "Script" in info and "otad A/B" in info
    config = tmp_path / "fw_env.config"
    config.write_text(f"{deployed / 'copy0.bin'} 0x0 0x2000\n{deployed / 'copy1.bin'} 0x0 0x2000\n")
    assert UBootBootloader(config).state().order == ("A", "B")
    assert UBootBootloader(config).values()["bootcmd"] == "run distro_bootcmd"


# --- classes: the sanity handler and the bundle class's parse-time checks --------------------


def run_python(path: Path, name: str, variables: dict[str, str]) -> FakeBitbake:
    namespace: dict[str, object] = {}
    exec(python_task(path.read_text(), name), namespace)  # noqa: S102 - the layer's own code
    bb = FakeBitbake()
    function = namespace[name]
    assert callable(function)
    function(FakeDatastore(variables), None, bb)
    return bb


@pytest.mark.parametrize(
    ("features", "skip", "expected"),
    [
        ("systemd usrmerge", "0", "is not in DISTRO_FEATURES"),
        ("systemd otad", "0", None),
        ("otad", "0", "not 'systemd'"),
        ("systemd", "1", None),
    ],
)
def test_sanity_class_warns_exactly_when_the_flag_is_missing(
    features: str, skip: str, expected: str | None
) -> None:
    bb = run_python(
        SANITY, "otad_sanity_check", {"DISTRO_FEATURES": features, "OTAD_SANITY_SKIP": skip}
    )
    if expected is None:
        assert bb.warnings == []
    else:
        assert len(bb.warnings) == 1 and expected in bb.warnings[0]


@pytest.mark.parametrize(
    ("image", "key", "compression", "error"),
    [
        ("", "/k.pem", "zstd", "OTAD_BUNDLE_IMAGE"),
        ("core-image-minimal", "", "zstd", "OTAD_BUNDLE_KEY"),
        ("core-image-minimal", "/k.pem", "lzma", "OTAD_BUNDLE_COMPRESSION"),
    ],
)
def test_bundle_class_fails_parse_with_a_clear_message(
    image: str, key: str, compression: str, error: str
) -> None:
    variables = {
        "PN": "my-bundle",
        "OTAD_BUNDLE_IMAGE": image,
        "OTAD_BUNDLE_KEY": key,
        "OTAD_BUNDLE_COMPRESSION": compression,
    }
    with pytest.raises(FakeBitbake.Fatal, match=error):
        run_python(BUNDLE_CLASS, "__anonymous", variables)


def test_bundle_class_depends_on_the_image_and_the_keys() -> None:
    variables = {
        "PN": "my-bundle",
        "OTAD_BUNDLE_IMAGE": "core-image-minimal",
        "OTAD_BUNDLE_KEY": "/keys/a.pem /keys/b.pem",
        "OTAD_BUNDLE_COMPRESSION": "zstd",
    }
    namespace: dict[str, object] = {}
    exec(python_task(BUNDLE_CLASS.read_text(), "__anonymous"), namespace)  # noqa: S102
    d = FakeDatastore(variables)
    function = namespace["__anonymous"]
    assert callable(function)
    function(d, None, FakeBitbake())
    assert d.variables["do_otad_bundle[depends]"].split() == [
        "core-image-minimal:do_image_complete"
    ]
    assert d.variables["do_otad_bundle[file-checksums]"].split() == [
        "/keys/a.pem:True",
        "/keys/b.pem:True",
    ]

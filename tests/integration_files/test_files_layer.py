"""meta-otad: lint, metadata, and the single sources it shares with the rest of the repository.

BitBake itself is not run here (no Yocto build in this project's CI); these tests check what
can be checked without it: oelint-adv over every recipe, the layer's files against the
repository's own (pyproject version, partition names, boot files, the agent's config parser,
the bundle keyring format, the GRUB env format), with the real tools where they exist.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from plugins.agent_env import (
    offer_bundle,
    otad_cli,
    run_agent_process,
    stop_agent_process,
    wait_for_path,
    wait_reported,
)

from integration_files.layerfiles import (
    LAYER,
    PARTITIONS_ENV,
    REPO,
    WksPart,
    bitbake_assignments,
    default_of,
    parse_env,
    parse_wks,
)
from otad.bundle import Keyring, key_id_of, load_private_key

OELINT_TIMEOUT = 180
CONF_RECIPE = LAYER / "recipes-otad" / "otad-conf" / "otad-conf_1.0.bb"
CONF_FILES = CONF_RECIPE.parent / "files"
WKS_FILES = sorted((LAYER / "wic").glob("*.wks"))
ORDER = ("OTAD_PART_ESP", "OTAD_PART_ROOTFS_A", "OTAD_PART_ROOTFS_B", "OTAD_PART_DATA")


def layer_files(*patterns: str) -> list[Path]:
    return sorted(p for pattern in patterns for p in LAYER.rglob(pattern))


def partitions() -> dict[str, str]:
    return parse_env(PARTITIONS_ENV.read_text())


def named_parts(wks: Path) -> list[WksPart]:
    """The partitions of a wks file that get a GPT entry (raw copies have none)."""
    _, parts = parse_wks(wks.read_text())
    return [p for p in parts if "--no-table" not in p.options]


# --- oelint-adv ------------------------------------------------------------------------------


@pytest.mark.parametrize("release", ["scarthgap", "wrynose"])
def test_layer_oelint_reports_nothing(release: str) -> None:
    files = layer_files("*.bb", "*.bbappend", "*.bbclass", "*.conf")
    assert len(files) >= 15
    tool = Path(sys.executable).with_name("oelint-adv")
    env = dict(os.environ, OELINT_CONFIG=str(LAYER / ".oelint.cfg"))
    result = subprocess.run(
        [str(tool), "--quiet", "--mode=all", f"--release={release}", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=OELINT_TIMEOUT,
        env=env,
        check=False,
    )
    findings = (result.stdout + result.stderr).strip()
    # Not only errors: warnings and infos too. A rule we accept is suppressed with a reason.
    assert findings == "" and result.returncode == 0, findings


def test_layer_oelint_catches_a_bad_recipe(tmp_path: Path) -> None:
    """The lint run above is not vacuous: the same configuration flags a broken recipe."""
    bad = tmp_path / "broken_1.0.bb"
    bad.write_text('SUMMARY = "x"\nLICENSE = "MIT"\nDEPENDS = "b a"\n')
    tool = Path(sys.executable).with_name("oelint-adv")
    env = dict(os.environ, OELINT_CONFIG=str(LAYER / ".oelint.cfg"))
    result = subprocess.run(
        [str(tool), "--quiet", str(bad)],
        capture_output=True,
        text=True,
        timeout=OELINT_TIMEOUT,
        env=env,
        check=False,
    )
    assert "error:oelint.var.mandatoryvar" in result.stderr
    assert "oelint.vars.dependsordered" in result.stderr


def test_layer_oelint_suppressions_have_reasons() -> None:
    lines = (LAYER / ".oelint.cfg").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("suppress ="))
    previous = ""
    rules = 0
    for line in lines[start + 1 :]:
        if not line.startswith(" "):
            break
        text = line.strip()
        if not text.startswith("#"):
            rules += 1
            assert previous.startswith("#") or previous.startswith("oelint."), text
        previous = text
    assert rules >= 1
    for path in layer_files("*.bb", "*.bbappend", "*.bbclass"):
        source = path.read_text().splitlines()
        for number, line in enumerate(source):
            if line.startswith("# nooelint:"):
                above = source[number - 1] if number else ""
                assert above.startswith("#") and len(above) > 20, f"{path.name}:{number + 1}"


# --- layer.conf and versions -----------------------------------------------------------------


def test_layer_conf_declares_collection_and_lts_releases() -> None:
    conf = bitbake_assignments((LAYER / "conf" / "layer.conf").read_text())
    assert [v for op, v in conf["BBFILE_COLLECTIONS"]] == ["otad"]
    assert set(default_of(conf, "LAYERSERIES_COMPAT_otad").split()) == {"scarthgap", "wrynose"}
    assert default_of(conf, "LAYERDEPENDS_otad").split() == ["core", "meta-python"]
    assert int(default_of(conf, "BBFILE_PRIORITY_otad")) > 5
    assert (LAYER / "COPYING.MIT").is_file() and (LAYER / "README.md").is_file()
    sanity = LAYER / "classes-global" / "otad-sanity.bbclass"
    assert 'INHERIT += "otad-sanity"' in (LAYER / "conf" / "layer.conf").read_text()
    assert sanity.is_file() and "bb.event.SanityCheck" in sanity.read_text()


def test_recipe_version_equals_package_version() -> None:
    with (REPO / "pyproject.toml").open("rb") as f:
        version = tomllib.load(f)["project"]["version"]
    recipes = [p.name for p in layer_files("otad_*.bb")]
    assert recipes == [f"otad_{version}.bb"]


def test_python_dependency_recipes_match_the_tested_versions() -> None:
    """Recipes carry the versions this checkout's tests run against (the .venv)."""
    for recipe in layer_files("python3-*_*.bb"):
        name, version = recipe.stem.removeprefix("python3-").split("_")
        assert importlib.metadata.version(name) == version, recipe.name


def package_dependencies() -> set[str]:
    with (REPO / "pyproject.toml").open("rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower() for d in deps}


def recipe_rdepends(override: str) -> set[str]:
    recipe = bitbake_assignments(next(iter(layer_files("otad_*.bb"))).read_text())
    return set(default_of(recipe, f"RDEPENDS:${{PN}}:{override}").split())


def libraries_a_device_lacks() -> list[str]:
    """The package's dependencies the device package (class-target) does not pull in."""
    target = recipe_rdepends("class-target")
    return sorted(n for n in package_dependencies() if f"python3-{n}" not in target)


def test_agent_recipe_rdepends_cover_package_dependencies() -> None:
    # The cloud side's HTTP server library and the signing library stay off devices; the agent
    # test below proves the agent needs neither.
    assert libraries_a_device_lacks() == ["aiohttp", "cryptography"]
    # zstandard[cffi]: the extra's library must be on the device too (the fast decoder)
    assert "python3-cffi" in recipe_rdepends("class-target")
    native = recipe_rdepends("class-native")
    assert native <= {f"python3-{n}-native" for n in package_dependencies()}
    # Every dependency the layer does not carry itself must come from oe-core or meta-python.
    assert "virtual-otad-conf" in recipe_rdepends("class-target")


async def test_agent_updates_with_only_the_device_packages_libraries(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    """`otad agent run` takes a whole update to the reboot with aiohttp, cryptography & co.
    unimportable."""
    marker = tmp_path / "rebooted"
    dev = make_device(
        "dev1", config={"slots": {"booted": "A"}, "reboot_command": ["touch", str(marker)]}
    )
    log = tmp_path / "agent.log"
    lacking = libraries_a_device_lacks()
    process = await run_agent_process(dev.config_path, unimportable=lacking, stderr=log)
    try:
        await wait_reported(cloud, "dev1", lambda s: s["state"] == "idle", within=30)
        image, _ = await offer_bundle(cloud, cloud_dir, tmp_path)
        await wait_reported(cloud, "dev1", lambda s: s["state"] == "rebooting", within=60)
        assert await wait_for_path(marker), log.read_text()[-3000:]
    finally:
        await stop_agent_process(process)
    assert process.returncode == 0, log.read_text()[-3000:]
    assert dev.slot_sha("B", len(image)) == hashlib.sha256(image).hexdigest()


def test_cloud_command_without_its_library_names_it(tmp_path: Path) -> None:
    cloud = tmp_path / "cloud"
    init = subprocess.run(
        [sys.executable, "-m", "otad", "cloud", "init", str(cloud), "--devices", "dev1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert init.returncode == 0, init.stderr
    result = subprocess.run(
        [*otad_cli(["aiohttp"]), "cloud", "serve", str(cloud)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "missing_library" in result.stderr and "'aiohttp'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_device_verifies_bundles_but_cannot_sign_without_cryptography(tmp_path: Path) -> None:
    """What the device package lacks: `otad bundle verify` works, keygen names the library."""
    image = tmp_path / "rootfs.img"
    image.write_bytes(os.urandom(4096) * 16)
    bundle = tmp_path / "b.otab"
    argv = ["bundle", "create", "--image", str(image), "--version", "1", "--compatible", "c"]
    argv += ["--key", str(CONF_FILES / "example-bundle-signing-key.pem"), "-o", str(bundle)]
    made = subprocess.run([*otad_cli(), *argv], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-3000:]
    lacking = libraries_a_device_lacks()
    assert "cryptography" in lacking
    keyring = CONF_FILES / "example-keyring"
    verify = subprocess.run(
        [*otad_cli(lacking), "bundle", "verify", str(bundle), "--keyring", str(keyring)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stderr[-3000:]
    refused = subprocess.run(
        [*otad_cli(lacking), "bundle", "keygen", "--out", str(tmp_path / "k.pem")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert "missing_library" in refused.stderr and "'cryptography'" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "k.pem").exists()


def test_native_tool_runs_with_only_its_rdepends(tmp_path: Path) -> None:
    """`otad bundle create` works with the libraries outside the native RDEPENDS unimportable."""
    native = {
        r.removeprefix("python3-").removesuffix("-native") for r in recipe_rdepends("class-native")
    }
    blocked = sorted(package_dependencies() - native)
    image = tmp_path / "rootfs.img"
    image.write_bytes(os.urandom(4096) * 16)
    key = CONF_FILES / "example-bundle-signing-key.pem"
    argv = ["bundle", "create", "--image", str(image), "--version", "1", "--compatible", "c"]
    argv += ["--key", str(key), "-o", str(tmp_path / "b.otab")]
    result = subprocess.run(
        [*otad_cli(blocked), *argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "b.otab").stat().st_size > 0


# --- partition names: one source -------------------------------------------------------------


def test_partitions_file_names_the_four_partitions() -> None:
    values = partitions()
    assert tuple(values) == ORDER
    assert len(set(values.values())) == 4
    # Shell-sourceable as well: the QEMU build and otad-conf's do_install source it.
    out = subprocess.run(
        ["sh", "-c", f'. "{PARTITIONS_ENV}" && echo "$OTAD_PART_ROOTFS_A"'],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert out.stdout.strip() == values["OTAD_PART_ROOTFS_A"]


@pytest.mark.parametrize("wks", WKS_FILES, ids=[p.name for p in WKS_FILES])
def test_wks_partition_names_equal_partitions_file(wks: Path) -> None:
    parts = named_parts(wks)
    names = [p.options.get("--part-name") for p in parts]
    assert names == [partitions()[k] for k in ORDER]


@pytest.mark.parametrize("wks", WKS_FILES, ids=[p.name for p in WKS_FILES])
def test_wks_layout_is_a_static_ab_layout(wks: Path) -> None:
    bootloader, _ = parse_wks(wks.read_text())
    assert bootloader["--ptable"] == "gpt"
    esp, slot_a, slot_b, data = named_parts(wks)
    assert esp.options["--fstype"] == "vfat" and esp.options["--label"] == partitions()[ORDER[0]]
    assert data.options["--label"] == partitions()[ORDER[3]]
    assert slot_a.mountpoint == "/" and slot_b.mountpoint is None
    # A bundle's image is written to either slot: same size, and no per-slot file system label.
    assert slot_a.options["--fixed-size"] == slot_b.options["--fixed-size"]
    assert "--label" not in slot_a.options and "--label" not in slot_b.options
    # Mounted by units of the rootfs (otad-conf), so slots written later mount them too.
    assert "--no-fstab-update" in esp.options and "--no-fstab-update" in data.options
    assert {esp.mountpoint, data.mountpoint} == {"/boot/efi", "/data"}


def test_wks_slot_size_bounds_the_image_rootfs() -> None:
    image_class = bitbake_assignments((LAYER / "classes-recipe" / "otad-image.bbclass").read_text())
    kib = int(default_of(image_class, "OTAD_IMAGE_SLOT_KIB"))
    for wks in WKS_FILES:
        size = named_parts(wks)[1].options["--fixed-size"]
        assert size.endswith("M") and int(size[:-1]) * 1024 == kib, wks.name


def test_grub_cfg_slot_defaults_match_the_layout() -> None:
    """grub.cfg's GPT names and fallback devices (hd0,gptN) agree with the wks order."""
    text = (REPO / "boot" / "grub" / "grub.cfg").read_text()
    values = partitions()
    assert re.search(rf"^set otad_part_a={values['OTAD_PART_ROOTFS_A']}$", text, re.M)
    assert re.search(rf"^set otad_part_b={values['OTAD_PART_ROOTFS_B']}$", text, re.M)
    parts = named_parts(LAYER / "wic" / "otad-ab-grub-efi.wks")
    position = {p.options["--part-name"]: i + 1 for i, p in enumerate(parts)}
    assert re.search(
        rf"^set otad_dev_a=hd0,gpt{position[values['OTAD_PART_ROOTFS_A']]}$", text, re.M
    )
    assert re.search(
        rf"^set otad_dev_b=hd0,gpt{position[values['OTAD_PART_ROOTFS_B']]}$", text, re.M
    )


def test_qemu_image_uses_the_same_partition_names() -> None:
    source = (REPO / "qemu" / "build-image").read_text()
    if "otad-partitions.env" in source:
        return  # the QEMU build reads the shared file itself
    tree = ast.parse(source)
    layout = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "LAYOUT" for t in node.targets)
    )
    assert isinstance(layout, ast.Tuple)
    names = [ast.literal_eval(row.elts[0]) for row in layout.elts if isinstance(row, ast.Tuple)]
    assert names[:4] == [partitions()[k] for k in ORDER]


def repo_paths_used_by_qemu_build() -> set[str]:
    """The ``REPO / "<path>"`` expressions in qemu/build-image."""
    tree = ast.parse((REPO / "qemu" / "build-image").read_text())
    return {
        node.right.value
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Div)
        and isinstance(node.left, ast.Name)
        and node.left.id == "REPO"
        and isinstance(node.right, ast.Constant)
        and isinstance(node.right.value, str)
    }


def test_qemu_image_boots_the_same_grub_cfg_and_units() -> None:
    """The files the layer installs are the ones the QEMU image build takes from the checkout."""
    used = repo_paths_used_by_qemu_build()
    assert "boot/grub/grub.cfg" in used
    assert "systemd" in used


# --- boot files: the repository's, not copies -----------------------------------------------


def test_wks_grub_cfg_is_the_repository_file() -> None:
    link = LAYER / "wic" / "otad-grub.cfg"
    assert link.is_symlink(), "must be a link to boot/grub/grub.cfg, not a copy"
    assert link.resolve() == (REPO / "boot" / "grub" / "grub.cfg").resolve()
    bootloader, _ = parse_wks((LAYER / "wic" / "otad-ab-grub-efi.wks").read_text())
    assert bootloader["--configfile"] == link.name


@pytest.mark.parametrize(
    ("bbappend", "directory", "filename"),
    [
        ("recipes-bsp/grub/grub-bootconf_%.bbappend", "boot/grub", "grub.cfg"),
        ("recipes-bsp/u-boot/u-boot_%.bbappend", "boot/u-boot", "fw_env.config"),
    ],
)
def test_bbappends_fetch_the_repository_boot_files(
    bbappend: str, directory: str, filename: str
) -> None:
    path = LAYER / bbappend
    assigns = bitbake_assignments(path.read_text())
    (extra,) = [v for op, v in assigns["FILESEXTRAPATHS:prepend:otad"]]
    relative = extra.removeprefix("${THISDIR}/").rstrip(":")
    assert (path.parent / relative).resolve() == (REPO / directory).resolve()
    (uri,) = [v for op, v in assigns["SRC_URI:append:otad"]]
    assert uri.split() == [f"file://{filename}"]
    assert (REPO / directory / filename).is_file(), f"{directory}/{filename} is missing"


def test_bbappends_change_nothing_without_the_distro_feature() -> None:
    for path in layer_files("*.bbappend"):
        for var in bitbake_assignments(path.read_text()):
            assert var.endswith(":otad"), f"{path.name}: {var} applies without the otad feature"
        for line in path.read_text().splitlines():
            if line.startswith("do_") and "()" in line:
                assert ":otad()" in line, f"{path.name}: {line}"
    conf = (LAYER / "conf" / "layer.conf").read_text()
    assert "DISTROOVERRIDES:append" in conf and "':otad'" in conf


# --- otad-conf: defaults shared with other files ------------------------------------------------


def recipe_defaults() -> dict[str, str]:
    assigns = bitbake_assignments(CONF_RECIPE.read_text())
    return {var: default_of(assigns, var) for var in assigns if var.startswith("OTAD_")}


def test_conf_compatible_default_equals_bundle_class_default() -> None:
    bundle = bitbake_assignments((LAYER / "classes-recipe" / "otad-bundle.bbclass").read_text())
    assert recipe_defaults()["OTAD_COMPATIBLE"] == default_of(bundle, "OTAD_BUNDLE_COMPATIBLE")


def test_conf_example_keyring_holds_the_example_signing_key() -> None:
    private = load_private_key(CONF_FILES / "example-bundle-signing-key.pem")
    keyring_dir = CONF_FILES / recipe_defaults()["OTAD_KEYRING_DIR"]
    (public,) = keyring_dir.glob("*.pem")
    assert public.stem == key_id_of(private)
    Keyring.load(keyring_dir)  # the agent's own loader accepts the directory as shipped


def test_conf_example_digests_name_the_shipped_examples() -> None:
    """The build warnings fire exactly for the example files shipped in the layer."""
    defaults = recipe_defaults()
    shipped = [
        *(CONF_FILES / defaults["OTAD_KEYRING_DIR"]).glob("*.pem"),
        CONF_FILES / defaults["OTAD_CA_FILE"],
    ]
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in shipped}
    assert set(defaults["OTAD_EXAMPLE_SHA256"].split()) == digests
    bundle = bitbake_assignments((LAYER / "classes-recipe" / "otad-bundle.bbclass").read_text())
    key = CONF_FILES / "example-bundle-signing-key.pem"
    assert (
        default_of(bundle, "OTAD_BUNDLE_EXAMPLE_KEY_SHA256")
        == hashlib.sha256(key.read_bytes()).hexdigest()
    )


# --- kas ---------------------------------------------------------------------------------------


def test_kas_file_builds_the_reference_image_from_this_layer() -> None:
    kas = yaml.safe_load((REPO / "kas" / "otad-qemux86-64.yml").read_text())
    assert kas["header"]["version"] >= 14
    assert kas["machine"] == "qemux86-64"
    assert kas["target"] == ["otad-reference-image", "otad-reference-bundle"]
    own = kas["repos"]["otad"]
    assert "url" not in own  # the repository holding the kas file: this checkout
    (layer,) = own["layers"]
    assert (REPO / layer / "conf" / "layer.conf").resolve() == LAYER / "conf" / "layer.conf"
    compat = default_of(
        bitbake_assignments((LAYER / "conf" / "layer.conf").read_text()), "LAYERSERIES_COMPAT_otad"
    )
    others = [repo for name, repo in kas["repos"].items() if name != "otad"]
    assert others and all(repo["branch"] in compat.split() for repo in others)
    provided = {name for repo in others for name in repo["layers"]}
    assert {"meta", "meta-python"} <= provided  # LAYERDEPENDS_otad: core + meta-python
    conf = "\n".join(kas["local_conf_header"].values())
    assert 'DISTRO_FEATURES:append = " otad"' in conf
    assert 'INIT_MANAGER = "systemd"' in conf
    key_line = next(line for line in conf.splitlines() if line.startswith("OTAD_BUNDLE_KEY"))
    key = key_line.split('"')[1].replace("${OTAD_LAYERDIR}", str(LAYER))
    assert Path(key).is_file()
    layer_conf = bitbake_assignments((LAYER / "conf" / "layer.conf").read_text())
    assert default_of(layer_conf, "OTAD_LAYERDIR") == "${LAYERDIR}"
    for recipe in ("otad-reference-image.bb", "otad-reference-bundle_1.0.bb"):
        assert layer_files(recipe), recipe


def test_layer_python_helpers_pass_ruff() -> None:
    """`make lint` covers otad/, tests/ and benchmarks/; the layer's helper scripts get it here."""
    scripts = [str(p) for p in layer_files("*.py")]
    assert len(scripts) >= 2
    ruff = Path(sys.executable).with_name("ruff")
    for args in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [str(ruff), *args, *scripts], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr

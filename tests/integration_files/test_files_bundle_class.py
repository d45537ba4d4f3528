"""otad-bundle.bbclass runs the same `otad bundle create` the CLI tests cover.

The test takes the class's own default values (its ``??=`` lines) and its own
``otad_bundle_argv()`` (executed as written, with a small stand-in for BitBake's datastore),
fills in what a build provides (DEPLOY_DIR_IMAGE, MACHINE, B, ...), runs the resulting command
line with this checkout's `otad`, and verifies the bundle with the device side's keyring from
otad-conf. So the class, the CLI and the example keys are checked together.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from integration_files.layerfiles import (
    LAYER,
    bitbake_assignments,
    default_of,
    expand,
    python_function,
)
from otad.bundle import Keyring, Manifest, StreamVerifier, VerifyPolicy
from otad.errors import BundleError

CLASS = LAYER / "classes-recipe" / "otad-bundle.bbclass"
CONF_FILES = LAYER / "recipes-otad" / "otad-conf" / "files"
EXAMPLE_KEY = CONF_FILES / "example-bundle-signing-key.pem"
VENV_OTAD = Path(sys.executable).with_name("otad")


class FakeDatastore:
    """The part of BitBake's datastore ``otad_bundle_argv`` uses: expanded getVar."""

    def __init__(self, variables: dict[str, str]) -> None:
        self.variables = variables

    def getVar(self, name: str) -> str | None:
        value = self.variables.get(name)
        return None if value is None else expand(value, self.variables)


def class_defaults() -> dict[str, str]:
    assigns = bitbake_assignments(CLASS.read_text())
    return {var: default_of(assigns, var) for var in assigns if var.startswith("OTAD_BUNDLE_")}


def class_argv() -> Callable[[FakeDatastore], list[str]]:
    namespace: dict[str, object] = {}
    exec(python_function(CLASS.read_text(), "otad_bundle_argv"), namespace)  # noqa: S102
    function = namespace["otad_bundle_argv"]
    assert callable(function)
    return function  # type: ignore[return-value]


def build_variables(tmp_path: Path, **recipe: str) -> dict[str, str]:
    """The class defaults plus what the bundle recipe and a qemux86-64 build set."""
    bundle_recipe = bitbake_assignments(
        (LAYER / "recipes-otad" / "bundles" / "otad-reference-bundle_1.0.bb").read_text()
    )
    build = {
        "DEPLOY_DIR_IMAGE": str(tmp_path / "deploy" / "images" / "qemux86-64"),
        "MACHINE": "qemux86-64",
        "DISTRO_VERSION": "5.0.8",
        "PN": "otad-reference-bundle",
        "B": str(tmp_path / "build"),
    }
    variables = class_defaults() | build
    variables["OTAD_BUNDLE_IMAGE"] = default_of(bundle_recipe, "OTAD_BUNDLE_IMAGE")
    variables["OTAD_BUNDLE_KEY"] = str(EXAMPLE_KEY)  # what kas/otad-qemux86-64.yml sets
    variables.update(recipe)
    return variables


def make_rootfs_image(path: Path) -> bytes:
    """A real, small ext4 file system image, as IMAGE_FSTYPES ext4 produces."""
    tree = path.parent / "rootfs-tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text('NAME="otad reference"\nVERSION_ID="5.0.8"\n')
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", str(tree), str(path), "8M"],
        check=True,
        timeout=60,
    )
    return path.read_bytes()


def run_argv(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    assert argv[:3] == ["otad", "bundle", "create"]
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [str(VENV_OTAD), *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def verify(bundle: Path, policy: VerifyPolicy) -> tuple[bytes, Manifest]:
    verifier = StreamVerifier(Keyring.load(CONF_FILES / "example-keyring"), policy)
    image = bytearray()
    data = bundle.read_bytes()
    for offset in range(0, len(data), 65536):
        for chunk in verifier.feed(data[offset : offset + 65536]):
            image += chunk
    return bytes(image), verifier.finish()


def test_bundle_class_documents_every_variable() -> None:
    header = "\n".join(line for line in CLASS.read_text().splitlines() if line.startswith("#"))
    for var in class_defaults():
        assert f"# {var}" in header, f"{var} is not documented in the class header"
        section = header.split(f"# {var}", 1)[1].split("\n# OTAD_", 1)[0]
        assert "Example:" in section or var == "OTAD_BUNDLE_EXAMPLE_KEY_SHA256", var


def test_bundle_class_defaults_build_a_bundle_the_device_accepts(tmp_path: Path) -> None:
    variables = build_variables(tmp_path)
    d = FakeDatastore(variables)
    image_file = Path(d.getVar("OTAD_BUNDLE_IMAGE_FILE") or "")
    assert image_file.name == "otad-reference-image-qemux86-64.rootfs.ext4"
    image = make_rootfs_image(image_file)
    argv = class_argv()(d)
    result = run_argv(argv, Path(variables["B"]))
    assert result.returncode == 0, result.stderr
    bundle = Path(variables["B"]) / "otad-reference-bundle-qemux86-64.otab"
    assert bundle.is_file()
    # What otad-conf's defaults make a device check: compatible = MACHINE, example keyring.
    payload, manifest = verify(bundle, VerifyPolicy(compatible="qemux86-64"))
    assert payload == image
    assert manifest.version == "5.0.8"
    assert manifest.security_version == 0
    assert manifest.compression == "zstd"
    assert manifest.image_sha256 == hashlib.sha256(image).hexdigest()


def test_bundle_class_optional_flags_reach_the_manifest(tmp_path: Path) -> None:
    variables = build_variables(
        tmp_path,
        OTAD_BUNDLE_EXPIRES="2030-01-01T00:00:00Z",
        OTAD_BUNDLE_DEVICE="dev-000123",
        OTAD_BUNDLE_SECURITY_VERSION="4",
        OTAD_BUNDLE_COMPRESSION="none",
        OTAD_BUNDLE_VERSION="2.3.1",
        OTAD_BUNDLE_NAME="my-product-2.3.1",
    )
    d = FakeDatastore(variables)
    make_rootfs_image(Path(d.getVar("OTAD_BUNDLE_IMAGE_FILE") or ""))
    result = run_argv(class_argv()(d), Path(variables["B"]))
    assert result.returncode == 0, result.stderr
    bundle = Path(variables["B"]) / "my-product-2.3.1.otab"
    now = datetime(2029, 1, 1, tzinfo=UTC)
    policy = VerifyPolicy(compatible="qemux86-64", device_id="dev-000123", now=now)
    _, manifest = verify(bundle, policy)
    assert manifest.security_version == 4
    assert manifest.device == "dev-000123"
    assert manifest.compression == "none"
    with pytest.raises(BundleError):
        verify(bundle, VerifyPolicy(compatible="qemux86-64", device_id="dev-000999", now=now))


def test_bundle_class_refuses_a_missing_key(tmp_path: Path) -> None:
    """A wrong OTAD_BUNDLE_KEY fails the task with the CLI's error, not a bundle."""
    variables = build_variables(tmp_path, OTAD_BUNDLE_KEY=str(tmp_path / "nope.pem"))
    d = FakeDatastore(variables)
    make_rootfs_image(Path(d.getVar("OTAD_BUNDLE_IMAGE_FILE") or ""))
    result = run_argv(class_argv()(d), Path(variables["B"]))
    assert result.returncode != 0 and "nope.pem" in result.stderr
    assert not list(Path(variables["B"]).glob("*.otab"))

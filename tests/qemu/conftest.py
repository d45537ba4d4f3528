"""Fixtures for the QEMU end-to-end tests: the built image, a cloud the guest can reach, guests.

``qemu_image`` (session) runs ``qemu/build-image`` once per session (its stages are cached, so
only the first run on a machine pays for debootstrap) into ``qemu/out/test``, with a cloud dir of
its own whose CA, device identity and bundle key are baked into the image.

``cloud_dir`` is overridden here: the CLOUD fixtures (``broker``, ``cloud``) then run a broker,
replica and store that trust the image's CA and sign what the image's keyring accepts. The copy
gets free loopback ports, the guest-side store URL for pre-signed URLs, and a server certificate
that also names the guest-side address 10.0.2.100 (the guest reaches the host only through
QEMU's guestfwd there).

``guest`` (function) is a :class:`~tests.qemu.guest.Guest` on a private copy of the disk, its
store traffic relayed through a counting :class:`Relay`; the serial log lands in
``test-artifacts/<test>/`` when the test fails. Each test's wall time is printed at the end of
the session.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from plugins.cloud_env import DEVICES, free_port

from otad.cloud.pki import CloudDir, init_cloud

from .guest import REPO, Guest
from .proxy import Relay

OUT = REPO / "qemu" / "out" / "test"
IMAGE_CLOUD = OUT / "cloud"
ARTIFACTS = REPO / "test-artifacts"
BUILD_TIMEOUT = 15 * 60

_wall_times: list[tuple[str, str, float]] = []
_notes: list[str] = []


def note(text: str) -> None:
    """A measured figure for the end-of-session summary (shown even when the test passes)."""
    _notes.append(text)


@dataclass(frozen=True)
class QemuImage:
    out: Path
    disk: Path
    bundles: dict[str, Path]
    device: str
    cloud: CloudDir
    build_seconds: float


@pytest.fixture(scope="session")
def qemu_image() -> QemuImage:
    OUT.mkdir(parents=True, exist_ok=True)
    ARTIFACTS.mkdir(exist_ok=True)
    if not (IMAGE_CLOUD / "otad-cloud.toml").exists():
        shutil.rmtree(IMAGE_CLOUD, ignore_errors=True)
        init_cloud(IMAGE_CLOUD, DEVICES)
    log = ARTIFACTS / "build-image.log"
    started = time.monotonic()
    with log.open("w") as f:
        result = subprocess.run(
            [
                sys.executable,
                str(REPO / "qemu" / "build-image"),
                "--out",
                str(OUT),
                "--cloud",
                str(IMAGE_CLOUD),
                "--device",
                "dev1",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    seconds = time.monotonic() - started
    _wall_times.append(("build", "qemu/build-image", seconds))
    if result.returncode != 0:
        pytest.fail(
            f"qemu/build-image failed ({result.returncode}); log: {log}\n" + log.read_text()[-3000:]
        )
    manifest = json.loads((OUT / "manifest.json").read_text())
    files = {k: OUT / v for k, v in manifest["files"].items()}
    return QemuImage(
        OUT, files.pop("disk"), files, manifest["device"], CloudDir(IMAGE_CLOUD), seconds
    )


@pytest.fixture(scope="session")
def cloud_dir(qemu_image: QemuImage, tmp_path_factory: pytest.TempPathFactory) -> CloudDir:
    """The image's cloud dir, copied, on free ports, reachable by the guest (see module doc)."""
    root = tmp_path_factory.mktemp("qemu-cloud") / "cloud"
    shutil.copytree(qemu_image.cloud.root, root, symlinks=True)
    subprocess.run(
        [
            sys.executable,
            str(REPO / "qemu" / "cloud-for-guest"),
            str(root),
            "--broker-port",
            str(free_port()),
            "--store-port",
            str(free_port()),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return CloudDir(root)


@pytest.fixture
async def relay(cloud: Any) -> AsyncIterator[Relay]:
    port = urlsplit(cloud.store_url).port
    assert port is not None
    r = Relay("127.0.0.1", port)
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
def guest(
    request: pytest.FixtureRequest,
    qemu_image: QemuImage,
    broker: Any,
    relay: Relay,
    tmp_path: Path,
) -> Iterator[Guest]:
    g = Guest.from_image(
        qemu_image.disk, tmp_path / "guest", broker_port=broker.port, store_port=relay.port
    )
    try:
        yield g
    finally:
        g.stop()
        if g.early_hangs:
            note(f"{request.node.name}: early kernel hang under TCG, power-cycled once at power-on")
        report = getattr(request.node, "rep_call", None)
        if report is None or report.failed:
            g.save_artifacts(ARTIFACTS / request.node.name)
        g.disk.unlink(missing_ok=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
        if item.get_closest_marker("qemu") is not None:
            _wall_times.append((report.outcome, item.nodeid, report.duration))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _wall_times:
        return
    terminalreporter.section("QEMU wall times")
    for outcome, name, seconds in _wall_times:
        terminalreporter.write_line(f"{seconds:7.1f} s  {outcome:8s} {name}")
    for text in _notes:
        terminalreporter.write_line(text)

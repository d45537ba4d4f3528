"""The small host-side tools of qemu/ (no QEMU needed): the guestfwd relay, the cloud fix-up,
qemu/run's argument checks and the console watcher's hang detection. They run in the fast suite."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from otad.cloud.pki import CloudDir, init_cloud

from .guest import REPO, EarlyKernelHang, Guest, GuestTimeout

CONNECT = REPO / "qemu" / "connect"
CLOUD_FOR_GUEST = REPO / "qemu" / "cloud-for-guest"
RUN = REPO / "qemu" / "run"


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A loopback server that upper-cases what it gets until the client half-closes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(10)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(data.upper())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    t.join(timeout=10)
    srv.close()


def test_connect_relays_both_directions_and_half_close(echo_server: int) -> None:
    payload = b"hello from the guest\n" * 20000  # > one pipe buffer each way
    result = subprocess.run(
        [sys.executable, str(CONNECT), str(echo_server)],
        input=payload,
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert result.stdout == payload.upper()


def test_connect_refused_port_fails_with_message() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    result = subprocess.run(
        [sys.executable, str(CONNECT), str(port)],
        input=b"",
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr.decode()


@pytest.mark.parametrize("args", [[], ["x"], ["1", "2"]])
def test_connect_bad_arguments_exit_2(args: list[str]) -> None:
    result = subprocess.run([sys.executable, str(CONNECT), *args], capture_output=True, timeout=30)
    assert result.returncode == 2


def _sans(cloud: CloudDir) -> list[x509.GeneralName]:
    cert = x509.load_pem_x509_certificate(cloud.server.cert.read_bytes())
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def test_cloud_for_guest_adds_san_and_public_url_idempotently(tmp_path: Path) -> None:
    cloud = init_cloud(tmp_path / "cloud", ["dev1"])
    before = _sans(cloud)
    for _ in range(2):
        subprocess.run(
            [
                sys.executable,
                str(CLOUD_FOR_GUEST),
                str(cloud.root),
                "--broker-port",
                "18883",
                "--store-port",
                "18443",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    after = _sans(cloud)
    guest = x509.IPAddress(ipaddress.ip_address("10.0.2.100"))
    assert after == [*before, guest]  # old names kept, the guest address added once
    config = cloud.config()
    assert config.store_public_url == "https://10.0.2.100:8443"
    assert (config.broker_port, config.store_port) == (18883, 18443)
    # Still issued by the cloud's CA, and still matching the server key.
    cert = x509.load_pem_x509_certificate(cloud.server.cert.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(cloud.ca_cert.read_bytes()))
    assert isinstance(cloud.server_context(), ssl.SSLContext)


def test_cloud_for_guest_missing_dir_fails(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(CLOUD_FOR_GUEST), str(tmp_path / "nope")],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode != 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--broker-port", "88x3"], "bad port"),
        (["--firmware", "coreboot"], "seabios or ovmf"),
        (["--bogus"], "unknown option"),
        (["--disk", "/nonexistent/disk.img"], "no disk image"),
    ],
)
def test_run_rejects_bad_arguments_before_starting_qemu(
    args: list[str], message: str, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"")
    full = ["--disk", str(disk), *args] if "--disk" not in args else args
    result = subprocess.run([str(RUN), *full], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Guest]:
    """A Guest watching a log the test writes, with a stand-in process (no QEMU is started)."""
    g = Guest(tmp_path / "disk.img", tmp_path / "serial.log", 0, 0, early_hang_silence=1.0)
    g.log_path.write_text("")
    g.process = subprocess.Popen(["sleep", "60"])
    g._last_output_at = time.monotonic()
    try:
        yield g
    finally:
        g.stop()


async def test_silent_kernel_before_userspace_is_an_early_hang(console: Guest) -> None:
    with console.log_path.open("a") as f:
        f.write("[    0.000000] Linux version 6.1.0\n[    1.45] pnp: PnP ACPI: found 6 devices\n")
    started = time.monotonic()
    with pytest.raises(EarlyKernelHang, match=r"no console output for \d+ s before userspace"):
        await console.wait_boot(30)
    assert time.monotonic() - started < 10, "the hang was not noticed before the deadline"


async def test_silence_after_userspace_started_is_only_a_timeout(console: Guest) -> None:
    with console.log_path.open("a") as f:
        f.write("[    0.000000] Linux version 6.1.0\n[    2.9] Run /sbin/init as init process\n")
    with pytest.raises(GuestTimeout) as raised:
        await console.wait_boot(2.5)
    assert type(raised.value) is GuestTimeout, "a quiet userspace is not a kernel hang"


class ScriptedGuest(Guest):
    """A Guest whose power-ons print scripted consoles instead of starting QEMU."""

    consoles: list[str]

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("a") as f:
            f.write(self.consoles.pop(0))
        return subprocess.Popen(["sleep", "60"])


HUNG = "[    0.000000] Linux version 6.1.0\n[    1.45] pnp: PnP ACPI: found 6 devices\n"
BOOTED = (
    "[    0.000000] Linux version 6.1.0\n[    2.9] Run /sbin/init as init process\n"
    "OTAD-PROBE: booted slot=A version=1.0 uptime=9.1\n"
)


def scripted(tmp_path: Path, *consoles: str) -> ScriptedGuest:
    g = ScriptedGuest(tmp_path / "disk.img", tmp_path / "serial.log", 0, 0, early_hang_silence=1.0)
    g.consoles = list(consoles)
    return g


async def test_power_on_power_cycles_once_after_an_early_kernel_hang(tmp_path: Path) -> None:
    guest = scripted(tmp_path, HUNG, BOOTED)
    try:
        _, boot = await guest.power_on(30)
    finally:
        guest.stop()
    assert (boot.slot, boot.version, guest.early_hangs) == ("A", "1.0", 1)
    assert "harness: early kernel hang" in guest.log_path.read_text()


async def test_power_on_does_not_retry_a_second_hang(tmp_path: Path) -> None:
    guest = scripted(tmp_path, HUNG, HUNG, BOOTED)
    try:
        with pytest.raises(EarlyKernelHang):
            await guest.power_on(30)
    finally:
        guest.stop()
    assert guest.early_hangs == 1 and len(guest.consoles) == 1

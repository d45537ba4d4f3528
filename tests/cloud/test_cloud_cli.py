"""`otad cloud ...` as a user runs it: init, add-device, broker, serve, upload, presign.

The processes are real (the installed ``otad`` entry point) and talk over real TLS on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from plugins.cloud_env import free_port, make_bundle

from otad.cli.cloud import parse_duration
from otad.cloud.broker import wait_port
from otad.cloud.pki import CloudDir

OTAD = [sys.executable, "-m", "otad"]


def otad(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*OTAD, *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"otad {' '.join(args)} failed: {result.stderr}")
    return result


def get(url: str, ctx: ssl.SSLContext, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - our https URL
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=10) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


@pytest.fixture
def cli_cloud(tmp_path: Path) -> Iterator[tuple[CloudDir, Path]]:
    """A cloud dir made by `otad cloud init` and its broker run by `otad cloud broker`."""
    root = tmp_path / "cloud"
    otad(
        "cloud",
        "init",
        str(root),
        "--devices",
        "alpha,beta",
        "--broker-port",
        str(free_port()),
        "--store-port",
        str(free_port()),
    )
    cloud = CloudDir(root)
    config = cloud.config()
    log = (tmp_path / "broker.log").open("wb")
    broker = subprocess.Popen([*OTAD, "cloud", "broker", str(root)], stdout=log, stderr=log)
    try:
        assert wait_port(config.broker_host, config.broker_port, 10), (
            tmp_path / "broker.log"
        ).read_text()
        yield cloud, tmp_path
    finally:
        # mosquitto itself got the SIGTERM (exec): a clean exit.
        assert stop(broker) == 0
        log.close()


def test_cloud_cli_serve_upload_presign_download(cli_cloud: tuple[CloudDir, Path]) -> None:
    cloud, tmp = cli_cloud
    config = cloud.config()
    assert otad("cloud", "add-device", str(cloud.root), "gamma").stdout.splitlines() == [
        str(cloud.device("gamma").cert),
        str(cloud.device("gamma").key),
    ]
    bundle = make_bundle(cloud, tmp / "b.otab", image_size=200_000)
    artifact = otad("cloud", "upload", str(cloud.root), str(bundle)).stdout.strip()
    assert len(artifact) == 64

    log = (tmp / "serve.log").open("wb")
    serve = subprocess.Popen([*OTAD, "cloud", "serve", str(cloud.root)], stdout=log, stderr=log)
    try:
        assert wait_port(config.store_host, config.store_port, 20), (tmp / "serve.log").read_text()
        url = otad(
            "cloud", "presign", str(cloud.root), artifact, "gamma", "--expires", "5m"
        ).stdout.strip()
        assert url.startswith(f"{config.store_public_url}/v1/artifacts/{artifact}?")
        status, body = get(url, cloud.client_context(cloud.device("gamma")))
        assert status == 200 and body == bundle.read_bytes()
        status, body = get(url, cloud.client_context(cloud.device("alpha")))
        assert status == 403 and json.loads(body)["error"]["code"] == "auth_failed"
    finally:
        assert stop(serve) == 0, (tmp / "serve.log").read_text()
        log.close()
    text = (tmp / "serve.log").read_text()
    assert "cloud_serving" in text and "cloud_stopped" in text
    assert "signature=" not in text  # the pre-signed query never reaches the log


def test_cloud_cli_second_signal_forces_exit(cli_cloud: tuple[CloudDir, Path]) -> None:
    cloud, _ = cli_cloud
    config = cloud.config()
    serve = subprocess.Popen(
        [*OTAD, "cloud", "serve", str(cloud.root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_port(config.store_host, config.store_port, 20)
        # Frozen, two different signals queue up; on SIGCONT the loop sees both back to back:
        # the first starts the graceful stop, the second must end the process at once.
        serve.send_signal(signal.SIGSTOP)
        serve.send_signal(signal.SIGTERM)
        serve.send_signal(signal.SIGINT)
        serve.send_signal(signal.SIGCONT)
        assert serve.wait(15) == 130
    finally:
        stop(serve)


def test_cloud_cli_upload_rejects_a_tampered_bundle(cli_cloud: tuple[CloudDir, Path]) -> None:
    cloud, tmp = cli_cloud
    bundle = make_bundle(cloud, tmp / "b.otab", image_size=100_000)
    data = bytearray(bundle.read_bytes())
    data[-10] ^= 0xFF
    bundle.write_bytes(bytes(data))
    result = otad("cloud", "upload", str(cloud.root), str(bundle), check=False)
    assert result.returncode == 1
    assert "artifact_rejected" in result.stderr
    assert not list(cloud.config().artifacts_dir.glob("*.bundle"))


def test_cloud_cli_errors_are_one_line(tmp_path: Path) -> None:
    result = otad("cloud", "add-device", str(tmp_path), "dev1", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"otad: error: config_invalid: pki: {tmp_path} is not a cloud dir "
        "(run `otad cloud init` first)"
    )
    result = otad("cloud", "init", str(tmp_path / "x"), "--devices", "a/b", check=False)
    assert result.returncode == 1 and "invalid device id" in result.stderr
    result = otad("cloud", "presign", str(tmp_path), "0" * 64, "dev1", check=False)
    assert result.returncode == 1 and "config_invalid" in result.stderr


def test_cloud_cli_presign_refuses_an_unknown_artifact(cloud_dir: CloudDir) -> None:
    result = otad("cloud", "presign", str(cloud_dir.root), "f" * 64, "dev1", check=False)
    assert result.returncode == 1 and "artifact_not_found" in result.stderr


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800)]
)
def test_cloud_cli_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "0", "-5m", "1.5h", "1w", "abc"])
def test_cloud_cli_parse_duration_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_cloud_cli_init_prints_the_layout(tmp_path: Path) -> None:
    result = otad("cloud", "init", str(tmp_path / "c"), "--devices", "d1", "--san", "10.0.2.100")
    assert "device:   d1" in result.stdout
    assert os.stat(tmp_path / "c" / "pki" / "devices" / "d1.key").st_mode & 0o777 == 0o600

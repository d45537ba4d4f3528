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
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from plugins.cloud_env import free_port, make_bundle

from otad.cli import main
from otad.cli.cloud import parse_duration
from otad.cloud.broker import wait_port
from otad.cloud.pki import CloudDir, init_cloud

OTAD = [sys.executable, "-m", "otad"]


def otad(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`otad ARGS` in a child process (for commands that serve or take signals)."""
    result = subprocess.run(
        [*OTAD, *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"otad {' '.join(args)} failed: {result.stderr}")
    return result


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`otad ARGS` in this process (one-shot commands: same code path, no start-up cost)."""
    capsys.readouterr()
    # main() configures logging for a process bound to the captured stderr; put the test
    # session's configuration back so later log lines do not go to a closed capture.
    saved = structlog.get_config()
    try:
        code = main(list(args))
    finally:
        structlog.configure(**saved)
    out, err = capsys.readouterr()
    return code, out, err


def get(url: str, ctx: ssl.SSLContext, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - our https URL
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=10) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for_text(path: Path, text: str, seconds: float) -> bool:
    """True once ``text`` appears in the file (polled every 50 ms, at most ``seconds``)."""
    for _ in range(int(seconds / 0.05)):
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.05)
    return False


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
def cli_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[CloudDir, Path]:
    """A cloud dir made by `otad cloud init` (no processes running)."""
    root = tmp_path / "cloud"
    run_cli(
        capsys,
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
    return CloudDir(root), tmp_path


@pytest.fixture
def cli_cloud(cli_dir: tuple[CloudDir, Path]) -> Iterator[tuple[CloudDir, Path]]:
    """The same, with its broker run by `otad cloud broker`."""
    cloud, tmp_path = cli_dir
    config = cloud.config()
    log = (tmp_path / "broker.log").open("wb")
    broker = subprocess.Popen([*OTAD, "cloud", "broker", str(cloud.root)], stdout=log, stderr=log)
    try:
        assert wait_port(config.broker_host, config.broker_port, 10), (
            tmp_path / "broker.log"
        ).read_text()
        yield cloud, tmp_path
    finally:
        # mosquitto itself got the SIGTERM (exec): a clean exit.
        assert stop(broker) == 0
        log.close()


def test_cloud_cli_serve_upload_presign_download(
    cli_cloud: tuple[CloudDir, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cloud, tmp = cli_cloud
    config = cloud.config()
    assert run_cli(capsys, "cloud", "add-device", str(cloud.root), "gamma")[1].splitlines() == [
        str(cloud.device("gamma").cert),
        str(cloud.device("gamma").key),
    ]
    bundle = make_bundle(cloud, tmp / "b.otab", image_size=200_000)
    artifact = run_cli(capsys, "cloud", "upload", str(cloud.root), str(bundle))[1].strip()
    assert len(artifact) == 64

    log = (tmp / "serve.log").open("wb")
    serve = subprocess.Popen([*OTAD, "cloud", "serve", str(cloud.root)], stdout=log, stderr=log)
    try:
        assert wait_for_text(tmp / "serve.log", "cloud_serving", 30), (
            tmp / "serve.log"
        ).read_text()
        url = run_cli(
            capsys, "cloud", "presign", str(cloud.root), artifact, "gamma", "--expires", "5m"
        )[1].strip()
        assert url.startswith(f"{config.store_public_url}/v1/artifacts/{artifact}?")
        status, body = get(url, cloud.client_context(cloud.device("gamma")))
        assert status == 200 and body == bundle.read_bytes()
        status, body = get(url, cloud.client_context(cloud.device("alpha")))
        assert status == 403 and json.loads(body)["error"]["code"] == "auth_wrong_device"
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


def test_cloud_cli_upload_rejects_a_tampered_bundle(
    cli_dir: tuple[CloudDir, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cloud, tmp = cli_dir
    bundle = make_bundle(cloud, tmp / "b.otab", image_size=100_000)
    data = bytearray(bundle.read_bytes())
    data[-10] ^= 0xFF
    bundle.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "cloud", "upload", str(cloud.root), str(bundle))
    assert code == 1
    assert err.startswith("otad: error: artifact_rejected: store: bundle rejected: ")
    assert not list(cloud.config().artifacts_dir.glob("*.bundle"))


def test_cloud_cli_add_device_takes_a_batch_all_or_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cloud = init_cloud(tmp_path / "c", ["d0"])
    code, out, _ = run_cli(capsys, "cloud", "add-device", str(cloud.root), "d1", "d2", "d3")
    assert code == 0
    assert out.splitlines() == [
        str(path)
        for d in ("d1", "d2", "d3")
        for path in (cloud.device(d).cert, cloud.device(d).key)
    ]
    for bad_batch, message in [
        (["d4", "d0"], "d0"),  # already enrolled
        (["d4", "d4"], "duplicate"),
        (["d4", "bad/id"], "bad/id"),
    ]:
        code, _, err = run_cli(capsys, "cloud", "add-device", str(cloud.root), *bad_batch)
        assert code == 1 and err.startswith("otad: error: config_invalid: "), err
        assert message in err
        assert not cloud.device("d4").cert.exists()  # nothing of the batch was written
    with pytest.raises(SystemExit) as usage:  # argparse: at least one id
        run_cli(capsys, "cloud", "add-device", str(cloud.root))
    assert usage.value.code == 2


def test_cloud_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "cloud", "add-device", str(tmp_path), "dev1")
    assert code == 1
    assert err.strip() == (
        f"otad: error: config_invalid: pki: {tmp_path} is not a cloud dir "
        "(run `otad cloud init` first)"
    )
    code, _, err = run_cli(capsys, "cloud", "init", str(tmp_path / "x"), "--devices", "a/b")
    assert code == 1 and "invalid device id" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "cloud", "presign", str(tmp_path), "0" * 64, "dev1")
    assert code == 1 and "config_invalid" in err


def test_cloud_cli_presign_refuses_an_unknown_artifact(
    cloud_dir: CloudDir, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "cloud", "presign", str(cloud_dir.root), "f" * 64, "dev1")
    assert code == 1 and "artifact_not_found" in err


def test_cloud_cli_presign_refuses_a_lifetime_over_7_days(
    cli_dir: tuple[CloudDir, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cloud, tmp = cli_dir
    bundle = make_bundle(cloud, tmp / "b.otab", image_size=10_000)
    code, out, _ = run_cli(capsys, "cloud", "upload", str(cloud.root), str(bundle))
    artifact = out.strip()
    code, _, err = run_cli(
        capsys, "cloud", "presign", str(cloud.root), artifact, "alpha", "--expires", "8d"
    )
    assert code == 1 and "7 days" in err


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800)]
)
def test_cloud_cli_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "0", "-5m", "1.5h", "1w", "abc"])
def test_cloud_cli_parse_duration_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_cloud_cli_init_prints_the_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        capsys, "cloud", "init", str(tmp_path / "c"), "--devices", "d1", "--san", "10.0.2.100"
    )
    assert code == 0 and "device:   d1" in out
    assert os.stat(tmp_path / "c" / "pki" / "devices" / "d1.key").st_mode & 0o777 == 0o600


def test_cloud_cli_artifacts_lists_uploads(
    cli_dir: tuple[CloudDir, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cloud, tmp = cli_dir
    bundle = make_bundle(cloud, tmp / "b.otab", version="3.1", image_size=50_000)
    artifact = run_cli(capsys, "cloud", "upload", str(cloud.root), str(bundle))[1].strip()
    table = run_cli(capsys, "cloud", "artifacts", str(cloud.root))[1].splitlines()
    assert table[0].split()[:3] == ["ID", "VERSION", "COMPATIBLE"]
    assert table[1].split()[:3] == [artifact, "3.1", "qemu-x86_64"]
    listing = json.loads(run_cli(capsys, "cloud", "artifacts", str(cloud.root), "--json")[1])
    assert [a["id"] for a in listing["artifacts"]] == [artifact]

"""`otad bundle keygen|create|inspect|verify`.

The main flows run the real console script in a subprocess (exit codes and stderr as a user sees
them). The many failure cases call the same ``otad.cli.main`` in-process, which is the code the
script runs, because each interpreter start costs about a second of imports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from bundle_helpers import make_image

from otad.bundle import generate_private_key, private_key_pem, public_key_pem
from otad.cli import main

OTAD = Path(sys.prefix) / "bin" / "otad"


def otad(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(OTAD), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``otad ARGS`` in-process; same shape as a subprocess result."""
    capsys.readouterr()
    # main() points structlog at the captured stderr; put the previous set-up back afterwards
    # so no later test logs into a closed capture file.
    saved = structlog.get_config()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    finally:
        structlog.configure(**saved)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def assert_error(result: subprocess.CompletedProcess[str], code: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"otad: error: {code}: " in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys, an image and a bundle made once with the CLI for the whole module."""
    path = tmp_path_factory.mktemp("cli")
    (path / "image.img").write_bytes(make_image(2 << 20, seed=9))
    assert otad("bundle", "keygen", "--out", path / "signing.pem").returncode == 0
    p256 = generate_private_key("p256")  # a second key without a second interpreter start
    (path / "p256.pem").write_bytes(private_key_pem(p256))
    (path / "p256.pub.pem").write_bytes(public_key_pem(p256))
    created = otad(
        "bundle", "create",
        "--image", path / "image.img",
        "--version", "2.0",
        "--compatible", "qemu-x86_64",
        "--key", path / "signing.pem",
        "-o", path / "update.otab",
        "--security-version", "3",
        "--expires", "2099-01-01T00:00:00Z",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    return path


def test_bundle_cli_keygen_writes_private_and_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = otad("bundle", "keygen", "--out", tmp_path / "k.pem")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    assert b"PUBLIC KEY" in (tmp_path / "k.pub.pem").read_bytes()
    assert "key id:" in result.stdout
    again = run(capsys, "bundle", "keygen", "--out", tmp_path / "k.pem")
    assert_error(again, "config_invalid")
    forced = run(capsys, "bundle", "keygen", "--out", tmp_path / "k.pem", "--force")
    assert forced.returncode == 0


def test_bundle_cli_create_inspect_verify(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inspected = otad("bundle", "inspect", work / "update.otab", "--json")
    assert inspected.returncode == 0, inspected.stderr
    info = json.loads(inspected.stdout)
    assert info["verified"] is False
    assert info["manifest"]["version"] == "2.0"
    assert info["manifest"]["security_version"] == 3
    assert info["manifest"]["image_size"] == 2 << 20
    assert info["total_size"] == (work / "update.otab").stat().st_size
    assert [s["algorithm"] for s in info["signatures"]] == ["ed25519"]
    text = run(capsys, "bundle", "inspect", work / "update.otab")
    assert text.returncode == 0 and "NOT verified" in text.stdout

    verified = otad(
        "bundle", "verify", work / "update.otab",
        "--keyring", work / "signing.pub.pem",
        "--compatible", "qemu-x86_64",
        "--min-security-version", "3",
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    assert "verified:" in verified.stdout


def test_bundle_cli_verify_with_a_keyring_directory(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_id = json.loads(run(capsys, "bundle", "inspect", work / "update.otab", "--json").stdout)[
        "signatures"
    ][0]["key_id"]
    keyring = tmp_path / "keyring"
    keyring.mkdir()
    (keyring / f"{key_id}.pem").write_bytes((work / "signing.pub.pem").read_bytes())
    assert (
        run(capsys, "bundle", "verify", work / "update.otab", "--keyring", keyring).returncode == 0
    )
    (keyring / "revoked").write_text(key_id + "\n")
    assert_error(
        run(capsys, "bundle", "verify", work / "update.otab", "--keyring", keyring),
        "bundle_revoked_key",
    )


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (["--compatible", "rpi4"], "bundle_incompatible"),
        (["--min-security-version", "4"], "bundle_downgrade"),
        (["--allow-algorithm", "p256"], "bundle_algorithm_not_allowed"),
    ],
)
def test_bundle_cli_verify_policy_failures(
    work: Path, extra: list[str], code: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run(
        capsys,
        "bundle",
        "verify",
        work / "update.otab",
        "--keyring",
        work / "signing.pub.pem",
        *extra,
    )
    assert_error(result, code)


def test_bundle_cli_verify_wrong_key(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(
        capsys, "bundle", "verify", work / "update.otab", "--keyring", work / "p256.pub.pem"
    )
    assert_error(result, "bundle_unknown_key")


def test_bundle_cli_verify_tampered_and_truncated(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = bytearray((work / "update.otab").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "tampered.otab").write_bytes(data)
    result = otad(
        "bundle", "verify", tmp_path / "tampered.otab", "--keyring", work / "signing.pub.pem"
    )
    assert result.returncode == 1 and "otad: error: bundle_" in result.stderr
    (tmp_path / "short.otab").write_bytes(data[:-100])
    result = otad(
        "bundle", "verify", tmp_path / "short.otab", "--keyring", work / "signing.pub.pem"
    )
    assert_error(result, "bundle_truncated")
    assert_error(otad("bundle", "inspect", tmp_path / "short.otab"), "bundle_truncated")


def test_bundle_cli_device_binding(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bound = work / "bound.otab"
    created = run(capsys,
        "bundle", "create",
        "--image", work / "image.img",
        "--version", "2.1",
        "--compatible", "qemu-x86_64",
        "--key", work / "signing.pem",
        "--key", work / "p256.pem",
        "--compression", "none",
        "--device", "dev1",
        "-o", bound,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    base = ("bundle", "verify", bound, "--keyring", work / "p256.pub.pem")
    assert run(capsys, *base, "--device", "dev1").returncode == 0
    assert_error(run(capsys, *base, "--device", "dev2"), "bundle_wrong_device")


def test_bundle_cli_expired(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expired = work / "expired.otab"
    created = run(capsys,
        "bundle", "create",
        "--image", work / "image.img",
        "--version", "0.9",
        "--compatible", "qemu-x86_64",
        "--key", work / "signing.pem",
        "--expires", "2020-01-01T00:00:00+00:00",
        "-o", expired,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    result = run(capsys, "bundle", "verify", expired, "--keyring", work / "signing.pub.pem")
    assert_error(result, "bundle_expired")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["inspect", "missing.otab"], "config_invalid"),
        (["verify", "missing.otab", "--keyring", "signing.pub.pem"], "config_invalid"),
        (["verify", "update.otab", "--keyring", "nowhere"], "keyring_invalid"),
        (["inspect", "image.img"], "bundle_malformed_header"),
    ],
)
def test_bundle_cli_bad_inputs(
    work: Path, args: list[str], code: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        str(work / a) if not a.startswith("-") and a not in ("inspect", "verify") else a
        for a in args
    ]
    assert_error(run(capsys, "bundle", *args), code)


def test_bundle_cli_create_bad_inputs(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["bundle", "create", "--version", "1", "--compatible", "c", "-o", work / "x.otab"]
    missing_image = run(capsys, *base, "--image", work / "nope.img", "--key", work / "signing.pem")
    assert_error(missing_image, "config_invalid")
    public_as_key = run(
        capsys, *base, "--image", work / "image.img", "--key", work / "signing.pub.pem"
    )
    assert_error(public_as_key, "keyring_invalid")
    usage = run(capsys, *base, "--image", work / "image.img")  # --key missing: argparse usage error
    assert usage.returncode == 2
    assert not (work / "x.otab").exists()


def test_bundle_cli_progress_bar_only_on_a_terminal(work: Path) -> None:
    """`verify` draws a progress bar when stderr is a terminal (a real pty), none otherwise."""
    import os
    import pty

    bundle = work / "update.otab"
    piped = otad("bundle", "verify", bundle, "--keyring", work / "signing.pub.pem")
    assert piped.returncode == 0, piped.stderr
    assert "verifying" not in piped.stderr

    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [
                str(OTAD),
                "bundle",
                "verify",
                str(bundle),
                "--keyring",
                str(work / "signing.pub.pem"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=terminal,
        )
        os.close(terminal)
        seen = b""
        while True:  # read until the child closes the terminal (bounded by the timeout below)
            try:
                part = os.read(controller, 65536)
            except OSError:  # EIO: the child side is closed
                break
            if not part:
                break
            seen += part
        assert process.wait(timeout=60) == 0, seen
    finally:
        os.close(controller)
    assert b"verifying" in seen, seen

"""`otad agent ...` commands on a simulated device (sim bootloader, file slots)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import structlog
from plugins.agent_env import run_agent_process, stop_agent_process, weak_keyring
from plugins.cloud_env import make_bundle

from otad.agent.journal import Journal
from otad.agent.machine import Event
from otad.cli import main


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed before
    try:
        code = await asyncio.to_thread(main, list(argv))
    finally:
        # main() points structlog at this test's captured stderr; do not leave it there
        structlog.reset_defaults()
    out, err = capsys.readouterr()
    return code, out, err


async def test_cli_status_json(make_device: Any, capsys: pytest.CaptureFixture[str]) -> None:
    dev = make_device("dev1", config={"slots": {"booted": "A"}})
    code, out, _ = await run(capsys, "agent", "status", "--json", "--config", str(dev.config_path))
    status = json.loads(out)
    assert code == 0 and status["booted"] == "A" and status["version"] == "1.0"
    assert status["bootloader"]["next"] == "A" and status["job"] is None
    pems = await asyncio.to_thread(lambda: list(Path(dev.document["keyring"]).glob("*.pem")))
    key_ids = sorted(p.stem for p in pems)
    assert status["keyring"]["keyIds"] == key_ids and status["keyring"]["revoked"] == []
    code, out, _ = await run(capsys, "agent", "status", "--config", str(dev.config_path))
    assert code == 0 and "booted slot: A" in out and f"trusts {' '.join(key_ids)}" in out


async def test_cli_status_names_an_unusable_keyring(
    make_device: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keyring, weak = weak_keyring(tmp_path)
    dev = make_device("dev1", config={"slots": {"booted": "A"}, "keyring": str(keyring)})
    code, out, _ = await run(capsys, "agent", "status", "--json", "--config", str(dev.config_path))
    error = json.loads(out)["keyring"]["error"]
    assert code == 0 and error["code"] == "keyring_invalid" and str(weak) in error["message"]
    code, out, _ = await run(capsys, "agent", "status", "--config", str(dev.config_path))
    assert code == 0 and "keyring:     keyring_invalid: " in out and "small order" in out


async def test_cli_mark_bad_and_good(make_device: Any, capsys: pytest.CaptureFixture[str]) -> None:
    dev = make_device("dev1", config={"slots": {"booted": "A"}})
    cfg = str(dev.config_path)
    assert (await run(capsys, "agent", "mark-bad", "other", "--config", cfg))[0] == 0
    assert dev.sim.state().slot("B").bad
    assert (await run(capsys, "agent", "mark-good", "B", "--config", cfg))[0] == 0
    assert dev.sim.state().slot("B").good and dev.sim.state().next_boot() == "B"
    assert (await run(capsys, "agent", "mark-good", "--config", cfg))[0] == 0
    assert dev.sim.state().next_boot() == "A"


async def test_cli_install_local_bundle(
    make_device: Any, cloud_dir: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "rebooted"
    dev = make_device(
        "dev1", config={"slots": {"booted": "A"}, "reboot_command": ["touch", str(marker)]}
    )
    bundle = make_bundle(cloud_dir, tmp_path / "v2.otb", image_size=1024 * 1024, seed=5)
    code, out, err = await run(
        capsys, "agent", "install", str(bundle), "--config", str(dev.config_path)
    )
    assert code == 0, err
    assert "installed into slot B" in out and marker.exists()
    boot = dev.sim.state()
    assert boot.slot("B").tries_left == 1 and boot.next_boot() == "B"
    image = bundle.with_suffix(".img").read_bytes()
    assert dev.slot_bytes("B")[: len(image)] == image
    assert dev.slot_bytes("A") == dev.factory["A"]


async def test_cli_install_refuses_a_bad_bundle(
    make_device: Any, cloud_dir: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = make_device("dev1", config={"slots": {"booted": "A"}, "reboot_command": ["false"]})
    bundle = make_bundle(cloud_dir, tmp_path / "v2.otb", image_size=512 * 1024, compatible="other")
    code, _, err = await run(
        capsys, "agent", "install", str(bundle), "--config", str(dev.config_path)
    )
    assert code == 1 and "bundle_incompatible" in err
    assert not dev.sim.state().slot("B").bootable
    code, _, err = await run(
        capsys, "agent", "install", "http://x/b", "--config", str(dev.config_path)
    )
    assert code == 1 and "only https" in err


async def test_cli_install_refused_while_the_daemon_runs(
    make_device: Any, cloud: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = make_device("dev1")
    await dev.start()
    bundle = tmp_path / "x.otb"
    bundle.write_bytes(b"x")
    code, _, err = await run(
        capsys, "agent", "install", str(bundle), "--config", str(dev.config_path)
    )
    assert code == 1 and "agent_locked" in err


async def test_cli_health_check_exit_codes(
    make_device: Any, broker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = make_device("dev1", config={"slots": {"booted": "A"}})
    cfg = str(dev.config_path)
    code, out, _ = await run(capsys, "agent", "health-check", "--config", cfg)
    assert code == 0 and "healthy" in out and "broker" in out and "passed   keyring trusts" in out
    script = dev.health_d / "50-fail"
    script.write_text("#!/bin/sh\nexit 1\n")
    script.chmod(0o755)
    code, _, err = await run(capsys, "agent", "health-check", "--config", cfg)
    assert code == 1 and "unhealthy" in err and "50-fail" in err


async def test_cli_health_check_fails_when_the_keyring_does_not_load(
    make_device: Any, broker: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # what otad-health.service runs: it must agree with the agent, which rolls such an image back
    keyring, weak = weak_keyring(tmp_path)
    dev = make_device("dev1", config={"slots": {"booted": "A"}, "keyring": str(keyring)})
    code, out, err = await run(capsys, "agent", "health-check", "--config", str(dev.config_path))
    assert code == 1 and "unhealthy: keyring: " in err and str(weak) in err, (out, err)


async def test_cli_bad_config_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "otad.toml"
    cfg.write_text('device_id = "d"\ncompatible = "c"\n[broker]\nhost = "h"\nport = 0\n')
    code, _, err = await run(capsys, "agent", "status", "--config", str(cfg))
    assert code == 1 and "broker.port" in err and "config_invalid" in err


async def test_cli_agent_run_names_an_unusable_keyring_and_keeps_running(
    make_device: Any, tmp_path: Path
) -> None:
    # the Ed25519 identity point: under it one signature would verify for every bundle
    keyring, weak = weak_keyring(tmp_path)
    dev = make_device("dev1", config={"slots": {"booted": "A"}, "keyring": str(keyring)})
    log = tmp_path / "agent.log"
    process = await run_agent_process(dev.config_path, stderr=log)
    try:
        for _ in range(300):  # up to 30 s
            events = [json.loads(line) for line in log.read_text().splitlines() if line[:1] == "{"]
            if any(e.get("event") == "agent_ready" for e in events) or process.returncode:
                break
            await asyncio.sleep(0.1)
        assert process.returncode is None, log.read_text()  # running, not exited
        assert any(e.get("event") == "agent_ready" for e in events), log.read_text()
        invalid = [e for e in events if e.get("event") == "keyring_invalid"]
        assert invalid and invalid[0]["level"] == "error", log.read_text()
        assert str(weak) in invalid[0]["reason"] and "small order" in invalid[0]["reason"]
    finally:
        await stop_agent_process(process)
    assert process.returncode == 0
    assert dev.slot_bytes("A") == dev.factory["A"] and dev.slot_bytes("B") == dev.factory["B"]


def journal_in(dev: Any, state: str, target: str = "B") -> None:
    """A real journal record of job j1 on ``target``, advanced to ``state``."""
    events = {
        "downloading": [],
        "installing": [Event.PAYLOAD_VERIFIED],
        "rebooting": [Event.PAYLOAD_VERIFIED, Event.SLOT_VERIFIED],
        "verifying": [Event.PAYLOAD_VERIFIED, Event.SLOT_VERIFIED, Event.BOOTED_TARGET],
    }[state]
    with Journal(dev.state_dir, boot_id="b1") as journal:
        record = journal.begin("j1", target_slot=target, version="2.0", bundle_url="https://s/b")
        for event in events:
            record = journal.advance(record, event)


@pytest.mark.parametrize("state", ["downloading", "installing", "rebooting"])
async def test_cli_mark_good_refuses_a_slot_a_job_has_not_verified(
    state: str, make_device: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Committing the target of a job still writing or verifying it would make the bootloader
    boot a half-written slot as good (and the next start confirm it). Refused unless forced."""
    dev = make_device("dev1", config={"slots": {"booted": "A"}})
    cfg = str(dev.config_path)
    dev.sim.mark_bad("B")
    journal_in(dev, state)
    before = dev.sim.state()
    code, _, err = await run(capsys, "agent", "mark-good", "other", "--config", cfg)
    assert code == 1 and "mark_refused" in err and f"job j1, which is {state}" in err, err
    assert dev.sim.state() == before
    code, _, _ = await run(capsys, "agent", "mark-good", "other", "--force", "--config", cfg)
    assert code == 0 and dev.sim.state().slot("B").good


async def test_cli_mark_good_commits_the_slot_on_its_trial_boot(
    make_device: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """An external health check's verdict: the booted target of a job in ``verifying``."""
    dev = make_device("dev1", config={"slots": {"booted": "B"}})
    dev.sim.try_once("B")
    journal_in(dev, "verifying")
    code, _, err = await run(capsys, "agent", "mark-good", "--config", str(dev.config_path))
    assert code == 0, err
    assert dev.sim.state().slot("B").good


async def test_cli_mark_good_refuses_when_the_journal_is_unreadable(
    make_device: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = make_device("dev1", config={"slots": {"booted": "A"}})
    dev.sim.mark_bad("B")
    (dev.state_dir / "journal.json").write_bytes(b"\0" * 64)
    code, _, err = await run(capsys, "agent", "mark-good", "B", "--config", str(dev.config_path))
    assert code == 1 and "mark_refused" in err and "journal is unreadable" in err, err
    assert dev.sim.state().slot("B").bad


async def test_cli_mark_bad_refuses_to_leave_no_bootable_slot(
    make_device: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A is booted and B already bad (as a failed job leaves it): marking A bad too would leave
    the bootloader only its last resort. Refused unless forced; B may still be marked bad."""
    dev = make_device("dev1", config={"slots": {"booted": "A"}})
    cfg = str(dev.config_path)
    dev.sim.mark_bad("B")
    before = dev.sim.state()
    code, _, err = await run(capsys, "agent", "mark-bad", "--config", cfg)
    assert code == 1 and "mark_refused" in err and "leaves no bootable slot" in err, err
    assert dev.sim.state() == before
    assert (await run(capsys, "agent", "mark-bad", "B", "--config", cfg))[0] == 0
    assert (await run(capsys, "agent", "mark-bad", "--force", "--config", cfg))[0] == 0
    assert dev.sim.state().slot("A").bad

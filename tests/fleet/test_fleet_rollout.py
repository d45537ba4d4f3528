"""Rollouts end to end: real Mosquitto (TLS + ACL), replica, HTTPS store, rollout service and
simulated devices running the real agent. Each test has its own cloud dir and broker."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from plugins.cloud_env import cloud_with_broker

from otad.bundle import build_bundle, load_private_key
from otad.cli import main
from otad.cli.fleet import create_rollout, make_fleet, request_action
from otad.cloud import rollout_db as db
from otad.cloud import rollout_plan as plan
from otad.cloud.broker import BrokerProcess
from otad.cloud.pki import CloudDir
from otad.cloud.rollout import Presigner
from otad.cloud.rollout_plan import DeviceState, RolloutState
from otad.cloud.server import CloudServer
from otad.fleet.simulator import Fleet

pytestmark = pytest.mark.slow

COMPATIBLE = "otad-sim"
DEVICES = [f"dev-{n}" for n in range(1, 7)]
WAIT = 60.0


@pytest.fixture
def fleet_cloud(tmp_path: Path) -> Iterator[tuple[CloudDir, BrokerProcess]]:
    with cloud_with_broker(tmp_path, DEVICES) as both:
        yield both


@pytest.fixture
def bundle(fleet_cloud: tuple[CloudDir, BrokerProcess], tmp_path: Path) -> Path:
    cloud, _ = fleet_cloud
    image = tmp_path / "rootfs.img"
    image.write_bytes(random.Random(5).randbytes(48 * 1024))
    out = tmp_path / "v2.bundle"
    build_bundle(
        image, out, key=load_private_key(cloud.signing_key), version="2.0", compatible=COMPATIBLE
    )
    return out


def fleet_of(cloud: CloudDir, root: Path, ids: list[str], **faults: Any) -> Fleet:
    return make_fleet(cloud, ids, root, slot_size=64 * 1024, compatible=COMPATIBLE, **faults)


def snapshot(cloud: CloudDir, rollout_id: str) -> tuple[plan.Rollout, dict[str, plan.DeviceRecord]]:
    store = db.RolloutDB(cloud.config().db_path)
    try:
        return store.run(lambda c: (db.load_rollout(c, rollout_id), db.load_devices(c, rollout_id)))
    finally:
        store.close()


async def wait_for(
    cloud: CloudDir,
    rollout_id: str,
    predicate: Callable[[plan.Rollout, dict[str, plan.DeviceRecord]], bool],
    within: float = WAIT,
) -> tuple[plan.Rollout, dict[str, plan.DeviceRecord]]:
    deadline = time.monotonic() + within
    while True:
        rollout, devices = await asyncio.to_thread(snapshot, cloud, rollout_id)
        if predicate(rollout, devices):
            return rollout, devices
        if time.monotonic() > deadline:
            states = {d: r.state.value for d, r in devices.items()}
            raise AssertionError(f"timed out: {rollout.state} {rollout.reason!r} {states}")
        await asyncio.sleep(0.2)


@pytest.fixture
async def running(
    fleet_cloud: tuple[CloudDir, BrokerProcess],
) -> AsyncIterator[CloudServer]:
    cloud, _ = fleet_cloud
    async with CloudServer(cloud) as local:
        yield local


def states(devices: dict[str, plan.DeviceRecord]) -> dict[str, str]:
    return {d: r.state.value for d, r in devices.items()}


async def test_rollout_three_waves_complete(
    fleet_cloud: tuple[CloudDir, BrokerProcess],
    bundle: Path,
    running: CloudServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cloud, _ = fleet_cloud
    fleet = fleet_of(cloud, tmp_path / "devices", DEVICES)
    await fleet.start()
    try:
        rollout = create_rollout(
            cloud.root, str(bundle), devices=",".join(DEVICES), waves="1,3,100%"
        )
        assert rollout.waves == (1, 3, 6)
        rollout, devices = await wait_for(cloud, rollout.id, lambda r, _: not r.active)
    finally:
        await fleet.stop()
    assert rollout.state == RolloutState.COMPLETED, rollout.reason
    assert set(states(devices).values()) == {"succeeded"}
    code, out, _ = otad_cli(capsys, "fleet", "status", str(cloud.root), rollout.id, "--watch")
    assert code == 0 and "COMPLETED" in out and "3/3" in out
    # Waves started in order: every device of a later wave started after the earlier finished.
    by_wave: dict[int, list[plan.DeviceRecord]] = {}
    for record in devices.values():
        by_wave.setdefault(record.wave, []).append(record)
    for wave in (1, 2):
        first_start = min(r.started_at or 0 for r in by_wave[wave])
        last_end = max(r.finished_at or 0 for r in by_wave[wave - 1])
        assert first_start >= last_end
    # The fleet view saw every device on the new version, on slot B.
    store = db.RolloutDB(cloud.config().db_path)
    seen = store.run(db.seen_devices)
    store.close()
    assert {(s.version, s.slot) for d, s in seen.items() if d in DEVICES} == {("2.0", "B")}


async def test_rollout_paced_by_max_in_flight_completes(
    fleet_cloud: tuple[CloudDir, BrokerProcess],
    bundle: Path,
    running: CloudServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cloud, _ = fleet_cloud
    fleet = fleet_of(cloud, tmp_path / "devices", DEVICES)
    await fleet.start()
    try:
        code, out, err = otad_cli(
            capsys,
            "fleet",
            "rollout",
            str(cloud.root),
            str(bundle),
            "--devices",
            ",".join(DEVICES),
            "--waves",
            "100%",
            "--max-in-flight",
            "2",
        )
        assert code == 0, err
        rollout_id = out.split()[1].rstrip(":")
        rollout, devices = await wait_for(cloud, rollout_id, lambda r, _: not r.active)
    finally:
        await fleet.stop()
    assert rollout.state == RolloutState.COMPLETED and rollout.max_in_flight == 2
    assert set(states(devices).values()) == {"succeeded"}
    # Paced: the last two devices were told only after the first ones had finished.
    ordered = sorted(devices.values(), key=lambda r: r.position)
    first_done = min(r.finished_at or 0 for r in ordered[:2])
    assert all((r.started_at or 0) >= first_done for r in ordered[2:])
    code, out, _ = otad_cli(capsys, "fleet", "status", str(cloud.root), rollout_id, "--json")
    assert code == 0 and json.loads(out)["max_in_flight"] == 2


async def test_rollout_pauses_above_threshold_and_resume_continues(
    fleet_cloud: tuple[CloudDir, BrokerProcess], bundle: Path, running: CloudServer, tmp_path: Path
) -> None:
    cloud, _ = fleet_cloud
    ids = DEVICES[:4]
    # plan_faults spares the first device, so dev-2 (wave 2) fails its health check.
    fleet = fleet_of(cloud, tmp_path / "devices", ids, fail_health=0.25, spare=1, seed=1)
    bad = next(iter(fleet.faults.fail_health))
    ordered = [ids[0], bad, *[d for d in ids[1:] if d != bad]]
    await fleet.start()
    try:
        rollout = create_rollout(
            cloud.root,
            str(bundle),
            devices=",".join(ordered),
            waves="1,2,100%",
            max_failure_rate="10%",
        )
        rollout, devices = await wait_for(
            cloud, rollout.id, lambda r, _: r.state != RolloutState.RUNNING
        )
        assert rollout.state == RolloutState.PAUSED
        assert rollout.reason == "wave 2: 1 of 1 devices failed (100% > 10% allowed)"
        assert devices[bad].state == DeviceState.ROLLED_BACK
        assert devices[bad].error_code == "health_check_failed"
        # Paused: nothing of wave 3 was started.
        assert all(devices[d].state == DeviceState.PENDING for d in ordered[2:])

        result = await asyncio.to_thread(request_action, cloud.root, rollout.id, "resume", 10)
        assert result == "ok"
        rollout, devices = await wait_for(cloud, rollout.id, lambda r, _: not r.active)
    finally:
        await fleet.stop()
    assert rollout.state == RolloutState.COMPLETED
    assert rollout.accepted_waves == frozenset({1})
    assert [devices[d].state.value for d in ordered] == [
        "succeeded",
        "rolled_back",
        "succeeded",
        "succeeded",
    ]


async def test_rollout_abort_stops_new_starts_and_withdraws_unstarted(
    fleet_cloud: tuple[CloudDir, BrokerProcess], bundle: Path, running: CloudServer, tmp_path: Path
) -> None:
    cloud, _ = fleet_cloud
    online, offline = DEVICES[:2], DEVICES[2]
    fleet = fleet_of(cloud, tmp_path / "devices", online)
    await fleet.start()
    try:
        rollout = create_rollout(
            cloud.root,
            str(bundle),
            devices=",".join([*online, offline, *DEVICES[3:]]),
            waves="3,100%",
        )
        # The offline device is told but never starts; the online ones finish.
        rollout, devices = await wait_for(
            cloud,
            rollout.id,
            lambda r, d: all(d[x].state == DeviceState.SUCCEEDED for x in online),
        )
        assert devices[offline].state == DeviceState.ASSIGNED
        assert rollout.current_wave == 0
        result = await asyncio.to_thread(request_action, cloud.root, rollout.id, "abort", 10)
        assert result == "ok"
        rollout, devices = await wait_for(cloud, rollout.id, lambda r, _: not r.active)
        assert rollout.state == RolloutState.ABORTED
        assert devices[offline].state == DeviceState.CANCELLED
        assert {devices[d].state for d in DEVICES[3:]} == {DeviceState.SKIPPED}
        # The withdrawal reached the replica: the offline device's desired software is gone,
        # and devices of the never-started wave were never given one.
        deadline = time.monotonic() + 10
        while True:
            doc = await running.db.read(offline)
            desired = doc.desired if doc else {}
            if "software" not in desired or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert "software" not in desired
        never = await running.db.read(DEVICES[3])
        assert never is None or "software" not in never.desired
        # A finished rollout refuses further actions.
        result = await asyncio.to_thread(request_action, cloud.root, rollout.id, "resume", 10)
        assert result is not None and result.startswith("error:")
    finally:
        await fleet.stop()


async def test_rollout_continues_after_a_cloud_restart(
    fleet_cloud: tuple[CloudDir, BrokerProcess], bundle: Path, tmp_path: Path
) -> None:
    cloud, _ = fleet_cloud
    ids = DEVICES[:4]
    fleet = fleet_of(cloud, tmp_path / "devices", ids)
    await fleet.start()
    try:
        async with CloudServer(cloud):
            rollout = create_rollout(cloud.root, str(bundle), devices=",".join(ids), waves="1,100%")
            await wait_for(cloud, rollout.id, lambda r, _: r.current_wave == 1)
        # The cloud process is gone mid-rollout; devices keep going on their own.
        stopped, _ = await asyncio.to_thread(snapshot, cloud, rollout.id)
        assert stopped.state == RolloutState.RUNNING and stopped.current_wave == 1
        await asyncio.sleep(1.0)
        async with CloudServer(cloud):
            rollout, devices = await wait_for(cloud, rollout.id, lambda r, _: not r.active)
    finally:
        await fleet.stop()
    assert rollout.state == RolloutState.COMPLETED
    assert set(states(devices).values()) == {"succeeded"}


async def test_rollout_replaces_an_expired_url(
    fleet_cloud: tuple[CloudDir, BrokerProcess], bundle: Path, tmp_path: Path
) -> None:
    cloud, _ = fleet_cloud
    issued: list[int] = []

    def expire_first(presign: Any) -> Presigner:
        def wrapped(artifact_id: str, device_id: str, lifetime: int) -> str:
            issued.append(lifetime)
            if len(issued) > 1:
                return str(presign(artifact_id, device_id, lifetime))
            # The first URL was issued long ago, as if the device had been offline for days.
            then = time.time() - lifetime - 60
            return str(presign(artifact_id, device_id, lifetime, now=then))

        return wrapped

    fleet = fleet_of(cloud, tmp_path / "devices", DEVICES[:1])
    await fleet.start()
    try:
        async with CloudServer(cloud, wrap_presign=expire_first):
            rollout = create_rollout(cloud.root, str(bundle), devices=DEVICES[0], waves="100%")
            rollout, devices = await wait_for(cloud, rollout.id, lambda r, _: not r.active)
    finally:
        await fleet.stop()
    record = devices[DEVICES[0]]
    assert rollout.state == RolloutState.COMPLETED
    assert record.state == DeviceState.SUCCEEDED
    assert record.url_refreshes == 1 and record.job_id == rollout.id  # same job, new URL
    size = await asyncio.to_thread(lambda: bundle.stat().st_size)
    assert len(issued) == 2 and issued[1] == plan.url_lifetime(size)


def otad_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (the same parser and handlers as the installed command)."""
    capsys.readouterr()
    try:
        code = main(list(args))
    finally:
        # main() points the logs at this test's captured stderr, which closes after the test;
        # back to structlog's defaults (no level filter), so later tests' capture_logs see all.
        structlog.reset_defaults()
    out, err = capsys.readouterr()
    return code, out, err


def test_rollout_cli_refuses_bad_input(
    fleet_cloud: tuple[CloudDir, BrokerProcess],
    bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cloud, _ = fleet_cloud
    cases = [
        (["--devices", "dev-1,nobody"], "no identity"),
        (["--devices", "dev-1", "--waves", "1,0"], "at least one device"),
        (["--devices", "dev-1", "--max-failure-rate", "120%"], "between 0% and 100%"),
        (["--devices", "dev-1", "--wave-timeout", "soon"], "duration"),
        (["--devices", "dev-1,dev-2,dev-3", "--waves", "1,2"], "end the list with 100%"),
        (["--group", "empty"], "is empty"),
        (["--devices", "dev-1", "--max-in-flight", "0"], "at least 1"),
    ]
    for extra, message in cases:
        code, _, err = otad_cli(capsys, "fleet", "rollout", str(cloud.root), str(bundle), *extra)
        assert code == 1, (extra, err)
        assert "rollout_error" in err and message in err, (extra, err)
    code, _, err = otad_cli(
        capsys, "fleet", "rollout", str(cloud.root), "no-such-artifact", "--devices", "dev-1"
    )
    assert code == 1 and "artifact" in err
    # Nothing was stored by any refused command.
    store = db.RolloutDB(cloud.config().db_path)
    assert store.run(db.load_rollouts) == []
    store.close()


def test_fleet_cli_group_status_and_queued_actions(
    fleet_cloud: tuple[CloudDir, BrokerProcess],
    bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cloud, _ = fleet_cloud
    root = str(cloud.root)

    code, out, _ = otad_cli(capsys, "fleet", "group", root, "canary", "--add", "dev-2,dev-1,dev-2")
    assert code == 0 and "group canary (2): dev-1, dev-2" in out
    code, out, _ = otad_cli(capsys, "fleet", "group", root, "canary", "--remove", "dev-2")
    assert code == 0 and "group canary (1): dev-1" in out
    code, out, err = otad_cli(
        capsys, "fleet", "rollout", root, str(bundle), "--group", "canary", "--waves", "100%"
    )
    assert code == 0, err
    rollout_id = out.split()[1].rstrip(":")
    # No rollout service runs in this test: the rollout waits, actions are queued.
    code, out, _ = otad_cli(capsys, "fleet", "status", root, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["id"] == rollout_id and summary["state"] == "running"
    assert summary["counts"] == {"pending": 1}
    code, out, _ = otad_cli(capsys, "fleet", "status", root, rollout_id)
    assert code == 0 and rollout_id in out and "RUNNING" in out
    code, out, _ = otad_cli(capsys, "fleet", "status", root, "--all")
    assert code == 0 and rollout_id in out
    code, _, err = otad_cli(capsys, "fleet", "rollout", root, str(bundle), "--devices", "dev-1")
    assert code == 1 and "already in an active rollout" in err
    code, out, _ = otad_cli(capsys, "fleet", "devices", root, "--json")
    rows = json.loads(out)
    assert code == 0 and [r["device"] for r in rows] == DEVICES
    assert rows[0]["state"] is None
    code, out, _ = otad_cli(capsys, "fleet", "devices", root)
    assert code == 0 and "never reported" in out
    code, _, err = otad_cli(capsys, "fleet", "status", root, "r-nothere")
    assert code == 1 and "not found" in err
    code, _, err = otad_cli(capsys, "fleet", "pause", root, "r-nothere")
    assert code == 1 and "not found" in err
    code, out, _ = otad_cli(capsys, "fleet", "pause", root, rollout_id, "--wait", "0.2")
    assert code == 0 and "queued" in out
    store = db.RolloutDB(cloud.config().db_path)
    assert [(r.rollout_id, r.action) for r in store.run(db.pending_requests)] == [
        (rollout_id, "pause")
    ]
    store.close()


def test_demo_runs_and_summarizes(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "otad",
            "demo",
            "--devices",
            "5",
            "--fail-health",
            "1",
            "--fail-boot",
            "1",
            "--max-failure-rate",
            "100%",
            "--no-live",
            "--dir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "completed" in out and "updated to 2.0  3 of 5" in out
    assert "rolled back     2" in out
    assert "boot_failed" in out and "health_check_failed" in out
    assert "mosquitto stopped" in out
    leftover = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True, check=False
    )
    assert leftover.stdout == "", "the demo left a process behind"


def test_fleet_simulate_connects_its_agents_and_stops_on_sigint(
    fleet_cloud: tuple[CloudDir, BrokerProcess], tmp_path: Path
) -> None:
    cloud, _ = fleet_cloud
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "otad",
            "fleet",
            "simulate",
            str(cloud.root),
            "--devices",
            "3",
            "--fail-health",
            "0.34",
            "--state",
            str(tmp_path / "sim"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        log = tmp_path / "mosquitto.log"
        deadline = time.monotonic() + 60
        ids = ["sim-0001", "sim-0002", "sim-0003"]
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if all(f"u'{d}'" in text for d in ids):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        else:
            raise AssertionError("the simulated devices never connected")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "issued 3 device certificates" in out
    assert "simulating 3 devices (sim-0001 .. sim-0003); 1 fail health, 0 fail boot" in out
    assert set(CloudDir(cloud.root).device_ids()) >= set(ids)

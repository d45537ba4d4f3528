"""Crash tests: the replica SIGKILLed at exact points keeps every acknowledged update.

The replica runs as its own process (``otad shadow serve`` or ``replica_runner.py`` for exact
fault points); the broker, the fleet client and the device client stay up across the crash.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from replica_helpers import device

from otad.cloud.pki import CloudDir
from otad.cloud.replica import ShadowClient
from otad.errors import BrokerError

RUNNER = Path(__file__).with_name("replica_runner.py")

pytestmark = pytest.mark.slow


@contextmanager
def replica_process(cloud_dir: CloudDir, db: Path, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """A replica process; returns once it has subscribed (20 s at most)."""
    proc = subprocess.Popen(
        [sys.executable, str(RUNNER), str(cloud_dir.root), str(db), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "ready" or EOF if it died
        if line.strip() != "ready":
            proc.kill()
            raise AssertionError(
                f"replica did not start: {proc.stderr.read() if proc.stderr else ''}"
            )
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=15)
                stats = [line for line in out.splitlines() if line.startswith("stats ")]
                proc.stats = json.loads(stats[0][6:]) if stats else None  # type: ignore[attr-defined]
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def wait_exit(proc: subprocess.Popen[str], timeout: float = 15) -> int:
    return proc.wait(timeout)


def stored(db: Path, device_id: str) -> tuple[int | None, int]:
    """(stored version or None, outbox rows) read with a separate connection."""
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT version FROM shadows WHERE device_id = ?", (device_id,)
        ).fetchone()
        outbox = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    return (row[0] if row else None), outbox


async def test_replica_sigkill_after_accepted__state_survives(
    cloud_dir: CloudDir, broker: Any, tmp_path: Path, fleet: ShadowClient
) -> None:
    db = tmp_path / "shadow.db"
    with replica_process(cloud_dir, db) as proc:
        accepted = await fleet.update("dev1", desired={"software": {"version": "9"}})
        proc.send_signal(signal.SIGKILL)  # right after the accepted arrived
        assert wait_exit(proc) == -signal.SIGKILL
    assert accepted["version"] == 1
    with replica_process(cloud_dir, db):
        got = await fleet.get("dev1")
    assert got["version"] == 1
    assert got["state"]["desired"] == {"software": {"version": "9"}}


async def test_replica_killed_in_committed__outbox_republishes_on_restart(
    cloud_dir: CloudDir, broker: Any, tmp_path: Path
) -> None:
    db = tmp_path / "shadow.db"
    async with device(cloud_dir, broker, "dev2", identity="fleet") as dev:
        with replica_process(cloud_dir, db, "--kill-at", "committed") as proc:
            await dev.publish(
                "fleet/update", {"state": {"desired": {"led": "on"}}, "clientToken": "crash-1"}
            )
            assert await asyncio.to_thread(wait_exit, proc) == -signal.SIGKILL
        # Durable, not published: the document and its outbox row are on disk.
        assert stored(db, "dev2") == (1, 1)
        assert dev.of("update/accepted") == []
        with replica_process(cloud_dir, db):
            accepted = (await dev.wait_for("update/accepted"))[0]
            delta = (await dev.wait_for("update/delta"))[0]
            assert accepted["clientToken"] == "crash-1" and accepted["version"] == 1
            assert delta["state"] == {"led": "on"}
            # update/documents is a QoS 0 notification, not in the outbox: not republished.
            assert dev.of("update/documents") == []
            # Once acknowledged by the broker, the outbox row goes away.
            deadline = time.monotonic() + 10
            while stored(db, "dev2")[1] != 0:
                assert time.monotonic() < deadline, "outbox not emptied after republish"
                await asyncio.sleep(0.05)


async def test_replica_killed_in_committed__retry_with_same_token_is_applied_once(
    cloud_dir: CloudDir, broker: Any, tmp_path: Path
) -> None:
    """Kill -9 between the durable write and the publish; the fleet side retries with the
    same clientToken after the restart: one version, the outbox's accepted and the retry's
    answer are the same message, one delta, no documents."""
    db = tmp_path / "shadow.db"
    request = {"state": {"desired": {"led": "off"}}, "clientToken": "dev1-job-7"}
    async with device(cloud_dir, broker, "dev1", identity="fleet") as dev:
        with replica_process(cloud_dir, db, "--kill-at", "committed") as proc:
            await dev.publish("fleet/update", request)
            assert await asyncio.to_thread(wait_exit, proc) == -signal.SIGKILL
        assert stored(db, "dev1") == (1, 1)  # durable, in the outbox, never published
        with replica_process(cloud_dir, db) as proc:
            republished = (await dev.wait_for("update/accepted"))[0]
            # The client's timeout fired before the republish reached it: it retries.
            await dev.publish("fleet/update", request)
            accepted = await dev.wait_for("update/accepted", count=2)
            await dev.wait_for("update/delta")
            deadline = time.monotonic() + 10
            while stored(db, "dev1")[1] != 0:  # the outbox row closes on the PUBACK
                assert time.monotonic() < deadline, "outbox not emptied"
                await asyncio.sleep(0.05)
        assert accepted == [republished, republished]
        assert republished["version"] == 1 and republished["clientToken"] == "dev1-job-7"
        assert stored(db, "dev1") == (1, 0)
        assert len(dev.of("update/delta")) == 1
        assert dev.of("update/documents") == []
        assert proc.stats == {**proc.stats, "replayed": 1, "accepted": 0}  # type: ignore[attr-defined]


async def test_replica_killed_in_received__nothing_stored_nothing_acknowledged(
    cloud_dir: CloudDir, broker: Any, tmp_path: Path
) -> None:
    db = tmp_path / "shadow.db"
    async with device(cloud_dir, broker, "dev3") as dev:
        with replica_process(cloud_dir, db, "--kill-at", "received") as proc:
            await dev.publish("update", {"state": {"reported": {"a": 1}}, "clientToken": "lost"})
            assert await asyncio.to_thread(wait_exit, proc) == -signal.SIGKILL
        assert stored(db, "dev3") == (None, 0)
        with replica_process(cloud_dir, db):
            # The device got no answer, so it retries; the retry is applied once.
            ok = await dev.request(
                "update",
                {"state": {"reported": {"a": 1}}, "clientToken": "retry"},
                "update/accepted",
            )
            assert ok["version"] == 1
        assert [a["clientToken"] for a in dev.of("update/accepted")] == ["retry"]


async def test_replica_sigkill_during_a_stream__every_stored_version_is_published(
    cloud_dir: CloudDir, broker: Any, tmp_path: Path
) -> None:
    """Kill -9 in the middle of a burst: afterwards, each stored version has its accepted.

    The burst goes in waves, each answered before the next one is sent, so the replica makes
    several units of work whatever the machine's speed (it joins everything that arrives while
    it is busy into one unit) and the kill at the third commit hits the middle of the stream.
    """
    db = tmp_path / "shadow.db"
    wave, sent = 40, 0
    async with device(cloud_dir, broker, "dev4") as dev:
        with replica_process(cloud_dir, db, "--kill-at", "committed", "--kill-after", "3") as proc:
            for _ in range(10):
                for i in range(sent, sent + wave):
                    await dev.publish(
                        "update", {"state": {"reported": {"i": i}}, "clientToken": f"s{i}"}
                    )
                sent += wave
                deadline = time.monotonic() + 20
                while proc.poll() is None and len(dev.of("update/accepted")) < sent:
                    assert time.monotonic() < deadline, "a wave was not answered"
                    await asyncio.sleep(0.02)
                if proc.poll() is not None:
                    break
            assert await asyncio.to_thread(wait_exit, proc) == -signal.SIGKILL
        version, _ = stored(db, "dev4")
        answered = len(dev.of("update/accepted"))
        # Units 1 and 2 were published (maybe still on their way), unit 3 is stored only.
        assert version is not None and answered < version <= sent
        with replica_process(cloud_dir, db):
            # Every durable version reaches the device (some maybe twice: at least once).
            deadline = time.monotonic() + 20
            while {a["version"] for a in dev.of("update/accepted")} < set(range(1, version + 1)):
                assert time.monotonic() < deadline, "a stored version was never published"
                await asyncio.sleep(0.05)
        # And nothing was acknowledged that is not stored.
        assert max(a["version"] for a in dev.of("update/accepted")) <= version


async def test_replica_client_times_out_without_a_replica(cloud_dir: CloudDir, broker: Any) -> None:
    from replica_helpers import settings

    async with ShadowClient(settings(cloud_dir, broker, "fleet"), timeout=0.5) as client:
        with pytest.raises(BrokerError, match="no answer"):
            await client.get("dev1")


async def test_replica_two_processes_share_the_load_and_one_database(
    cloud_dir: CloudDir, broker: Any, tmp_path: Path, fleet: ShadowClient
) -> None:
    """Shared subscription: requests alternate between processes; versions stay exact."""
    db = tmp_path / "shadow.db"
    with replica_process(cloud_dir, db) as one, replica_process(cloud_dir, db) as two:
        versions = []
        for i in range(40):
            accepted = await fleet.update("dev1", reported={"n": i, f"k{i % 3}": i})
            versions.append(accepted["version"])
        # Concurrent writers from both processes on one device: no lost update.
        results = await asyncio.gather(
            *(fleet.update("dev1", reported={f"c{i}": i}) for i in range(40))
        )
        got = await fleet.get("dev1")
    # Both processes served requests (the broker alternates a shared subscription).
    assert one.stats["accepted"] > 0 and two.stats["accepted"] > 0  # type: ignore[attr-defined]
    assert one.stats["accepted"] + two.stats["accepted"] == 80  # type: ignore[attr-defined]
    assert versions == list(range(1, 41))
    assert sorted(r["version"] for r in results) == list(range(41, 81))
    assert got["version"] == 80
    assert got["state"]["reported"]["n"] == 39
    assert all(got["state"]["reported"][f"c{i}"] == i for i in range(40))

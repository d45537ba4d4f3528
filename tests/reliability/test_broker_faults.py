"""Issue 8, broker faults: the device's broker link lost mid-download (re-sync with get), the
broker down during the post-reboot health check (both policies),
and the replica down while the device reports (retried with one clientToken, applied once the
replica is back). The broker restart mid-download is in tests/agent/test_agent_network.py
(test_agent_broker_restart_mid_download_continues_one_job).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from plugins.agent_env import FaultProxy, offer_bundle, store_proxy, wait_reported
from plugins.cloud_env import free_port, mqtt_client

from otad.agent.config import parse
from otad.agent.mqtt import ShadowSession
from otad.cloud.db import SqliteStore
from otad.cloud.replica import BrokerSettings, Replica, ShadowClient

MiB = 1024 * 1024
BROKER_TIMEOUT = 2.0  # health.broker_timeout: how long the verdict waits for the broker


@pytest.mark.parametrize(
    ("policy", "outcome"),
    [("required", "rolled_back"), ("ignore", "succeeded")],
    ids=["required__rolls_back", "ignore__commits"],
)
async def test_broker_down_during_the_post_reboot_health_check(
    policy: str,
    outcome: str,
    cloud: Any,
    cloud_dir: Any,
    broker: Any,
    make_device: Any,
    tmp_path: Path,
) -> None:
    """health.broker = "required" (the default): a device that cannot reach its broker after
    the update is not healthy, so the update is rolled back (an image that breaks networking
    must not be committed). "ignore": the verdict is the local checks only. Either way the
    truth reaches the shadow once the broker is back."""
    dev = make_device(
        "dev1",
        config={"health": {"broker": policy, "broker_timeout": BROKER_TIMEOUT}},
    )
    await dev.start()
    image, _ = await offer_bundle(cloud, cloud_dir, tmp_path, image_size=MiB, job="hb")
    await dev.wait_reboot_requested()
    broker.stop()
    try:
        assert await dev.reboot() == "B"  # the new slot boots; the agent runs the health check
        requests = dev.reboot_requests
        # the verdict is journaled before anything is reported: bring the broker back then
        verdict = "rolling_back" if policy == "required" else "succeeded"
        await journaled(dev, verdict, within=BROKER_TIMEOUT + 20)
    finally:
        broker.start()
    if policy == "required":
        await dev.wait_reboot_requested(within=30)  # the rollback reboot
        assert not dev.sim.state().slot("B").bootable
        assert await dev.reboot() == "A"
    else:
        assert dev.sim.state().slot("B").good
        assert dev.reboot_requests == requests  # committed without the broker
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == outcome, within=40)
    assert sw["jobId"] == "hb"
    if policy == "required":
        assert sw["error"]["code"] == "health_check_failed" and "broker" in sw["error"]["message"]
        assert sw["slot"] == "A" and sw["version"] == "1.0"
        assert dev.slot_bytes("A") == dev.factory["A"]
    else:
        assert sw["slot"] == "B" and sw["version"] == "2.0" and sw.get("error") is None
        assert dev.slot_sha("B", len(image)) == hashlib.sha256(image).hexdigest()


async def test_broker_lost_mid_download_resyncs_with_get_and_acts_on_what_it_missed(
    cloud: Any, cloud_dir: Any, broker: Any, make_device: Any, tmp_path: Path
) -> None:
    """The device's broker link drops mid-download; meanwhile the operator replaces the job.
    The delta for it is never delivered (clean session), yet after the reconnect the device
    fetches the document with ``get``, cancels the old download and runs the new job."""
    link_port = free_port()
    link = await FaultProxy(broker.host, broker.port).start(link_port)
    store = await store_proxy(cloud).start()
    dev = make_device("dev1", config={"broker": {"port": link_port}})
    try:
        agent = await dev.start()
        _, first = await offer_bundle(cloud, cloud_dir, tmp_path, proxy=store, publish=False)
        store.rate = (tmp_path / "j1.otb").stat().st_size / 12
        await cloud.set_desired("dev1", {"software": first})
        await wait_reported(cloud, "dev1", lambda s: s["state"] == "downloading")
        await link.close()  # the device's MQTT link is gone; the download goes on
        assert agent.session is not None
        await until(lambda: not agent.session.connected.is_set(), 10)
        image, second = await offer_bundle(
            cloud, cloud_dir, tmp_path, version="3.0", job="j2", seed=9
        )
        await asyncio.sleep(0.5)
        assert agent.runner is not None and agent.runner.record is not None
        assert agent.runner.record.job_id == "j1"  # no delta could reach it
        link = await FaultProxy(broker.host, broker.port).start(link_port)
        await until(lambda: agent.jobs_started == 2, 30)  # j1 still downloading, slowly
        store.rate = None
        await dev.wait_reboot_requested(within=60)
    finally:
        await link.close()
        await store.close()
    assert agent.session.connects >= 2 and agent.jobs_started == 2
    assert agent.runner.record.job_id == "j2"
    assert dev.slot_sha("B", len(image)) == hashlib.sha256(image).hexdigest()
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "rebooting")
    assert sw["jobId"] == "j2" and second["jobId"] == "j2"


async def until(check: Any, within: float) -> None:
    for _ in range(int(within / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {within}s")


async def journaled(dev: Any, state: str, within: float) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        runner = dev.agent.runner if dev.agent is not None else None
        record = runner.record if runner is not None else None
        if record is not None and record.state.value == state:
            return
        assert asyncio.get_running_loop().time() < deadline, f"journal never reached {state}"
        await asyncio.sleep(0.05)


# --- replica down while the device reports -------------------------------------------------------


class OwnReplica:
    """A replica of this test (the cloud fixture's cannot be stopped alone) on one database."""

    def __init__(self, cloud_dir: Any, broker: Any, db_path: Path) -> None:
        self.settings = BrokerSettings(
            host=broker.host,
            port=broker.port,
            tls_context=cloud_dir.client_context(cloud_dir.service("replica")),
        )
        self.db_path = db_path
        self.template = cloud_dir.config().topic_template
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._db: SqliteStore | None = None

    async def start(self) -> None:
        self._db = SqliteStore(self.db_path)
        await self._db.start()
        replica = Replica(self._db, self.settings, template=self.template)
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(replica.run(self._stop))
        await asyncio.wait_for(replica.ready.wait(), 20)

    async def stop(self) -> None:
        if self._stop is not None and self._task is not None:
            self._stop.set()
            await asyncio.wait_for(self._task, 20)
        if self._db is not None:
            await self._db.close()
        self._stop = self._task = self._db = None


@pytest.fixture
async def replica(cloud_dir: Any, broker: Any, tmp_path: Path) -> AsyncIterator[OwnReplica]:
    own = OwnReplica(cloud_dir, broker, tmp_path / "shadow.db")
    await own.start()
    yield own
    await own.stop()


async def test_broker_replica_down_while_the_device_reports_retries_one_token_until_applied(
    cloud_dir: Any, broker: Any, replica: OwnReplica
) -> None:
    ident = cloud_dir.device("dev3")
    config = parse(
        {
            "device_id": "dev3",
            "compatible": "x",
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "ca": str(cloud_dir.ca_cert),
                "cert": str(ident.cert),
                "key": str(ident.key),
                "report_timeout": 0.3,
                "reconnect_initial": 0.05,
                "reconnect_max": 0.5,
            },
            "slots": {"A": {"path": "/a"}, "B": {"path": "/b"}},
        }
    )
    sent: list[dict[str, Any]] = []
    async with mqtt_client(cloud_dir, "fleet", broker, identifier="report-watch") as watcher:
        await watcher.subscribe("state/dev3/update", qos=1)

        async def watch() -> None:
            async for message in watcher.messages:
                sent.append(json.loads(message.payload))  # type: ignore[arg-type]

        watching = asyncio.create_task(watch())
        session = ShadowSession(config, lambda _doc: None)
        running = asyncio.create_task(session.run())
        try:
            await asyncio.wait_for(session.connected.wait(), 10)
            session.report({"software": {"state": "idle", "version": "1.0"}})
            assert await session.flush(10)

            await replica.stop()
            report = {"software": {"state": "downloading", "progress": 42, "jobId": "r"}}
            session.report(report)
            assert not await session.flush(1.5)  # nobody answers: not acknowledged
            while_down = [m for m in sent if m["state"]["reported"]["software"].get("jobId")]
            assert len(while_down) >= 3  # re-sent every report_timeout
            assert len({m["clientToken"] for m in while_down}) == 1  # always the same token

            await replica.start()
            assert await session.flush(15)  # one of the re-sends is answered
        finally:
            running.cancel()
            watching.cancel()
            for task in (running, watching):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    tokens = {m["clientToken"] for m in sent if m["state"]["reported"]["software"].get("jobId")}
    assert len(tokens) == 1
    async with ShadowClient(replica.settings, template=replica.template) as client:
        document = await client.get("dev3")
    software = document["state"]["reported"]["software"]
    assert software == {"state": "downloading", "version": "1.0", "progress": 42, "jobId": "r"}

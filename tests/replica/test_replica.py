"""The replica against a real Mosquitto with TLS and ACL: protocol behaviour end to end."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from plugins.cloud_env import free_port, mqtt_client
from replica_helpers import device, running_replica, settings

from otad.cloud.broker import BrokerProcess
from otad.cloud.db import SqliteStore
from otad.cloud.pki import CloudDir, init_cloud
from otad.cloud.replica import Replica, ShadowClient
from otad.errors import ShadowBadRequest, ShadowNotFound, ShadowVersionConflict

SOFTWARE = {"version": "2.0", "url": "https://127.0.0.1:8443/v1/artifacts/a1", "jobId": "j-1"}


async def test_replica_desired_set_sends_delta_to_the_device(
    cloud_dir: CloudDir, broker: Any, replica: Replica, fleet: ShadowClient
) -> None:
    async with device(cloud_dir, broker, "dev1") as dev:
        accepted = await fleet.update_desired("dev1", {"software": SOFTWARE})
        assert accepted["version"] == 1
        assert accepted["state"] == {"desired": {"software": SOFTWARE}}
        delta = (await dev.wait_for("update/delta"))[0]
        assert delta["state"] == {"software": SOFTWARE}
        assert delta["version"] == 1
        assert set(delta["metadata"]["software"]) == set(SOFTWARE)
        documents = (await dev.wait_for("update/documents"))[0]
        assert documents["current"]["state"] == {"desired": {"software": SOFTWARE}}


@pytest.mark.parametrize(
    "state",
    [{"desired": {"software": SOFTWARE}}, {"desired": None}, {"desired": {}, "reported": {"a": 1}}],
    ids=["set", "delete", "with_reported"],
)
async def test_replica_device_cannot_change_its_desired_state(
    state: dict[str, Any],
    cloud_dir: CloudDir,
    broker: Any,
    replica: Replica,
    fleet: ShadowClient,
) -> None:
    """On its own update topic a device may only report. One that set its own desired
    software would make the store issue it any artifact whose id it knows."""
    await fleet.update_desired("dev1", {"software": {**SOFTWARE, "jobId": "fleet"}})
    async with device(cloud_dir, broker, "dev1") as dev:
        rejected = await dev.request(
            "update", {"state": state, "clientToken": "self"}, "update/rejected"
        )
        assert rejected["code"] == 403 and rejected["clientToken"] == "self", rejected
        assert "fleet side" in rejected["message"]
    document = await fleet.get("dev1")
    assert document["state"]["desired"] == {"software": {**SOFTWARE, "jobId": "fleet"}}
    assert "reported" not in document["state"] and document["version"] == 1


async def test_replica_reported_matching_desired_sends_no_delta(
    cloud_dir: CloudDir, broker: Any, replica: Replica, fleet: ShadowClient
) -> None:
    async with device(cloud_dir, broker, "dev1") as dev:
        await fleet.update_desired("dev1", {"software": SOFTWARE})
        await dev.wait_for("update/delta")
        accepted = await dev.request(
            "update",
            {"state": {"reported": {"software": SOFTWARE}}, "clientToken": "r1"},
            "update/accepted",
        )
        assert accepted["clientToken"] == "r1" and accepted["version"] == 2
        # A further report (progress) still changes no delta: still exactly one delta message.
        await dev.request(
            "update", {"state": {"reported": {"temp": 21}}, "clientToken": "r2"}, "update/accepted"
        )
        got = await dev.request("get", {"clientToken": "g"}, "get/accepted")
        assert "delta" not in got["state"]
        assert len(dev.of("update/delta")) == 1


async def test_replica_version_conflict_is_rejected_409(
    cloud_dir: CloudDir, broker: Any, replica: Replica, fleet: ShadowClient
) -> None:
    await fleet.update("dev2", reported={"a": 1})
    with pytest.raises(ShadowVersionConflict):
        await fleet.update("dev2", reported={"a": 2}, version=7)
    async with device(cloud_dir, broker, "dev2") as dev:
        rejected = await dev.request(
            "update",
            {"state": {"reported": {"a": 3}}, "version": 0, "clientToken": "v"},
            "update/rejected",
        )
        assert rejected["code"] == 409 and rejected["clientToken"] == "v"
        ok = await dev.request(
            "update",
            {"state": {"reported": {"a": 3}}, "version": 1, "clientToken": "v2"},
            "update/accepted",
        )
        assert ok["version"] == 2
    doc = await fleet.get("dev2")
    assert doc["state"]["reported"] == {"a": 3} and doc["version"] == 2


async def test_replica_retry_with_same_client_token__same_accepted_no_new_version(
    cloud_dir: CloudDir, broker: Any, replica: Replica, fleet: ShadowClient
) -> None:
    """A device that missed its accepted and retries (same token, same content) gets the same
    accepted again: no second version, no second delta or documents message."""
    async with device(cloud_dir, broker, "dev3") as dev:
        report = {"state": {"reported": {"fw": "1.0", "temp": 20}}, "clientToken": "dev3-r1"}
        first = await dev.request("update", report, "update/accepted")
        again = await dev.request("update", report, "update/accepted")
        assert again == first and first["version"] == 1
        # An operator's update in between does not make the retry a new update.
        await fleet.update_desired("dev3", {"fw": "1.1"})
        late = await dev.request("update", report, "update/accepted")
        assert late == first
        # The same token with other content is a new update (a token counter that restarted).
        changed = {"state": {"reported": {"fw": "1.1"}}, "clientToken": "dev3-r1"}
        new = await dev.request("update", changed, "update/accepted")
        assert new["version"] == 3
        # Documents go out before their accepted on one connection: all of them are here.
        versions = [d["current"]["version"] for d in dev.of("update/documents")]
        assert versions == [1, 2, 3]
        assert [d["version"] for d in dev.of("update/delta")] == [2]
        document = await fleet.get("dev3")
    assert document["version"] == 3
    assert document["state"]["reported"] == {"fw": "1.1", "temp": 20}
    assert replica.stats.replayed == 2 and replica.stats.accepted == 3


@pytest.mark.parametrize(
    ("payload", "code", "token"),
    [
        pytest.param(b"{nope", 400, None, id="malformed_json"),
        pytest.param(
            b'{"state": {"reported": 5}, "clientToken": "t1"}', 400, "t1", id="wrong_type"
        ),
        pytest.param(
            b'{"state": {"desired": {"a": 1}}, "clientToken": "t2", "x": 1}',
            400,
            "t2",
            id="unknown_field",
        ),
        pytest.param(
            b'{"state": {"reported": {"a": 1}}, "clientToken": "' + b"k" * 65 + b'"}',
            400,
            None,
            id="token_too_long",
        ),
        pytest.param(b'{"state": {"reported": {"a": "\xff"}}}', 415, None, id="not_utf8"),
        pytest.param(
            b'{"state": {"reported": {"a": "' + b"x" * 9000 + b'"}}, "clientToken": "big"}',
            413,
            "big",
            id="oversize_document",
        ),
        pytest.param(
            b'{"state": {"reported": {"a": "' + b"x" * 20000 + b'"}}}',
            413,
            None,
            id="oversize_request",
        ),
        pytest.param(
            b'{"state": {"reported": {"a": "' + b"x" * 20000 + b'"}}, "clientToken": "huge"}',
            413,
            "huge",
            id="oversize_request_with_token",
        ),
    ],
)
async def test_replica_bad_input_is_rejected_and_stores_nothing(
    cloud_dir: CloudDir,
    broker: Any,
    replica: Replica,
    payload: bytes,
    code: int,
    token: str | None,
) -> None:
    async with device(cloud_dir, broker, "dev3") as dev:
        rejected = await dev.request("update", payload, "update/rejected")
        assert rejected["code"] == code
        assert rejected.get("clientToken") == token
        assert isinstance(rejected["message"], str) and rejected["message"]
        got = await dev.request("get", b"", "get/rejected")
        assert got["code"] == 404  # nothing was stored
        # The replica survived: a good update still works.
        ok = await dev.request(
            "update", {"state": {"reported": {"ok": True}}, "clientToken": "ok"}, "update/accepted"
        )
        assert ok["version"] == 1
    assert replica.stats.rejected >= 1


async def test_replica_get_returns_the_full_document_and_echoes_the_token(
    cloud_dir: CloudDir, broker: Any, replica: Replica, fleet: ShadowClient
) -> None:
    with pytest.raises(ShadowNotFound):
        await fleet.get("dev4")
    await fleet.update("dev4", desired={"software": SOFTWARE, "led": "on"})
    async with device(cloud_dir, broker, "dev4") as dev:
        await dev.request(
            "update", {"state": {"reported": {"led": "on", "temp": 3}}}, "update/accepted"
        )
        got = await dev.request("get", {"clientToken": "full"}, "get/accepted")
    assert got["clientToken"] == "full"
    assert got["version"] == 2
    assert got["state"] == {
        "desired": {"software": SOFTWARE, "led": "on"},
        "reported": {"led": "on", "temp": 3},
        "delta": {"software": SOFTWARE},
    }
    assert set(got["metadata"]) == {"desired", "reported"}
    assert got["metadata"]["reported"]["temp"]["timestamp"] > 0


async def test_replica_client_validates_before_sending(fleet: ShadowClient) -> None:
    with pytest.raises(ShadowBadRequest):
        await fleet.update("dev1", desired={"a": float("nan")})
    with pytest.raises(ShadowBadRequest):
        await fleet.update("dev1/x", desired={"a": 1})


async def test_replica_aws_template_end_to_end(tmp_path: Path) -> None:
    """A cloud dir with the AWS layout: its own broker, ACL on $aws/things/<id>/shadow/#."""
    template = "$aws/things/{device_id}/shadow"
    cloud = init_cloud(
        tmp_path / "aws",
        ["thing1"],
        broker_port=free_port(),
        store_port=free_port(),
        topic_template=template,
    )
    with BrokerProcess(cloud, log_path=tmp_path / "mosquitto.log") as broker:
        async with (
            running_replica(cloud, broker, tmp_path / "aws.db", template=template) as replica,
            ShadowClient(settings(cloud, broker, "fleet"), template) as fleet,
            device(cloud, broker, "thing1", template) as dev,
        ):
            # $ filters cannot be shared on Mosquitto: the replica subscribes plainly.
            assert replica.filters == [
                "$aws/things/+/shadow/update",
                "$aws/things/+/shadow/get",
                "$aws/things/+/shadow/fleet/update",
            ]
            await fleet.update_desired("thing1", {"software": SOFTWARE})
            delta = (await dev.wait_for("update/delta"))[0]
            assert delta["state"] == {"software": SOFTWARE}
            ok = await dev.request(
                "update",
                {"state": {"reported": {"software": SOFTWARE}}, "clientToken": "aws"},
                "update/accepted",
            )
            assert ok["version"] == 2 and ok["clientToken"] == "aws"
            got = await dev.request("get", b"", "get/accepted")
            assert "delta" not in got["state"] and got["version"] == 2


async def test_replica_restart_keeps_state(
    cloud_dir: CloudDir, broker: Any, tmp_path: Path, fleet: ShadowClient
) -> None:
    db = tmp_path / "shadow.db"
    async with running_replica(cloud_dir, broker, db):
        await fleet.update("dev1", desired={"v": 1})
        await fleet.update("dev1", reported={"v": 0})
    async with running_replica(cloud_dir, broker, db):
        got = await fleet.get("dev1")
    assert got["version"] == 2 and got["state"]["delta"] == {"v": 1}


async def test_replica_throttles_with_429_beyond_max_pending(
    cloud_dir: CloudDir, broker: Any, tmp_path: Path
) -> None:
    async with (
        running_replica(cloud_dir, broker, tmp_path / "t.db", max_pending=1) as replica,
        device(cloud_dir, broker, "dev2") as dev,
    ):
        for i in range(200):
            await dev.publish("update", {"state": {"reported": {"i": i}}, "clientToken": f"c{i}"})
        await dev.wait_for("update/accepted", count=1)
        deadline = asyncio.get_running_loop().time() + 10
        while len(dev.of("update/accepted")) + len(dev.of("update/rejected")) < 200:
            assert asyncio.get_running_loop().time() < deadline, "answers missing"
            await asyncio.sleep(0.05)
        codes = {r["code"] for r in dev.of("update/rejected")}
        assert codes <= {429}
        assert replica.stats.throttled == len(dev.of("update/rejected"))
    # Every accepted one is stored, each exactly once: the version counts them.
    store = SqliteStore(tmp_path / "t.db")
    async with store:
        doc = await store.read("dev2")
    assert doc is not None and doc.version == len(dev.of("update/accepted"))


async def test_replica_persistent_session_gets_requests_sent_while_down(
    cloud_dir: CloudDir, broker: Any, tmp_path: Path
) -> None:
    db = tmp_path / "p.db"
    session = f"otad-replica-test-{tmp_path.name}"
    try:
        async with device(cloud_dir, broker, "dev1") as dev:
            async with running_replica(cloud_dir, broker, db, session=session):
                await dev.request(
                    "update",
                    {"state": {"reported": {"n": 1}}, "clientToken": "up"},
                    "update/accepted",
                )
            # No replica connected: the broker keeps the request for the persistent session.
            await dev.publish("update", {"state": {"reported": {"n": 2}}, "clientToken": "queued"})
            await asyncio.sleep(0.3)
            assert [a["clientToken"] for a in dev.of("update/accepted")] == ["up"]
            async with running_replica(cloud_dir, broker, db, session=session):
                accepted = await dev.wait_for("update/accepted", count=2)
                assert accepted[1]["clientToken"] == "queued" and accepted[1]["version"] == 2
    finally:
        # Leave no session behind (it would take a share of later tests' requests): connect
        # with the same client id and a clean session, which makes the broker drop it.
        async with mqtt_client(
            cloud_dir, "replica", broker, identifier=session, clean_session=True
        ):
            pass


async def test_replica_reconnects_after_a_broker_restart(
    cloud_dir: CloudDir, broker: Any, replica: Replica
) -> None:
    broker.restart()
    deadline = asyncio.get_running_loop().time() + 20
    # ready is cleared when the loss is noticed and set again after resubscribing.
    while replica.ready.is_set():
        assert asyncio.get_running_loop().time() < deadline, "loss never noticed"
        await asyncio.sleep(0.05)
    await asyncio.wait_for(replica.ready.wait(), 20)
    async with ShadowClient(settings(cloud_dir, broker, "fleet")) as fleet:
        accepted = await fleet.update("dev1", reported={"after": "restart"})
    assert accepted["version"] == 1


async def test_replica_keepalive_notices_a_silent_broker(
    cloud_dir: CloudDir, broker: Any, tmp_path: Path
) -> None:
    """A broker that stops answering (SIGSTOP) is dropped after 1.5 keepalive intervals."""
    store = SqliteStore(tmp_path / "k.db")
    async with store:
        quick = dataclasses.replace(settings(cloud_dir, broker, "replica"), keepalive=2)
        replica = Replica(store, quick)
        stop = asyncio.Event()
        task = asyncio.create_task(replica.run(stop))
        try:
            await asyncio.wait_for(replica.ready.wait(), 15)
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                started = asyncio.get_running_loop().time()
                while replica.ready.is_set():
                    assert asyncio.get_running_loop().time() - started < 10, "not noticed"
                    await asyncio.sleep(0.1)
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            await asyncio.wait_for(replica.ready.wait(), 20)
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)


async def test_replica_does_not_apply_a_retained_request_again(
    cloud_dir: CloudDir, broker: Any, tmp_path: Path, fleet: ShadowClient
) -> None:
    """A device publishes its report with the retain flag. The broker replays a retained
    message to every new plain subscription (the AWS layout's; shared ones get none), so each
    replica (re)start applied the old update again: a new version, and a report the device
    never sent twice."""
    db = tmp_path / "shadow.db"
    try:
        async with (
            running_replica(cloud_dir, broker, db, share_group=None),
            device(cloud_dir, broker, "dev3") as dev,
        ):
            await dev.client.publish(
                "state/dev3/update",
                b'{"state": {"reported": {"boot": 1}}}',  # no token: nothing marks a replay
                qos=1,
                retain=True,
            )
            await dev.wait_for("update/accepted")
        async with running_replica(cloud_dir, broker, db, share_group=None):
            await asyncio.sleep(1.0)  # the broker replays the retained request at subscription
            got = await fleet.get("dev3")
        assert got["version"] == 1 and got["state"]["reported"] == {"boot": 1}, got
    finally:
        async with device(cloud_dir, broker, "dev3") as dev:
            await dev.client.publish("state/dev3/update", b"", qos=1, retain=True)  # clears it

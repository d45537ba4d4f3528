"""The `cloud` fixture end to end: replica + store running, a device sees its delta."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path

import pytest
import structlog
from plugins.cloud_env import CloudEnv

from otad.cloud.broker import BrokerProcess
from otad.cloud.pki import CloudDir
from otad.cloud.server import CloudServer
from otad.errors import RolloutError, ShadowNotFound


async def test_cloud_env_desired_reaches_the_device_as_delta(
    cloud: CloudEnv, signed_bundle: Path
) -> None:
    artifact = await cloud.upload(signed_bundle)
    url = cloud.presign(artifact, "dev1", 600)
    async with cloud.mqtt("dev1", identifier="dev1-env") as device:
        await device.subscribe("state/dev1/update/delta", qos=1)
        desired = {"software": {"version": "2.0", "url": url, "jobId": "j-1"}}
        accepted = await cloud.set_desired("dev1", desired)
        assert accepted["state"]["desired"] == desired
        async with asyncio.timeout(10):
            message = await anext(aiter(device.messages))
    delta = json.loads(bytes(message.payload))  # type: ignore[arg-type]
    assert delta["state"] == desired
    document = await cloud.get_document("dev1")
    assert document["state"]["desired"] == desired
    assert document["state"]["delta"] == desired


async def test_cloud_env_each_test_starts_with_an_empty_replica(cloud: CloudEnv) -> None:
    with pytest.raises(ShadowNotFound):
        await cloud.get_document("dev1")


async def test_cloud_env_survives_a_broker_restart(cloud: CloudEnv) -> None:
    await cloud.set_desired("dev2", {"software": {"version": "1.0"}})
    with structlog.testing.capture_logs() as logs:
        cloud.broker.restart()
        # The replica notices, reconnects with bounded backoff and subscribes again.
        for _ in range(300):
            if any(e["event"] == "replica_serving" for e in logs):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the replica did not resubscribe within 30 s")
    # The helper's own client was cut too: it reconnects once, by itself.
    accepted = await cloud.set_desired("dev2", {"software": {"version": "2.0"}})
    assert accepted["state"]["desired"]["software"]["version"] == "2.0"
    document = await cloud.get_document("dev2")
    assert document["version"] == 2


def test_cloud_server_public_url_is_the_base_of_presigned_urls(
    cloud_dir: CloudDir, tmp_path: Path
) -> None:
    config = cloud_dir.config().with_overrides(db_path=tmp_path / "db", artifacts_dir=tmp_path)
    server = CloudServer(
        cloud_dir, config, store_port=0, public_url="https://10.0.2.100:8443", rollouts=False
    )
    url = server.store.signer.presign("a" * 64, "dev1", 60)
    assert url.startswith(f"https://10.0.2.100:8443/v1/artifacts/{'a' * 64}?device=dev1&")
    default = CloudServer(cloud_dir, config, rollouts=False)
    assert default.store.signer.presign("a" * 64, "dev1", 60).startswith(config.store_public_url)


async def test_cloud_server_a_failing_part_ends_it_with_its_own_error(
    cloud_dir: CloudDir, broker: BrokerProcess, tmp_path: Path
) -> None:
    # With the broker up the replica is connected and serving when the rollout part fails:
    # the whole server must still stop (the replica must not go on reconnecting).
    db = tmp_path / "shadow.db"

    def future_schema() -> None:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute("CREATE TABLE fleet_meta (key TEXT PRIMARY KEY, value TEXT)")
            conn.execute("INSERT INTO fleet_meta VALUES ('schema_version', '999')")
            conn.commit()

    await asyncio.to_thread(future_schema)
    config = cloud_dir.config().with_overrides(db_path=db, artifacts_dir=tmp_path / "a")
    server = CloudServer(cloud_dir, config, store_port=0)
    with pytest.raises(RolloutError, match="schema version 999"):
        async with asyncio.timeout(30):
            await server.run(asyncio.Event())
    assert not server.ready.is_set()

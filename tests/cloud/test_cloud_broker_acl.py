"""The real Mosquitto with the generated config: TLS required, identities, ACL per device.

"Nothing arrives" is proved with a control message: the forbidden message is published first,
then a permitted one on the subscriber's own topic from the same publisher connection order;
once the control message is in, the broker has already routed (or dropped) the earlier one,
since Mosquitto delivers in order per publisher/subscriber pair. A bounded extra wait covers
the different-publisher case.
"""

from __future__ import annotations

import asyncio
import ssl
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from plugins.cloud_env import mqtt_client

from otad.cloud.broker import BrokerProcess
from otad.cloud.pki import CloudDir

WAIT = 1.0  # seconds a forbidden message gets to (wrongly) show up


def log_since(broker: BrokerProcess, offset: int) -> str:
    with broker.log_path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


async def collect(client: aiomqtt.Client, until_topic: str, deadline: float) -> list[str]:
    """Topics received until ``until_topic`` arrives and then ``WAIT`` more seconds."""
    seen: list[str] = []
    arrived = asyncio.Event()

    async def read() -> None:
        async for message in client.messages:
            seen.append(str(message.topic))
            if str(message.topic) == until_topic:
                arrived.set()

    task = asyncio.create_task(read())
    try:
        async with asyncio.timeout(deadline):
            await arrived.wait()
        await asyncio.sleep(WAIT)
    finally:
        task.cancel()
    return seen


async def test_broker_device_cannot_subscribe_to_another_device(
    cloud_dir: CloudDir, broker: BrokerProcess
) -> None:
    tag = uuid.uuid4().hex[:8]
    async with (
        mqtt_client(cloud_dir, "dev1", broker, identifier=f"dev1-{tag}") as dev1,
        mqtt_client(cloud_dir, "dev2", broker, identifier=f"dev2-{tag}") as dev2,
        mqtt_client(cloud_dir, "fleet", broker, identifier=f"fleet-{tag}") as fleet,
    ):
        await dev1.subscribe("state/dev2/#", qos=1)
        await dev1.subscribe("state/+/update", qos=1)
        await dev1.subscribe("#", qos=1)
        await dev1.subscribe("state/dev1/update/delta", qos=1)
        await dev2.publish("state/dev2/update", b"secret", qos=1)
        await fleet.publish("state/dev2/update/delta", b"secret", qos=1)
        # Control: dev1's own delta arrives, published after the forbidden ones.
        await fleet.publish("state/dev1/update/delta", b"control", qos=1)
        seen = await collect(dev1, "state/dev1/update/delta", deadline=10)
    assert "state/dev1/update/delta" in seen
    assert not [t for t in seen if t.startswith("state/dev2")], seen


@pytest.mark.parametrize(
    "topic",
    [
        "state/dev1/fleet/update",  # the only request that may change desired
        "state/dev1/update/accepted",  # the replica's answers, which the fleet side trusts
        "state/dev1/update/rejected",
        "state/dev1/update/delta",
        "state/dev1/update/documents",
        "state/dev1/get/accepted",
        "state/dev1/anything",
    ],
)
async def test_broker_device_writes_only_its_own_requests(
    topic: str, cloud_dir: CloudDir, broker: BrokerProcess
) -> None:
    """A device that could write these would set its own desired state (and so target itself
    with any artifact the store holds) or forge the replica's answers."""
    tag = uuid.uuid4().hex[:8]
    async with (
        mqtt_client(cloud_dir, "replica", broker, identifier=f"svc-{tag}") as service,
        mqtt_client(cloud_dir, "dev1", broker, identifier=f"dev1-{tag}") as dev1,
    ):
        await service.subscribe("state/dev1/#", qos=1)
        await dev1.publish(topic, b'{"state":{"desired":{"software":{"url":"x"}}}}', qos=1)
        await dev1.publish("state/dev1/update", b'{"state":{}}', qos=1)  # control: allowed
        seen = await collect(service, "state/dev1/update", deadline=10)
    assert seen == ["state/dev1/update"], seen


async def test_broker_device_cannot_publish_on_another_device(
    cloud_dir: CloudDir, broker: BrokerProcess
) -> None:
    tag = uuid.uuid4().hex[:8]
    async with (
        mqtt_client(cloud_dir, "replica", broker, identifier=f"svc-{tag}") as service,
        mqtt_client(cloud_dir, "dev1", broker, identifier=f"dev1-{tag}") as dev1,
    ):
        # The service sees every device's topics: it is the witness.
        await service.subscribe("state/+/update", qos=1)
        await dev1.publish("state/dev2/update", b'{"state":{"reported":{"evil":1}}}', qos=1)
        await dev1.publish("state/dev1/update", b'{"state":{}}', qos=1)
        seen = await collect(service, "state/dev1/update", deadline=10)
    assert "state/dev1/update" in seen
    assert "state/dev2/update" not in seen


async def test_broker_services_reach_every_device(
    cloud_dir: CloudDir, broker: BrokerProcess
) -> None:
    tag = uuid.uuid4().hex[:8]
    async with (
        mqtt_client(cloud_dir, "dev3", broker, identifier=f"dev3-{tag}") as dev3,
        mqtt_client(cloud_dir, "fleet", broker, identifier=f"fleet-{tag}") as fleet,
    ):
        await dev3.subscribe("state/dev3/update/delta", qos=1)
        await fleet.publish("state/dev3/update/delta", b"{}", qos=1)
        seen = await collect(dev3, "state/dev3/update/delta", deadline=10)
    assert seen == ["state/dev3/update/delta"]


async def test_broker_shared_subscription_for_the_replica(
    cloud_dir: CloudDir, broker: BrokerProcess
) -> None:
    tag = uuid.uuid4().hex[:8]
    async with (
        mqtt_client(
            cloud_dir,
            "replica",
            broker,
            identifier=f"rep-{tag}",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as replica,
        mqtt_client(cloud_dir, "dev4", broker, identifier=f"dev4-{tag}") as dev4,
    ):
        await replica.subscribe(f"$share/r{tag}/state/+/update", qos=1)
        await dev4.publish("state/dev4/update", b"{}", qos=1)
        seen = await collect(replica, "state/dev4/update", deadline=10)
    assert seen == ["state/dev4/update"]


async def test_broker_refuses_a_client_without_certificate(
    cloud_dir: CloudDir, broker: BrokerProcess
) -> None:
    before = broker.log_path.stat().st_size
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(
            broker.host, broker.port, tls_context=cloud_dir.client_context(None), timeout=2
        ):
            pass
    # Refused for the right reason, by the broker itself.
    assert "peer did not return a certificate" in log_since(broker, before)


async def test_broker_refuses_a_certificate_from_another_ca(
    cloud_dir: CloudDir, broker: BrokerProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from otad.cloud.pki import init_cloud

    other = init_cloud(tmp_path_factory.mktemp("other"), ["dev1"])
    ctx = cloud_dir.client_context(None)
    ctx.load_cert_chain(str(other.device("dev1").cert), str(other.device("dev1").key))
    before = broker.log_path.stat().st_size
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(broker.host, broker.port, tls_context=ctx, timeout=2):
            pass
    assert "certificate verify failed" in log_since(broker, before)


async def test_broker_refuses_plain_tcp(broker: BrokerProcess) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(broker.host, broker.port, timeout=2):
            pass


async def test_broker_client_rejects_a_server_it_does_not_trust(broker: BrokerProcess) -> None:
    ctx = ssl.create_default_context()  # system CAs only: our private CA is unknown
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(broker.host, broker.port, tls_context=ctx, timeout=2):
            pass


async def test_broker_restart_keeps_serving_on_the_same_port(
    cloud_dir: CloudDir, broker: BrokerProcess
) -> None:
    port = broker.port
    broker.restart()
    assert broker.port == port and broker.running
    async with mqtt_client(cloud_dir, "dev1", broker, identifier="dev1-restart") as client:
        await client.publish("state/dev1/ping", b"1", qos=1)


async def test_broker_device_in_a_well_known_share_group_takes_no_requests(
    cloud: Any, cloud_dir: CloudDir, broker: BrokerProcess
) -> None:
    """Mosquitto lets any client join a shared subscription, then drops what it hands to a
    member that may not read it. With the replica in the well-known group "otad-replica" a
    device that joined it ate half of every device's and the fleet's requests; the replica's
    group is now derived from the cloud dir's secret."""
    assert cloud.replica.filters[0].startswith("$share/otad-replica-")
    assert cloud.replica.filters[0] != "$share/otad-replica/state/+/update"
    tag = uuid.uuid4().hex[:8]
    async with mqtt_client(
        cloud_dir, "dev1", broker, identifier=f"dev1-{tag}", protocol=aiomqtt.ProtocolVersion.V5
    ) as rogue:
        for suffix in ("update", "get", "fleet/update"):
            await rogue.subscribe(f"$share/otad-replica/state/+/{suffix}", qos=1)
        # a lost request is only answered after the client's timeout and resend (seconds)
        async with asyncio.timeout(5):
            for n in range(8):
                accepted = await cloud.set_desired("dev2", {"n": n})
                assert accepted["state"]["desired"] == {"n": n}


def test_broker_replica_share_group_is_the_cloud_dirs_own(
    cloud_dir: CloudDir, tmp_path: Path
) -> None:
    config = cloud_dir.config()
    group = config.replica_share_group()
    assert group == config.replica_share_group() and group != "otad-replica"
    other = tmp_path / "other.key"
    other.write_bytes(b"x" * 64)
    assert config.with_overrides(presign_secret_file=other).replica_share_group() != group

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
    ):
        await dev1.subscribe("state/dev2/#", qos=1)
        await dev1.subscribe("state/+/update", qos=1)
        await dev1.subscribe("#", qos=1)
        await dev1.subscribe(f"state/dev1/test/{tag}", qos=1)
        await dev2.publish(f"state/dev2/update/{tag}", b"secret", qos=1)
        await dev2.publish("state/dev2/update", b"secret", qos=1)
        # Control: dev1's own topic arrives, published after the forbidden ones.
        await dev1.publish(f"state/dev1/test/{tag}", b"control", qos=1)
        seen = await collect(dev1, f"state/dev1/test/{tag}", deadline=10)
    assert f"state/dev1/test/{tag}" in seen
    assert not [t for t in seen if t.startswith("state/dev2")], seen


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

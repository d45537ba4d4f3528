"""BrokerProcess: start/stop/kill/restart, failures with the log, the AWS topic layout's ACL."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from plugins.cloud_env import free_port, mqtt_client

from otad.cloud.broker import BrokerProcess, mosquitto_path, wait_port
from otad.cloud.pki import CloudDir, init_cloud
from otad.errors import BrokerError, ConfigError


@pytest.fixture
def aws_broker(tmp_path: Path) -> Iterator[tuple[CloudDir, BrokerProcess]]:
    cloud = init_cloud(
        tmp_path / "aws",
        ["thing1", "thing2"],
        broker_port=free_port(),
        topic_template="$aws/things/{device_id}/shadow",
    )
    with BrokerProcess(cloud) as process:
        yield cloud, process


async def test_broker_process_aws_layout_acl(aws_broker: tuple[CloudDir, BrokerProcess]) -> None:
    cloud, process = aws_broker
    tag = uuid.uuid4().hex[:6]
    seen: list[str] = []
    own = "$aws/things/thing1/shadow/update/delta"
    async with (
        mqtt_client(cloud, "thing1", process, identifier=f"t1-{tag}") as thing1,
        mqtt_client(cloud, "thing2", process, identifier=f"t2-{tag}") as thing2,
        mqtt_client(cloud, "fleet", process, identifier=f"f-{tag}") as fleet,
    ):
        await thing1.subscribe("$aws/things/+/shadow/#", qos=1)
        await thing2.publish("$aws/things/thing2/shadow/update", b"{}", qos=1)
        await thing1.publish("$aws/things/thing2/shadow/update", b"{}", qos=1)
        await fleet.publish(own, b"{}", qos=1)

        async def read() -> None:
            async for message in thing1.messages:
                seen.append(str(message.topic))
                if str(message.topic) == own:
                    return

        async with asyncio.timeout(10):
            await read()
        await asyncio.sleep(0.5)
    assert seen == [own]


def test_broker_process_kill_and_start_again(tmp_path: Path) -> None:
    config_port = free_port()
    cloud = init_cloud(tmp_path / "c", ["d1"], broker_port=config_port)
    process = BrokerProcess(cloud, log_path=tmp_path / "m.log")
    process.start()
    try:
        first = process.pid
        process.kill()
        assert not process.running and not wait_port("127.0.0.1", config_port, 0.2)
        process.start()
        assert process.running and process.pid != first
        assert wait_port("127.0.0.1", config_port, 1)
    finally:
        process.stop()
    assert "mosquitto version" in process.log_tail()


def test_broker_process_reports_a_busy_port_with_the_log(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cloud = init_cloud(tmp_path / "c", [], broker_port=port)
        process = BrokerProcess(cloud)
        # Another program owns the port: never mistaken for our broker.
        with pytest.raises(BrokerError, match="already in use"):
            process.start(timeout=5)
        assert not process.running


def test_broker_process_reports_an_early_exit_with_the_log(tmp_path: Path) -> None:
    cloud = init_cloud(tmp_path / "c", [], broker_port=free_port())
    cloud.server.key.write_text("not a key\n")  # mosquitto cannot load its TLS key and exits
    process = BrokerProcess(cloud)
    with pytest.raises(BrokerError, match="exited") as info:
        process.start(timeout=10)
    assert "Error" in str(info.value)  # the tail of mosquitto's own log
    assert not process.running


def test_broker_process_names_a_missing_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cloud = init_cloud(tmp_path / "c", [])
    config = cloud.config().with_overrides(mosquitto_bin="/nonexistent/mosquitto")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="mosquitto not found"):
        mosquitto_path(config)


async def test_broker_process_stop_and_start_keeps_retained_state(
    cloud_dir: CloudDir, broker: BrokerProcess
) -> None:
    # a topic of its own, so later tests never see the retained message (no device may write
    # or read it: the fleet identity does both)
    topic = f"state/dev2/retained/{uuid.uuid4().hex[:6]}"
    async with mqtt_client(cloud_dir, "fleet", broker, identifier="fleet-retain") as client:
        await client.publish(topic, b"kept", qos=1, retain=True)
    broker.stop()
    broker.start()
    async with mqtt_client(cloud_dir, "fleet", broker, identifier="fleet-retain2") as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(10):
            message = await anext(aiter(client.messages))
    assert message.payload == b"kept"
    broker.stop()
    with pytest.raises(aiomqtt.MqttError):
        await mqtt_client(cloud_dir, "dev2", broker, identifier="dev2-x", timeout=2).__aenter__()

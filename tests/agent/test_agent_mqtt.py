"""The device's MQTT session against the real broker (TLS + ACL), with a test peer in the
replica's identity playing the replica: what is sent, re-sent, and what is ignored."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiomqtt
import pytest
from plugins.cloud_env import mqtt_client

from otad.agent.config import AgentConfig, parse
from otad.agent.mqtt import ShadowSession, merge_reported, probe_broker
from otad.errors import BrokerError


def device_config(cloud_dir: Any, broker: Any, **broker_extra: Any) -> AgentConfig:
    ident = cloud_dir.device("dev1")
    return parse(
        {
            "device_id": "dev1",
            "compatible": "x",
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "ca": str(cloud_dir.ca_cert),
                "cert": str(ident.cert),
                "key": str(ident.key),
                "report_timeout": 0.5,
                "reconnect_initial": 0.05,
                "reconnect_max": 0.5,
                **broker_extra,
            },
            "slots": {"A": {"path": "/a"}, "B": {"path": "/b"}},
        }
    )


class Peer:
    """Subscribes to dev1's requests as the replica would; answers as the test says."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.updates: list[dict[str, Any]] = []
        self.gets = 0
        self.drop_updates = 0
        self.reject_updates: list[int] = []  # codes of the next rejections, in order

    async def run(self) -> None:
        await self.client.subscribe([("state/dev1/update", 1), ("state/dev1/get", 1)])
        async for message in self.client.messages:
            body = json.loads(message.payload)
            if message.topic.value == "state/dev1/get":
                self.gets += 1
                await self.document({"state": {"desired": {}}, "version": self.gets})
                continue
            self.updates.append(body)
            if self.drop_updates:
                self.drop_updates -= 1
                continue
            if self.reject_updates:
                code = self.reject_updates.pop(0)
                await self.client.publish(
                    "state/dev1/update/rejected",
                    json.dumps({"code": code, "message": "no", "clientToken": body["clientToken"]}),
                    qos=1,
                )
                continue
            await self.client.publish(
                "state/dev1/update/accepted",
                json.dumps({"clientToken": body["clientToken"]}),
                qos=1,
            )

    async def document(self, doc: dict[str, Any]) -> None:
        await self.client.publish("state/dev1/get/accepted", json.dumps(doc), qos=1)


@pytest.fixture
async def peer(cloud_dir: Any, broker: Any) -> AsyncIterator[Peer]:
    async with mqtt_client(cloud_dir, "replica", broker, identifier="test-peer") as client:
        p = Peer(client)
        task = asyncio.create_task(p.run())
        await asyncio.sleep(0.2)
        yield p
        task.cancel()
        # after a broker restart the peer's iterator already ended with MqttError
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await task


@pytest.fixture
async def session_docs(
    cloud_dir: Any, broker: Any
) -> AsyncIterator[tuple[ShadowSession, list[Any]]]:
    docs: list[Any] = []
    session = ShadowSession(device_config(cloud_dir, broker), docs.append)
    task = asyncio.create_task(session.run())
    await asyncio.wait_for(session.connected.wait(), 30)
    yield session, docs
    assert not task.done(), "the session must never end on its own"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def eventually(check: Any, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_mqtt_merge_reported_merges_nested_and_replaces_rest() -> None:
    base = {"software": {"state": "idle", "progress": 0}, "x": [1]}
    out = merge_reported(base, {"software": {"state": "downloading"}, "x": [2]})
    assert out == {"software": {"state": "downloading", "progress": 0}, "x": [2]}
    assert base["software"]["state"] == "idle"


async def test_mqtt_gets_the_document_after_connect(peer: Peer, session_docs: Any) -> None:
    _, docs = session_docs
    await eventually(lambda: docs)
    assert peer.gets >= 1 and docs[0]["version"] >= 1


async def test_mqtt_report_is_resent_with_the_same_token_until_accepted(
    peer: Peer, session_docs: Any
) -> None:
    session, _ = session_docs
    peer.drop_updates = 2
    session.report({"software": {"state": "downloading", "progress": 5}})
    assert await session.flush(10)
    assert len(peer.updates) == 3
    tokens = {u["clientToken"] for u in peer.updates}
    assert len(tokens) == 1 and len(next(iter(tokens))) <= 64  # idempotent retries
    assert peer.updates[-1]["state"]["reported"]["software"]["progress"] == 5


async def test_mqtt_flush_is_false_when_the_report_was_rejected(
    peer: Peer, session_docs: Any
) -> None:
    session, _ = session_docs
    peer.reject_updates = [413]
    session.report({"software": {"state": "succeeded"}})
    assert not await session.flush(10)  # given up on, not accepted: never journaled as reported
    assert len(peer.updates) == 1
    session.report({"software": {"state": "succeeded"}})
    assert await session.flush(10)  # a later report that is accepted says so


async def test_mqtt_report_rejected_as_throttled_is_retried_until_accepted(
    peer: Peer, session_docs: Any
) -> None:
    session, _ = session_docs
    peer.reject_updates = [429]
    session.report({"software": {"state": "succeeded"}})
    assert await session.flush(15)
    assert len(peer.updates) == 2


async def test_mqtt_stop_is_not_lost_when_the_answer_arrives_in_the_same_instant(
    peer: Peer, cloud_dir: Any, broker: Any
) -> None:
    # The agent stops right after its final report (a reboot sends SIGTERM): the replica's
    # answer and the cancellation reach the sender in one loop iteration. asyncio.wait_for on
    # 3.11 returned the answer and dropped the cancellation; the sender waited for the next
    # report forever and the agent never stopped. The answer is delivered through the same
    # dispatch the reader uses, in the same step as the cancel, to make the instant exact.
    session = ShadowSession(device_config(cloud_dir, broker, report_timeout=30), [].append)
    task = asyncio.create_task(session.run())
    await asyncio.wait_for(session.connected.wait(), 30)
    peer.drop_updates = 1  # the report stays unanswered until the test answers it
    session.report({"software": {"state": "rebooting"}})
    await eventually(lambda: session._waiters)
    token = next(iter(session._waiters))
    answer = json.dumps({"clientToken": token}).encode()
    session._dispatch(session.topics.update_accepted, answer)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=10)
    assert task in done, "the session outlived its cancellation"
    assert task.cancelled()


async def test_mqtt_a_broker_that_never_answers_costs_no_descriptor_per_attempt(
    cloud_dir: Any,
) -> None:
    # TLS completes, CONNECT arrives, no CONNACK ever comes. aiomqtt left paho's socket and a
    # 1 Hz task behind at every timed-out attempt: 32 descriptors in 6 s before the fix.
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(silent, "127.0.0.1", 0, ssl=cloud_dir.server_context())
    port = server.sockets[0].getsockname()[1]
    config = device_config(
        cloud_dir,
        SimpleNamespace(host="127.0.0.1", port=port),
        connect_timeout=0.3,
        reconnect_max=0.1,
    )
    session = ShadowSession(config, [].append)

    def open_descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_descriptors()
    task = asyncio.create_task(session.run())
    try:
        await eventually(lambda: len(accepted) >= 8, within=20)
        servicing = [t for t in asyncio.all_tasks() if "_misc_loop" in repr(t.get_coro())]
        # the attempt in flight holds one client socket (and the server its end): no more
        assert open_descriptors() - before <= 4, open_descriptors() - before
        assert len(servicing) <= 1
        assert not session.connected.is_set()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()
        for writer in accepted:
            writer.close()
        await server.wait_closed()


async def relay(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy one direction of a proxied connection until it ends, then close the other side."""
    with contextlib.suppress(OSError):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    dst.close()


async def test_mqtt_a_stop_during_the_connect_leaves_no_connection_behind(
    cloud_dir: Any, broker: Any
) -> None:
    # paho connects in an executor thread. A session cancelled while that thread is still in
    # the TLS handshake (the agent stops during a reconnect) got its socket opened and
    # registered afterwards, by the thread: before the fix each such stop left a connection,
    # its 1 Hz task and an unretrieved "Unexpected disconnection" error behind.
    accepted = asyncio.Event()
    pipes: list[asyncio.Task[None]] = []

    async def slow_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await asyncio.sleep(0.5)  # the client's connect thread waits in the TLS handshake
        up_reader, up_writer = await asyncio.open_connection(broker.host, broker.port)
        pipes.extend(
            [
                asyncio.create_task(relay(reader, up_writer)),
                asyncio.create_task(relay(up_reader, writer)),
            ]
        )

    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    server = await asyncio.start_server(slow_proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = device_config(cloud_dir, SimpleNamespace(host="127.0.0.1", port=port))
    before = len(os.listdir("/proc/self/fd"))
    try:
        for _ in range(3):
            accepted.clear()
            task = asyncio.create_task(ShadowSession(config, [].append).run())
            await asyncio.wait_for(accepted.wait(), 10)
            await asyncio.sleep(0.1)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # once each connect thread is done the connection is closed, and the proxy's ends
        await eventually(lambda: len(pipes) == 6 and all(p.done() for p in pipes))
        await eventually(lambda: len(os.listdir("/proc/self/fd")) == before)
        assert not [t for t in asyncio.all_tasks() if "_misc_loop" in repr(t.get_coro())]
        gc.collect()  # an unretrieved future error is reported when the future is collected
        await asyncio.sleep(0)
        assert not errors, errors
    finally:
        loop.set_exception_handler(None)
        server.close()
        await server.wait_closed()


async def test_mqtt_a_client_entered_again_after_a_failed_connect_connects(
    cloud_dir: Any, broker: Any
) -> None:
    # aiomqtt clients are reusable: the guard of a failed attempt must not close the socket
    # of the next one
    from otad.agent.mqtt import broker_tls_context
    from otad.mqtt_connect import Connected

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there yet: connection refused
    config = device_config(cloud_dir, SimpleNamespace(host="127.0.0.1", port=port))
    client = aiomqtt.Client(
        "127.0.0.1", port, identifier="dev1", tls_context=broker_tls_context(config), timeout=5
    )
    with pytest.raises(aiomqtt.MqttError):
        async with Connected(client):
            pass

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(broker.host, broker.port)

        await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer))

    server = await asyncio.start_server(forward, "127.0.0.1", port)
    try:
        async with Connected(client) as connected:
            await connected.subscribe("state/dev1/update/accepted", qos=1)
            await connected.publish("state/dev1/update", b"{}", qos=1)
    finally:
        server.close()
        await server.wait_closed()


async def test_mqtt_named_report_keeps_its_token_across_retries_and_sessions(
    peer: Peer, session_docs: Any, cloud_dir: Any, broker: Any
) -> None:
    session, _ = session_docs
    peer.drop_updates = 1
    session.report({"software": {"state": "succeeded"}}, client_token="final-abc")
    assert await session.flush(10)
    assert [u["clientToken"] for u in peer.updates] == ["final-abc", "final-abc"]
    # a report merged in after it is another update: it gets a token of its own
    session.report({"software": {"state": "succeeded"}}, client_token="final-abc")
    session.report({"software": {"progress": 100}})
    assert await session.flush(10)
    assert peer.updates[-1]["clientToken"] != "final-abc"
    # another session (a restart) sends the same named report under the same token
    other = ShadowSession(device_config(cloud_dir, broker, client_id="dev1-again"), lambda d: None)
    task = asyncio.create_task(other.run())
    try:
        other.report({"software": {"state": "succeeded"}}, client_token="final-abc")
        assert await other.flush(10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert peer.updates[-1]["clientToken"] == "final-abc"


async def test_mqtt_reports_coalesce_to_the_latest_state(peer: Peer, session_docs: Any) -> None:
    session, _ = session_docs
    peer.drop_updates = 1
    for percent in range(0, 100, 10):
        session.report({"software": {"state": "downloading", "progress": percent}})
    assert await session.flush(10)
    assert peer.updates[-1]["state"]["reported"]["software"]["progress"] == 90
    assert len(peer.updates) < 10


async def test_mqtt_ignores_garbage_oversize_and_older_documents(
    peer: Peer, session_docs: Any
) -> None:
    _, docs = session_docs
    await eventually(lambda: docs)
    seen = len(docs)
    await peer.client.publish("state/dev1/get/accepted", b"\xff not json", qos=1)
    await peer.client.publish("state/dev1/get/accepted", b"[1, 2]", qos=1)
    await peer.client.publish("state/dev1/get/accepted", b"{" + b" " * 70_000 + b"}", qos=1)
    await peer.document({"state": {}, "version": 0})  # older than what we have
    await peer.document({"state": {"desired": {"software": {}}}, "version": 100})
    await eventually(lambda: docs and docs[-1].get("version") == 100)
    assert len(docs) == seen + 1


async def test_mqtt_delta_triggers_a_fresh_get(peer: Peer, session_docs: Any) -> None:
    _, docs = session_docs
    await eventually(lambda: docs)
    gets = peer.gets
    await peer.client.publish(
        "state/dev1/update/delta", json.dumps({"state": {"software": {}}, "version": 9}), qos=1
    )
    await eventually(lambda: peer.gets > gets)


async def test_mqtt_reconnects_after_broker_restart(
    peer: Peer, broker: Any, session_docs: Any
) -> None:
    session, docs = session_docs
    await eventually(lambda: docs)
    broker.restart()
    await eventually(lambda: session.connects >= 2, within=20)
    assert session.connected.is_set()


async def test_mqtt_probe_broker(cloud_dir: Any, broker: Any, tmp_path: Path) -> None:
    await probe_broker(device_config(cloud_dir, broker), 5)
    with pytest.raises(BrokerError):
        await probe_broker(device_config(cloud_dir, broker, port=1), 2)


class _GoodbyeFails(aiomqtt.Client):
    """A real client whose DISCONNECT fails the way aiomqtt reports it when the socket is gone
    or the broker does not answer in time (``MqttError: Operation timed out``)."""

    async def __aexit__(self, *exc_info: Any) -> None:
        await super().__aexit__(*exc_info)
        raise aiomqtt.MqttError("Operation timed out")


async def test_mqtt_stop_is_not_swallowed_by_a_failing_disconnect(
    cloud_dir: Any, broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = ShadowSession(device_config(cloud_dir, broker), lambda doc: None)
    real = session._client_for

    def client_for() -> aiomqtt.Client:
        client = real()
        client.__class__ = _GoodbyeFails
        return client

    monkeypatch.setattr(session, "_client_for", client_for)
    task = asyncio.create_task(session.run())
    await asyncio.wait_for(session.connected.wait(), 30)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=10)
    assert task in done, "the session reconnected instead of stopping"
    assert task.cancelled() and session.connects == 1

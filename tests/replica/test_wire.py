"""The replica's MQTT 3.1.1 framing: packets split anywhere across reads, bad framing aborts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otad.cloud import replica
from otad.cloud.replica import ReplicaStats


class FakeTransport(asyncio.Transport):
    """Records writes; the real transport is exercised by every integration test."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.aborted = False
        self.closing = False

    def write(self, data: Any) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing or self.aborted


def publish(topic: str, payload: bytes, packet_id: int | None) -> bytes:
    body = replica._mqtt_string(topic)
    if packet_id is not None:
        body += packet_id.to_bytes(2, "big")
    return replica._packet(0x32 if packet_id is not None else 0x30, body + payload)


def make_wire() -> tuple[Any, list[Any], FakeTransport]:
    received: list[Any] = []
    wire = replica._Wire(received.extend, lambda ids: None, 8, ReplicaStats())
    transport = FakeTransport()
    wire.connection_made(transport)
    return wire, received, transport


@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(0, 300))
@settings(max_examples=60, deadline=None)
def test_wire_reassembles_packets_split_anywhere(cuts: list[int], size: int) -> None:
    async def run() -> None:
        wire, received, transport = make_wire()
        stream = (
            publish("state/dev1/update", b"x" * size, 7)
            + publish("state/dev2/get", b"", None)
            + b"\xd0\x00"  # PINGRESP
            + publish("state/dev3/update", b"y" * (size * 3), 9)
        )
        pos = 0
        for cut in cuts:
            wire.data_received(stream[pos : pos + cut])
            pos += cut
        wire.data_received(stream[pos:])
        await asyncio.sleep(0)  # writes go out once per loop iteration
        assert [(r.topic, r.payload) for r in received] == [
            ("state/dev1/update", b"x" * size),
            ("state/dev2/get", b""),
            ("state/dev3/update", b"y" * (size * 3)),
        ]
        assert bytes(transport.written) == b"\x40\x02\x00\x07" + b"\x40\x02\x00\x09"
        assert not transport.aborted

    asyncio.run(run())


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x30\xff\xff\xff\xff\x01", id="remaining_length_over_4_bytes"),
        pytest.param(b"\x10\x00", id="connect_sent_by_the_broker"),
        pytest.param(b"\xf0\x00", id="reserved_type"),
    ],
)
async def test_wire_aborts_on_bad_framing(data: bytes) -> None:
    wire, received, transport = make_wire()
    wire.data_received(data)
    assert transport.aborted and received == []


async def test_wire_keeps_a_window_of_unacknowledged_messages() -> None:
    acked: list[int] = []
    stats = ReplicaStats()
    wire = replica._Wire(lambda r: None, acked.extend, 2, stats)
    transport = FakeTransport()
    wire.connection_made(transport)
    wire.publish([replica._Outgoing(f"t/{i}", b"p", outbox_id=i + 1) for i in range(5)])
    await asyncio.sleep(0)
    assert bytes(transport.written).count(b"t/") == 2  # window of 2
    assert not wire.idle.is_set()
    for packet_id in range(1, 6):
        wire.data_received(b"\x40\x02" + packet_id.to_bytes(2, "big"))
    await asyncio.sleep(0)
    assert acked == [1, 2, 3, 4, 5] and stats.published == 5
    assert wire.idle.is_set()


async def test_wire_connection_lost_fails_waiters() -> None:
    wire, _, _ = make_wire()
    wire.connection_lost(ConnectionResetError("gone"))
    assert wire.lost.done()
    with pytest.raises(Exception, match="connection to the broker lost"):
        wire.lost.result()

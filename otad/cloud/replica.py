"""The device state replica: shadow requests in over MQTT, durable store, responses out.

One MQTT connection with the replica's service identity (mutual TLS) subscribes to the update
and get topics of every device. For the default layout the subscriptions are shared
(``$share/otad-replica/state/+/update``), so several replica processes split the load; Mosquitto
delivers nothing to shared subscriptions on ``$`` topics, so with the AWS layout
(``$aws/things/{device_id}/shadow``) the replica subscribes plainly and one process serves a
broker. The device id is taken from the topic (the broker's ACL makes sure a device can only
publish on its own topics).

For each request, in order::

    parse + validate (otad.shadow) -> apply to the stored document -> COMMIT (fsync'd, with the
    messages to publish in the outbox, same transaction) -> publish accepted / documents /
    delta (only when the delta changed) or rejected -> delete the outbox rows on PUBACK

An update is acknowledged only after it is durable: a replica killed at any instant either
never published ``accepted`` (the device retries) or has the document on disk. A crash between
the commit and the broker's PUBACK leaves the messages in the outbox; the next start publishes
them again (at least once). Bad input becomes a ``rejected`` message with the AWS status code;
nothing partial is ever stored. When more than ``max_pending`` requests wait for the disk, new
ones are rejected with 429 instead of queueing without bound. A retry of an update (same
clientToken and content, see :func:`otad.shadow.apply_update`) is answered with the same
``accepted`` again and changes nothing, so a device whose answer was lost (or not yet sent
because of a crash: the outbox sends it after the restart) does not create a second version.

Throughput: every request received until the writer thread gets to it is processed as one
unit of work (a backlog the unit takes when it runs), and the store commits everything queued
in one transaction (group commit), so one fsync covers hundreds of updates. Documents keep the
JSON text of their parts, so an update encodes only what it changed, and the messages are put
together from those texts. Publishing does not wait for each PUBACK (a window of
unacknowledged QoS 1 messages).
The replica's connection is :class:`_Wire`, a small MQTT 3.1.1 client on an asyncio protocol,
not aiomqtt: measured with the benchmark, paho (under aiomqtt) spent more CPU per update than
parsing, merging and storing it (a task + event + ``wait_for`` per aiomqtt publish, one TLS read
per header byte, one TLS record per packet, Python objects per PUBACK). _Wire parses everything
one read brings in one go and writes everything of one loop iteration in one TLS record.
:class:`ShadowClient`, with its few requests, uses aiomqtt.

:class:`ShadowClient` is the operator side (rollouts, ``otad shadow``, tests): it publishes to a
device's update/get topic with the fleet identity and awaits the accepted/rejected answer that
echoes its clientToken.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import aiomqtt
import structlog

from otad import shadow
from otad.cloud.db import OutboxMessage, ShadowStore, Transaction
from otad.errors import (
    BrokerError,
    ShadowError,
    ShadowForbidden,
    ShadowInternal,
    ShadowThrottled,
)
from otad.mqtt_connect import enter
from otad.shadow import JsonObject, Topics

__layer__ = "service"

log = structlog.get_logger(__name__)

SHARE_GROUP = "otad-replica"


@dataclass(frozen=True)
class BrokerSettings:
    """Where and as whom to connect."""

    host: str
    port: int
    tls_context: ssl.SSLContext | None
    identifier: str | None = None
    keepalive: int = 30
    # Replica only: keep the MQTT session (clean session off) under ``identifier``, so the broker
    # queues requests while this replica is down. With a shared subscription a persistent member
    # that is down still gets its share queued, so use it for a replica that comes back.
    persistent: bool = False


@dataclass
class ReplicaStats:
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    gets: int = 0
    published: int = 0
    republished: int = 0
    throttled: int = 0
    replayed: int = 0  # retries answered with the accepted of an update already applied


# NamedTuples, not frozen dataclasses: several of these are made per update, and a frozen
# dataclass costs about 2 us to construct.
class _Outgoing(NamedTuple):
    topic: str
    payload: bytes
    outbox_id: int = 0  # 0: not in the outbox (rejections, get answers)
    qos: int = 1


class _Request(NamedTuple):
    topic: str
    payload: bytes


@dataclass
class _Unit:
    """The requests one unit of work took from the backlog (set on the writer thread)."""

    requests: list[_Request] = field(default_factory=list)
    now: int = 0


# --- request processing (runs inside a store transaction, on the writer thread) ----------------


class _Route(NamedTuple):
    """A request topic parsed, with the topics of its answers."""

    device_id: str
    kind: shadow.RequestKind
    accepted: str
    rejected: str
    delta: str
    documents: str


@functools.lru_cache(maxsize=65536)
def _route(topic: str, template: str) -> _Route:
    """Cached: a fleet's topics repeat, so each is parsed once (ShadowError if not a request)."""
    device_id, kind = shadow.parse_request_topic(topic, template)
    topics = Topics(device_id, template)
    return _Route(
        device_id,
        kind,
        topics.accepted(kind),
        topics.rejected(kind),
        topics.update_delta,
        topics.update_documents,
    )


def process_request(
    txn: Transaction,
    template: str,
    topic: str,
    payload: bytes,
    now: int,
    durable: list[OutboxMessage] | None = None,
) -> tuple[list[_Outgoing], str]:
    """Apply one request; return the messages to publish and the outcome for the stats.

    Everything that can fail is computed before the first write, so a rejected request writes
    nothing and an accepted one writes the document and its outbox messages together. With
    ``durable``, the outbox messages are appended there for the caller to store (one outbox
    row for many requests: see _process_batch) and the accepted message's ``outbox_id`` is left
    0 for the caller to set; without, this request gets an outbox row of its own.
    """
    try:
        route = _route(topic, template)
    except ShadowError:
        return [], "ignored"  # not a request topic: our filters never deliver one
    device_id = route.device_id
    try:
        if route.kind == "get":
            request = shadow.parse_get(payload)
            body = shadow.get_payload(txn.load(device_id), request, device_id)
            return [_Outgoing(route.accepted, body)], "get"
        update = shadow.parse_update(payload)
        if route.kind == "update" and update.desired is not shadow.ABSENT:
            # the device's own topic: the broker cannot tell its writer from ours, and a
            # device that set its own desired state would target itself with any artifact
            raise ShadowForbidden(
                "shadow: desired can only be set on the fleet side's topic "
                f"({Topics(device_id, template).fleet_update})"
            )
        outcome = shadow.apply_update(txn.load(device_id), update, now)
    except ShadowError as exc:
        if not exc.details.get("client_token"):
            exc.details["client_token"] = shadow.client_token_of(payload)
        body = shadow.encode(shadow.rejected_document(exc, now))
        return [_Outgoing(route.rejected, body)], "rejected"
    if outcome.replayed or outcome.documents_payload is None:
        # A retry of an update already durable (its first accepted was lost or is still in
        # flight): the same accepted again, nothing stored, no delta or documents.
        return [_Outgoing(route.accepted, outcome.accepted_payload)], "replayed"
    # Order: delta, documents, accepted. The accepted goes last: it acknowledges the update and
    # its PUBACK marks the whole outbox row done. ``documents`` is a notification for observers:
    # QoS 0 (one PUBACK fewer per update) and not in the outbox (it is the largest message, and
    # rows that big cost SQLite overflow pages: about 20 us more per update, measured). After a
    # crash, observers read the current document with `get`.
    txn.save(device_id, outcome.document)
    accepted = OutboxMessage(route.accepted, outcome.accepted_payload)
    documents = _Outgoing(route.documents, outcome.documents_payload, 0, 0)
    delta = None
    if outcome.delta_payload is not None:
        delta = OutboxMessage(route.delta, outcome.delta_payload)
    stored = (accepted,) if delta is None else (delta, accepted)
    row = 0
    if durable is None:
        row = txn.add_outbox(stored)
    else:
        durable.extend(stored)
    last = _Outgoing(accepted.topic, accepted.payload, row)
    if delta is None:
        return [documents, last], "accepted"
    return [_Outgoing(delta.topic, delta.payload), documents, last], "accepted"


def _outgoing(stored: Sequence[OutboxMessage]) -> list[_Outgoing]:
    """Outbox messages to publish; each row is done when its last message is acknowledged."""
    out = []
    for i, m in enumerate(stored):
        last_of_row = i + 1 == len(stored) or stored[i + 1].id != m.id
        out.append(_Outgoing(m.topic, m.payload, m.id if last_of_row else 0, m.qos))
    return out


def _process_batch(
    txn: Transaction, template: str, requests: Sequence[_Request], now: int
) -> list[tuple[list[_Outgoing], str]]:
    """Process a unit's requests; their outbox messages go into ONE outbox row.

    The row is done when its last message (the last accepted of the unit, published last)
    is acknowledged; a crash before that publishes all of them again (at least once). One
    row per unit instead of per update: one insert and one delete instead of hundreds.
    """
    out: list[tuple[list[_Outgoing], str]] = []
    durable: list[OutboxMessage] = []
    last = -1  # the result that holds the unit's last durable message (its accepted, last)
    for request in requests:
        try:
            result = process_request(txn, template, request.topic, request.payload, now, durable)
        except ShadowError:
            raise  # a store failure (500 for the whole batch, handled by the caller)
        except Exception as exc:  # a bug must not take the other requests of the batch down
            log.exception("request_failed", topic=request.topic, error=str(exc))
            error = ShadowInternal(
                "replica: internal error", client_token=shadow.client_token_of(request.payload)
            )
            result = _rejection(template, request.topic, error, now)
        if result[1] == "accepted":
            last = len(out)
        out.append(result)
    if durable:
        row = txn.add_outbox(durable)
        messages = out[last][0]
        messages[-1] = messages[-1]._replace(outbox_id=row)
    return out


def _rejection(
    template: str, topic: str, error: ShadowError, now: int
) -> tuple[list[_Outgoing], str]:
    try:
        device_id, kind = shadow.parse_request_topic(topic, template)
    except ShadowError:
        return [], "ignored"
    target = Topics(device_id, template).rejected(kind)
    return [_Outgoing(target, shadow.encode(shadow.rejected_document(error, now)))], "rejected"


# --- the MQTT hot path -------------------------------------------------------------------------


def _remaining_length(n: int) -> bytes:
    if n < 0x80:
        return _SHORT_LENGTHS[n]
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


_SHORT_LENGTHS: Final = [bytes((n,)) for n in range(0x80)]


@functools.lru_cache(maxsize=65536)
def _topic_field(topic: str) -> bytes:
    """A topic as a PUBLISH carries it; cached, because a fleet's response topics repeat."""
    return _mqtt_string(topic)


def _mqtt_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _remaining_length(len(body)) + body


_HANDSHAKE_SECONDS = 30.0
_PINGREQ = b"\xc0\x00"
_DISCONNECT = b"\xe0\x00"
_CONNACK_ERRORS = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


class _Wire(asyncio.Protocol):
    """A minimal MQTT 3.1.1 client for the replica's hot path (see the module docstring).

    It does exactly what the replica needs: CONNECT (clean or persistent session), SUBSCRIBE
    at QoS 0 or 1, receive PUBLISH at QoS 0/1 (PUBACK sent at once), publish at QoS 0/1 keeping
    at most
    ``window`` QoS 1 messages unacknowledged, PINGREQ for keepalive. Everything received in one
    read is parsed in one go and handed over as one batch; everything written in one loop
    iteration goes out in one ``transport.write`` (one TLS record for many packets).
    """

    def __init__(
        self,
        on_messages: Callable[[list[_Request]], None],
        on_acked: Callable[[list[int]], None],
        window: int,
        stats: ReplicaStats,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_messages = on_messages
        self._on_acked = on_acked
        self._window = window
        self._stats = stats
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._paused = False
        self._next_id = 0
        self._unacked: dict[int, int] = {}  # packet id -> outbox id (0: not in the outbox)
        self._queue: collections.deque[_Outgoing] = collections.deque()
        self._acked: list[int] = []
        self._connack: asyncio.Future[int] = self._loop.create_future()
        self._subacks: dict[int, asyncio.Future[bytes]] = {}
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self.idle = asyncio.Event()  # nothing queued or unacknowledged
        self.idle.set()
        self.last_received = time.monotonic()

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        error = BrokerError(f"replica: connection to the broker lost: {exc or 'closed'}")
        futures: list[asyncio.Future[Any]] = [self.lost, self._connack, *self._subacks.values()]
        for future in futures:
            if not future.done():
                future.set_exception(error)
                # Marked retrieved: a waiter that awaits it still gets the error, and one that
                # never will (no CONNACK wanted yet) does not make asyncio log it.
                future.exception()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        buf = self._buffer
        buf += data
        pos, end = 0, len(buf)
        requests: list[_Request] = []
        acked: list[int] = []
        while end - pos >= 2:
            byte = buf[pos + 1]
            if byte < 0x80:  # the common case: a packet under 128 bytes
                length, i = byte, pos + 2
            else:  # the remaining length: 1-4 bytes, 7 bits each
                length, shift, i, complete = 0, 0, pos + 1, False
                while i < end:
                    byte = buf[i]
                    i += 1
                    length |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        complete = True
                        break
                    shift += 7
                    if shift > 21:
                        self._protocol_error("remaining length over 4 bytes")
                        return
                if not complete:
                    break  # the rest of this packet is in a later read
            stop = i + length
            if stop > end:
                break
            first = buf[pos]
            pos = stop
            kind = first >> 4
            if kind == 3:  # PUBLISH
                at = i + 2 + ((buf[i] << 8) | buf[i + 1])
                topic = buf[i + 2 : at].decode("utf-8", errors="replace")
                if first & 0x06:
                    self._write(b"\x40\x02" + buf[at : at + 2])  # PUBACK
                    at += 2
                # RETAIN set: not a request now but a stored one that the broker replays to
                # every new subscription (a device may publish its update retained): applying
                # it at each replica (re)start would repeat an old update
                if not first & 0x01:
                    requests.append(_Request(topic, bytes(buf[at:stop])))
            elif kind == 4:  # PUBACK
                acked.append((buf[i] << 8) | buf[i + 1])
            elif kind == 2:  # CONNACK
                if not self._connack.done():
                    self._connack.set_result(buf[i + 1] if length > 1 else 255)
            elif kind == 9:  # SUBACK
                future = self._subacks.pop((buf[i] << 8) | buf[i + 1], None)
                if future is not None and not future.done():
                    future.set_result(bytes(buf[i + 2 : stop]))
            elif kind != 13:  # anything but PINGRESP is not for a client like this one
                self._protocol_error(f"unexpected packet type {kind}")
                return
        del buf[:pos]
        if acked:
            self._pubacks(acked)
        if requests:
            self._on_messages(requests)

    def _protocol_error(self, what: str) -> None:
        log.error("broker_protocol_error", error=what)
        if self._transport is not None:
            self._transport.abort()

    # --- sending -----------------------------------------------------------------------------

    def _write(self, packet: bytes) -> None:
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(packet)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(out))

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._unacked and self._next_id not in self._subacks:
                return self._next_id
        raise BrokerError("replica: no free MQTT packet id")  # pragma: no cover

    async def connect(self, identifier: str, keepalive: int, *, persistent: bool) -> None:
        body = (
            _mqtt_string("MQTT")
            + bytes((4, 0x00 if persistent else 0x02))  # protocol level 3.1.1, clean session?
            + keepalive.to_bytes(2, "big")
            + _mqtt_string(identifier)
        )
        self._write(_packet(0x10, body))
        try:
            async with asyncio.timeout(_HANDSHAKE_SECONDS):
                code = await self._connack
        except TimeoutError as exc:
            raise BrokerError("replica: no CONNACK from the broker") from exc
        if code != 0:
            reason = _CONNACK_ERRORS.get(code, f"code {code}")
            raise BrokerError(f"replica: the broker refused the connection: {reason}")

    async def subscribe(self, filters: Sequence[str], qos: int) -> None:
        packet_id = self._packet_id()
        options = bytes((qos,))
        body = packet_id.to_bytes(2, "big") + b"".join(_mqtt_string(f) + options for f in filters)
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._subacks[packet_id] = future
        self._write(_packet(0x82, body))
        try:
            async with asyncio.timeout(_HANDSHAKE_SECONDS):
                codes = await future
        except TimeoutError as exc:
            raise BrokerError("replica: no SUBACK from the broker") from exc
        refused = [f for f, code in zip(filters, codes, strict=False) if code & 0x80]
        if refused or len(codes) != len(filters):
            raise BrokerError(f"replica: the broker refused the subscriptions {refused}")

    async def keepalive(self, interval: int) -> None:
        """PINGREQ every interval/2; abort when nothing came back for 1.5 intervals."""
        while self._transport is not None:
            await asyncio.sleep(interval / 2)
            if time.monotonic() - self.last_received > interval * 1.5:
                log.warning("broker_silent", seconds=interval * 1.5)
                # abort, not close: a graceful TLS close waits for a peer that does not answer.
                if self._transport is not None:
                    self._transport.abort()
                return
            self._write(_PINGREQ)

    def disconnect(self) -> None:
        self._write(_DISCONNECT)
        self._flush()
        self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def publish(self, messages: Sequence[_Outgoing]) -> None:
        """Queue messages for publishing in order; never waits."""
        self._queue.extend(messages)
        self._pump()

    def _pump(self) -> None:
        queue, unacked, window = self._queue, self._unacked, self._window
        stats = self._stats
        while queue and len(unacked) < window and not self._paused:
            if self._transport is None:
                # Not connected: the outbox keeps what matters; the next session publishes it.
                queue.clear()
                break
            message = queue.popleft()
            topic = _topic_field(message.topic)
            payload = message.payload
            if message.qos:
                packet_id = self._packet_id()
                unacked[packet_id] = message.outbox_id
                size = len(topic) + 2 + len(payload)
                self._write(
                    b"".join(
                        (b"\x32", _remaining_length(size), topic, packet_id.to_bytes(2), payload)
                    )
                )
            else:
                size = len(topic) + len(payload)
                self._write(b"".join((b"\x30", _remaining_length(size), topic, payload)))
                stats.published += 1
                if message.outbox_id:  # no PUBACK will come: done once written
                    self._ack(message.outbox_id)
        if queue or unacked:
            self.idle.clear()
        else:
            self.idle.set()

    def _pubacks(self, packet_ids: list[int]) -> None:
        """PUBACKs of one read: close their outbox rows, then refill the window once."""
        unacked, stats = self._unacked, self._stats
        for packet_id in packet_ids:
            outbox_id = unacked.pop(packet_id, None)
            if outbox_id is None:
                continue
            stats.published += 1
            if outbox_id:
                self._ack(outbox_id)
        self._pump()

    def _ack(self, outbox_id: int) -> None:
        if not self._acked:
            self._loop.call_soon(self._flush_acked)
        self._acked.append(outbox_id)

    def _flush_acked(self) -> None:
        batch, self._acked = self._acked, []
        self._on_acked(batch)


# --- the service -------------------------------------------------------------------------------


class Replica:
    """The replica service. ``await replica.run(stop)`` serves until ``stop`` is set.

    It reconnects to the broker with backoff when the connection is lost; the outbox is
    published again on every (re)connect. ``ready`` is set once the subscriptions are active.
    """

    def __init__(
        self,
        store: ShadowStore,
        broker: BrokerSettings,
        *,
        template: str = shadow.DEFAULT_TEMPLATE,
        share_group: str | None = SHARE_GROUP,
        max_pending: int = 20_000,
        window: int = 32,
        clock: Callable[[], float] = time.time,
        fault: Callable[[str], None] | None = None,
    ) -> None:
        """``fault`` is a fault-injection hook for crash tests, called at named points:
        ``"received"`` (requests read, nothing stored yet) and ``"committed"`` (durable, nothing
        published yet). A test's hook SIGKILLs the process there; production passes None.
        """
        self.store = store
        self.broker = broker
        self.template = shadow.check_template(template)
        self.filters = shadow.request_filters(template, share_group)
        self.max_pending = max_pending
        self.window = window
        self.clock = clock
        self._fault = fault
        self.ready = asyncio.Event()
        self.stats = ReplicaStats()
        self._pending = 0
        # Requests received and not yet taken by a unit of work (see _process_backlog); the
        # writer thread takes them, hence the lock.
        self._backlog: list[_Request] = []
        self._backlog_lock = threading.Lock()
        self._unit_queued = False
        self._wire: _Wire | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._served = False

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        backoff = 0.2
        while not stop.is_set():
            try:
                await self._session(stop)
                return
            except BrokerError as exc:
                if self._served:  # the session worked: start the backoff from the beginning
                    backoff, self._served = 0.2, False
                self.ready.clear()
                log.warning("broker_connection_lost", error=str(exc), retry_in=backoff)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await stop.wait()
            backoff = min(backoff * 2, 10.0)

    async def _session(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        settings = self.broker
        wire = _Wire(self._received, self._acked, self.window, self.stats)
        try:
            async with asyncio.timeout(30):
                await loop.create_connection(
                    lambda: wire,
                    settings.host,
                    settings.port,
                    ssl=settings.tls_context,
                    server_hostname=settings.host if settings.tls_context else None,
                )
        except (OSError, TimeoutError) as exc:
            raise BrokerError(
                f"replica: cannot connect to {settings.host}:{settings.port}: {exc}"
            ) from exc
        keepalive: asyncio.Task[None] | None = None
        try:
            if settings.persistent and not settings.identifier:
                raise BrokerError("replica: a persistent session needs an identifier")
            identifier = settings.identifier or f"otad-replica-{uuid.uuid4().hex[:12]}"
            await wire.connect(identifier, settings.keepalive, persistent=settings.persistent)
            self._wire = wire
            await self._republish_outbox()
            # QoS 1 between the broker and the replica only matters for a persistent session
            # (the broker keeps QoS 1 requests for it while it is down). With a clean session
            # nothing survives a lost connection whatever the QoS, and the replica acknowledged
            # on receipt anyway, so QoS 0 saves a PUBACK per request on both ends and lifts
            # the broker's in-flight window (100 messages) off the request stream.
            await wire.subscribe(self.filters, 1 if settings.persistent else 0)
            keepalive = asyncio.create_task(wire.keepalive(settings.keepalive))
            self.ready.set()
            self._served = True
            log.info("replica_serving", filters=self.filters, template=self.template)
            stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
            lost: asyncio.Future[Any] = wire.lost
            try:
                await asyncio.wait({lost, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
            if wire.lost.done():
                wire.lost.result()  # raises the BrokerError that ended the connection
            await self._quiesce()
            wire.disconnect()
        finally:
            if keepalive is not None:
                keepalive.cancel()
            self._wire = None
            self.ready.clear()
            wire.close()

    async def _quiesce(self) -> None:
        """On stop: let committed batches publish before the connection closes (5 s at most)."""
        deadline = time.monotonic() + 5.0
        while self._tasks and time.monotonic() < deadline:
            await asyncio.wait(set(self._tasks), timeout=deadline - time.monotonic())
        # Then the PUBACKs, so the outbox is empty after a clean stop.
        if self._wire is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._wire.idle.wait()

    async def _republish_outbox(self) -> None:
        pending = await self.store.outbox_pending()
        if not pending or self._wire is None:
            return
        self._wire.publish(_outgoing(pending))
        self.stats.republished += len(pending)
        log.info("outbox_republished", messages=len(pending))

    # --- hot path callbacks (event loop thread) ----------------------------------------------

    def _received(self, requests: list[_Request]) -> None:
        self.stats.received += len(requests)
        room = self.max_pending - self._pending
        if room < len(requests):
            throttled, requests = requests[max(room, 0) :], requests[: max(room, 0)]
            self._throttle(throttled)
        if not requests:
            return
        if self._fault is not None:
            self._fault("received")
        self._pending += len(requests)
        with self._backlog_lock:
            self._backlog.extend(requests)
            if self._unit_queued:
                return  # the unit waiting for the writer takes these too
            self._unit_queued = True
        unit = _Unit()
        try:
            future = self.store.submit(functools.partial(self._process_backlog, unit))
        except ShadowError as exc:
            with self._backlog_lock:
                unit.requests, self._backlog = self._backlog, []
                self._unit_queued = False
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        self._tasks.add(future)
        future.add_done_callback(functools.partial(self._committed, unit))

    def _process_backlog(self, unit: _Unit, txn: Transaction) -> list[tuple[list[_Outgoing], str]]:
        """The unit of work (writer thread): every request received until the writer got to it.

        Requests that arrive while a unit waits in the store's queue join it instead of making
        units of their own: per unit there is a SAVEPOINT, two executemany calls, a future and a
        callback, which measured as a large share of the work when a read brings few requests.
        """
        with self._backlog_lock:
            unit.requests, self._backlog = self._backlog, []
            self._unit_queued = False
        unit.now = int(self.clock())
        return _process_batch(txn, self.template, unit.requests, unit.now)

    def _committed(
        self, unit: _Unit, future: asyncio.Future[list[tuple[list[_Outgoing], str]]]
    ) -> None:
        self._tasks.discard(future)
        requests = unit.requests
        self._pending -= len(requests)
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            failure = (
                error
                if isinstance(error, ShadowError)
                else ShadowInternal(f"replica: store failed: {error}")
            )
            log.error("batch_failed", requests=len(requests), error=str(failure))
            now = unit.now or int(self.clock())
            results = [
                _rejection(
                    self.template,
                    r.topic,
                    ShadowInternal(failure.message, client_token=shadow.client_token_of(r.payload)),
                    now,
                )
                for r in requests
            ]
        else:
            results = future.result()
            if self._fault is not None:
                self._fault("committed")
        outgoing: list[_Outgoing] = []
        stats = self.stats
        for messages, outcome in results:
            outgoing.extend(messages)
            if outcome == "accepted":
                stats.accepted += 1
            elif outcome == "rejected":
                stats.rejected += 1
            elif outcome == "get":
                stats.gets += 1
            elif outcome == "replayed":
                stats.replayed += 1
        if self._wire is not None:
            self._wire.publish(outgoing)

    def _throttle(self, requests: list[_Request]) -> None:
        now = int(self.clock())
        self.stats.throttled += len(requests)
        outgoing: list[_Outgoing] = []
        for r in requests:
            error = ShadowThrottled(
                "replica: too many requests in flight; retry later",
                client_token=shadow.client_token_of(r.payload),
            )
            outgoing.extend(_rejection(self.template, r.topic, error, now)[0])
        if self._wire is not None:
            self._wire.publish(outgoing)

    def _acked(self, outbox_ids: list[int]) -> None:
        self.store.outbox_done(outbox_ids)


# --- the operator side -------------------------------------------------------------------------


@dataclass
class _Waiter:
    future: asyncio.Future[JsonObject]
    accepted: str
    rejected: str


@dataclass
class ShadowClient:
    """Request/response on device shadows with a service identity (fleet, CLI, tests).

    ::

        async with ShadowClient(BrokerSettings(host, port, tls)) as shadows:
            accepted = await shadows.update("dev1", desired={"software": {...}})
            document = await shadows.get("dev1")    # ShadowNotFound if never written

    Answers are matched by clientToken; a rejection raises the ShadowError of its code.
    Several requests may be in flight at once, from several tasks.
    """

    broker: BrokerSettings
    template: str = shadow.DEFAULT_TEMPLATE
    timeout: float = 10.0
    _client: aiomqtt.Client | None = field(default=None, init=False)
    _waiters: dict[str, _Waiter] = field(default_factory=dict, init=False)
    _reader: asyncio.Task[None] | None = field(default=None, init=False)

    async def __aenter__(self) -> ShadowClient:
        shadow.check_template(self.template)
        client = aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            identifier=self.broker.identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=self.broker.tls_context,
            keepalive=self.broker.keepalive,
            timeout=self.timeout,
        )
        try:
            await enter(client)
        except aiomqtt.MqttError as exc:
            raise BrokerError(
                f"shadow client: cannot connect to {self.broker.host}:{self.broker.port}: {exc}"
            ) from exc
        self._client = client
        wildcard = self.template.replace("{device_id}", "+")
        try:
            for suffix in ("update/accepted", "update/rejected", "get/accepted", "get/rejected"):
                await client.subscribe(f"{wildcard}/{suffix}", qos=1)
        except aiomqtt.MqttError as exc:
            await self.__aexit__(None, None, None)
            raise BrokerError(f"shadow client: cannot subscribe: {exc}") from exc
        self._reader = asyncio.create_task(self._read(client), name="shadow-client-reader")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
            self._reader = None
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_exception(BrokerError("shadow client: closed"))
        self._waiters.clear()

    async def _read(self, client: aiomqtt.Client) -> None:
        try:
            async for message in client.messages:
                self._answer(str(message.topic), message.payload)
        except aiomqtt.MqttError as exc:
            for waiter in self._waiters.values():
                if not waiter.future.done():
                    waiter.future.set_exception(
                        BrokerError(f"shadow client: connection lost: {exc}")
                    )

    def _answer(self, topic: str, payload: Any) -> None:
        try:
            body = shadow.parse_json_object(bytes(payload))
        except ShadowError:
            return
        token = body.get("clientToken")
        waiter = self._waiters.get(token) if isinstance(token, str) else None
        if waiter is None or waiter.future.done():
            return
        if topic == waiter.accepted:
            waiter.future.set_result(body)
        elif topic == waiter.rejected:
            waiter.future.set_exception(shadow.error_from_rejected(body))

    async def _request(
        self, topics: Topics, kind: shadow.RequestKind, token: str, raw: bytes
    ) -> JsonObject:
        client = self._client
        if client is None:
            raise BrokerError("shadow client: not connected (use `async with`)")
        future: asyncio.Future[JsonObject] = asyncio.get_running_loop().create_future()
        self._waiters[token] = _Waiter(future, topics.accepted(kind), topics.rejected(kind))
        topic = topics.request(kind)
        try:
            try:
                await client.publish(topic, raw, qos=1)
            except aiomqtt.MqttError as exc:
                raise BrokerError(f"shadow client: cannot publish to {topic}: {exc}") from exc
            try:
                async with asyncio.timeout(self.timeout):
                    return await future
            except TimeoutError as exc:
                raise BrokerError(
                    f"shadow client: no answer from the replica for {topics.device_id} "
                    f"within {self.timeout} s"
                ) from exc
        finally:
            self._waiters.pop(token, None)

    async def get(self, device_id: str) -> JsonObject:
        """The full document (``get/accepted`` payload) of a device."""
        token = uuid.uuid4().hex
        raw = shadow.encode({"clientToken": token})
        return await self._request(Topics(device_id, self.template), "get", token, raw)

    async def update(
        self,
        device_id: str,
        *,
        desired: JsonObject | shadow.Absent | None = shadow.ABSENT,
        reported: JsonObject | shadow.Absent | None = shadow.ABSENT,
        version: int | None = None,
    ) -> JsonObject:
        """Merge into the shadow; return the ``update/accepted`` payload once durable."""
        topics = Topics(device_id, self.template)
        token = uuid.uuid4().hex
        request = shadow.UpdateRequest(desired, reported, version, token)
        # Checked locally first: the same rules the replica applies, with a clearer error.
        raw = request.encode()
        return await self._request(topics, "fleet_update", token, raw)

    async def update_desired(self, device_id: str, desired: JsonObject) -> JsonObject:
        """Shorthand used by rollouts: merge ``desired`` into the device's desired state."""
        return await self.update(device_id, desired=desired)

"""The device's MQTT shadow session: mTLS, its own topics, reconnect, acknowledged reports.

This is the only module that imports aiomqtt (2.x; 3.0 changes the API). It knows nothing of
slots or bundles: it hands every full shadow document to a callback and sends reported state.

- After every (re)connect it subscribes, then publishes a ``get`` and acts on the full document:
  deltas missed while offline are never replayed by the broker (clean session), and a delta is
  only a hint to fetch the document again (it may be partial, stale or replayed).
- Documents older than the newest one seen (lower shadow ``version``) are ignored.
- Reports are merged into one pending reported state and published with a ``clientToken``; the
  same token is re-sent until ``update/accepted`` echoes it, so a retry is idempotent.
- Reconnects back off with jitter between ``broker.reconnect_initial`` and ``reconnect_max``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import aiomqtt
import structlog

from otad.agent.config import AgentConfig
from otad.agent.download import backoff_delay
from otad.errors import BrokerError
from otad.mqtt_connect import Connected
from otad.shadow import Topics

__layer__ = "adapter"

log = structlog.get_logger(__name__)

MAX_PAYLOAD = 64 * 1024  # a shadow document is at most 8 KiB; anything far larger is hostile
# how long a stopping agent waits for its DISCONNECT to go out before it drops the connection
DISCONNECT_TIMEOUT = 2.0
DocumentHandler = Callable[[dict[str, Any]], None]


def merge_reported(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into ``base`` like the shadow does (nested dicts merge, rest replaces)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge_reported(out[key], value)
        else:
            out[key] = value
    return out


def broker_tls_context(config: AgentConfig) -> ssl.SSLContext | None:
    """The client context for the broker (None: plain TCP, no CA or certificate configured)."""
    broker = config.broker
    if broker.ca is None and broker.cert is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(broker.ca) if broker.ca else None)
        if broker.cert is not None and broker.key is not None:
            ctx.load_cert_chain(str(broker.cert), str(broker.key))
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(f"mqtt: cannot load TLS material: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class ShadowSession:
    """A long-lived connection to the broker for one device's shadow."""

    def __init__(
        self,
        config: AgentConfig,
        on_document: DocumentHandler,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tls``: a context made by :func:`broker_tls_context` to share (else made here)."""
        self.config = config
        self.topics = Topics(device_id=config.device_id, template=config.broker.topic_template)
        self._on_document = on_document
        self._tls = tls if tls is not None else broker_tls_context(config)
        self.connected = asyncio.Event()
        self.connects = 0
        self._client: aiomqtt.Client | None = None
        self._pending: dict[str, Any] | None = None
        self._seq = 0  # bumped by every report()
        self._acked = 0  # highest seq known to be accepted (or given up on)
        self._rejected = 0  # highest seq given up on because the replica rejected it
        self._named: tuple[int, str] | None = None  # (seq, clientToken) the caller chose
        self._changed = asyncio.Event()
        self._acked_cond = asyncio.Condition()
        self._waiters: dict[str, asyncio.Future[tuple[bool, dict[str, Any]]]] = {}
        self._get_needed = asyncio.Event()
        self._doc_version = -1
        # unique per session, also across reboots (a pid repeats): the replica answers a token
        # it has applied (with unchanged content) from memory instead of applying it again
        self._token_prefix = f"{config.device_id[:32]}-{secrets.token_hex(6)}"
        self._tokens = itertools.count(1)

    # --- reports -------------------------------------------------------------------------------

    def report(self, reported: Mapping[str, Any], *, client_token: str | None = None) -> int:
        """Queue ``reported`` (merged with anything not yet sent); returns its sequence number.

        ``client_token`` names this report for the replica (the same token in another process
        is the same update); without one, or once a later report is merged in, the session
        makes one up."""
        self._pending = merge_reported(self._pending or {}, reported)
        self._seq += 1
        self._named = (self._seq, client_token) if client_token else None
        self._changed.set()
        return self._seq

    async def flush(self, within: float) -> bool:
        """Wait until every report queued so far was answered; True only if it was accepted.

        False on timeout, and when the replica rejected the latest report for good (so that a
        final state is not journaled as delivered when it was not)."""
        target = self._seq

        async def done() -> None:
            async with self._acked_cond:
                await self._acked_cond.wait_for(lambda: self._acked >= target)

        try:
            async with asyncio.timeout(within):
                await done()
        except TimeoutError:
            return False
        return self._rejected < target

    async def _mark_acked(self, seq: int) -> None:
        async with self._acked_cond:
            self._acked = max(self._acked, seq)
            if self._acked >= self._seq:
                self._pending = None
            self._acked_cond.notify_all()

    async def _sender(self, client: aiomqtt.Client) -> None:
        """Publish the pending report until it is accepted; survives only one connection."""
        token: str | None = None
        sent_seq = 0
        while True:
            if self._pending is None or self._acked >= self._seq:
                self._changed.clear()
                await self._changed.wait()
                continue
            if token is None or sent_seq != self._seq:
                sent_seq = self._seq
                named = self._named
                if named is not None and named[0] == sent_seq:
                    token = named[1]
                else:
                    token = f"{self._token_prefix}-{next(self._tokens)}"
            snapshot = self._pending
            future: asyncio.Future[tuple[bool, dict[str, Any]]] = (
                asyncio.get_running_loop().create_future()
            )
            self._waiters[token] = future
            try:
                payload = json.dumps({"state": {"reported": snapshot}, "clientToken": token})
                await client.publish(self.topics.update, payload, qos=1)
                try:
                    async with asyncio.timeout(self.config.broker.report_timeout):
                        accepted, body = await future
                except TimeoutError:
                    log.warning("report_unanswered", client_token=token)
                    continue  # same token again: the replica treats it as the same update
            finally:
                self._waiters.pop(token, None)
            if accepted:
                log.debug("report_accepted", client_token=token)
                await self._mark_acked(sent_seq)
                token = None
                continue
            code = body.get("code")
            log.error("report_rejected", client_token=token, code=code, reason=body.get("message"))
            if code in (429, 500, 503):
                await asyncio.sleep(backoff_delay(2, 1.0, 10.0))
                token = None
                continue
            # A rejected report will not become acceptable by resending it: give up on it.
            self._rejected = max(self._rejected, sent_seq)
            await self._mark_acked(sent_seq)
            token = None

    # --- documents -----------------------------------------------------------------------------

    def request_document(self) -> None:
        """Ask for the full document (done after every connect and on every delta)."""
        self._get_needed.set()

    async def _getter(self, client: aiomqtt.Client) -> None:
        while True:
            await self._get_needed.wait()
            self._get_needed.clear()
            token = f"{self._token_prefix}-get-{next(self._tokens)}"
            await client.publish(self.topics.get, json.dumps({"clientToken": token}), qos=1)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if len(payload) > MAX_PAYLOAD:
            log.warning("message_dropped", topic=topic, reason="oversize", size=len(payload))
            return
        try:
            body = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            log.warning("message_dropped", topic=topic, reason="not json")
            return
        if not isinstance(body, dict):
            log.warning("message_dropped", topic=topic, reason="not an object")
            return
        t = self.topics
        if topic == t.update_delta:
            log.info("delta_received", version=body.get("version"))
            self.request_document()
        elif topic == t.get_accepted:
            version = body.get("version")
            if isinstance(version, int) and not isinstance(version, bool):
                if version < self._doc_version:
                    log.warning("document_ignored", version=version, newest=self._doc_version)
                    return
                self._doc_version = version
            self._on_document(body)
        elif topic == t.get_rejected:
            code = body.get("code")
            if code == 404:
                # No shadow yet: nothing is desired.
                self._on_document({"state": {}, "version": 0})
            else:
                log.warning("get_rejected", code=code, reason=body.get("message"))
        elif topic in (t.update_accepted, t.update_rejected):
            token = body.get("clientToken")
            future = self._waiters.get(token) if isinstance(token, str) else None
            if future is not None and not future.done():
                future.set_result((topic == t.update_accepted, body))

    # --- connection ----------------------------------------------------------------------------

    def _client_for(self) -> aiomqtt.Client:
        broker = self.config.broker
        return aiomqtt.Client(
            broker.host,
            broker.port,
            identifier=broker.client_id or self.config.device_id,
            keepalive=broker.keepalive,
            tls_context=self._tls,
            clean_session=True,
            timeout=broker.connect_timeout,
        )

    async def run(self) -> None:
        """Stay connected until cancelled; reconnect with bounded jittered backoff."""
        broker = self.config.broker
        attempt = 0
        topics = [
            self.topics.update_delta,
            self.topics.update_accepted,
            self.topics.update_rejected,
            self.topics.get_accepted,
            self.topics.get_rejected,
        ]
        while True:
            delay = broker.reconnect_initial
            try:
                async with Connected(self._client_for()) as client:
                    await client.subscribe([(topic, 1) for topic in topics])
                    attempt = 0
                    self.connects += 1
                    self._client = client
                    self.connected.set()
                    log.info("broker_connected", host=broker.host, port=broker.port)
                    self.request_document()
                    helpers = [
                        asyncio.create_task(self._sender(client), name="mqtt-sender"),
                        asyncio.create_task(self._getter(client), name="mqtt-getter"),
                    ]
                    try:
                        reader = asyncio.create_task(self._reader(client), name="mqtt-reader")
                        done, _ = await asyncio.wait(
                            [reader, *helpers], return_when=asyncio.FIRST_COMPLETED
                        )
                        for task in done:
                            task.result()  # re-raise the MqttError that ended the connection
                    except asyncio.CancelledError:
                        # stopping: the graceful DISCONNECT on the way out must not hold it up
                        client.timeout = DISCONNECT_TIMEOUT
                        raise
                    finally:
                        for task in [*helpers, reader]:
                            task.cancel()
                        await asyncio.gather(*helpers, reader, return_exceptions=True)
            except (aiomqtt.MqttError, OSError, TimeoutError, ssl.SSLError) as exc:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    # the DISCONNECT of a stopping session failed (a socket already closed,
                    # no answer in time) and its error replaced the cancellation: stop anyway,
                    # or the agent would reconnect and never finish stopping
                    raise asyncio.CancelledError() from exc
                # aiomqtt wraps most connection errors, but not every path (a TLS or socket
                # error while the broker restarts): all of them mean "disconnected, retry".
                attempt += 1
                delay = backoff_delay(attempt, broker.reconnect_initial, broker.reconnect_max)
                log.warning(
                    "broker_disconnected", error=str(exc), attempt=attempt, delay=round(delay, 2)
                )
            finally:
                self.connected.clear()
                self._client = None
            await asyncio.sleep(delay)

    async def _reader(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                continue
            self._dispatch(message.topic.value, bytes(payload))


async def probe_broker(config: AgentConfig, within: float) -> None:
    """Connect with the device identity under another client id, then disconnect.

    Used by ``otad agent health-check`` while the daemon may hold the device's own client id
    (a second connection with the same id would take the daemon's session over).
    """
    broker = config.broker
    client = aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=f"{broker.client_id or config.device_id}-probe",
        tls_context=broker_tls_context(config),
        timeout=within,
    )
    try:
        async with asyncio.timeout(within), Connected(client):
            pass
    except (aiomqtt.MqttError, TimeoutError) as exc:
        raise BrokerError(f"mqtt: broker {broker.host}:{broker.port} not reachable: {exc}") from exc

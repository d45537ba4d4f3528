"""The rollout service's view of the shadows: set desired software, hear reported software.

The service speaks the same shadow protocol as any operator tool, with the ``fleet`` service
identity (the broker ACL lets services use every device's shadow topics). It never touches the
replica's tables: the replica stays the one owner of shadow documents.

- ``set_desired`` publishes ``{"state": {"desired": {"software": ...}}}`` with a clientToken and
  waits for ``update/accepted`` or ``update/rejected`` echoing it.
- Reports come from ``update/documents`` (the full document after every change),
  ``update/accepted`` (what a device's update changed) and ``get/accepted`` (full documents we
  asked for after a reconnect). Partial ones are merged into the last known ``software`` of the
  device, so a consumer always sees a whole entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiomqtt
import structlog

from otad.errors import BrokerError, ShadowError, ShadowInternal
from otad.mqtt_connect import enter
from otad.shadow import Topics, merge_state

__layer__ = "adapter"

log = structlog.get_logger(__name__)

ANSWER_TIMEOUT = 15.0
MAX_PAYLOAD = 64 * 1024
_TOKEN_PREFIX = "otad-rollout-"  # noqa: S105 (a clientToken prefix, not a secret)


@dataclass(frozen=True)
class Report:
    device_id: str
    software: dict[str, Any]


class FleetShadow:
    """One MQTT connection for the rollout service; use as ``async with``."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls_context: ssl.SSLContext,
        topic_template: str,
        client_id: str = "otad-svc-fleet-rollout",
    ) -> None:
        self._template = topic_template
        self._client = aiomqtt.Client(
            host,
            port,
            tls_context=tls_context,
            identifier=client_id,
            keepalive=30,
            timeout=ANSWER_TIMEOUT,
            max_queued_incoming_messages=0,
        )
        # The service keeps up to MAX_PARALLEL_SETS requests in flight on purpose; aiomqtt
        # would warn about "pending publish calls" past 10.
        self._client.pending_calls_threshold = 1_000
        before, _, after = topic_template.partition("{device_id}")
        self._topic = re.compile(
            "^" + re.escape(before) + r"([^/]+)" + re.escape(after) + r"/(update|get)/(\w+)$"
        )
        every = topic_template.replace("{device_id}", "+")
        self._filters = [
            f"{every}/update/documents",
            f"{every}/update/accepted",
            f"{every}/update/rejected",
            f"{every}/get/accepted",
        ]
        self._tokens = (f"{_TOKEN_PREFIX}{n}" for n in itertools.count(1))
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._software: dict[str, dict[str, Any]] = {}
        self._reports: asyncio.Queue[Report] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FleetShadow:
        try:
            await enter(self._client)
            for topic_filter in self._filters:
                await self._client.subscribe(topic_filter, qos=1)
        except aiomqtt.MqttError as exc:
            raise BrokerError(f"rollout: cannot connect to the broker: {exc}") from exc
        self._reader = asyncio.create_task(self._read(), name="rollout-mqtt-reader")
        log.info("rollout_broker_connected")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, BrokerError):
                await self._reader
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(BrokerError("rollout: broker connection closed"))
        self._waiting.clear()
        # Already gone after a lost connection: nothing left to close cleanly.
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(None, None, None)

    @property
    def closed(self) -> bool:
        return self._reader is None or self._reader.done()

    def pending_reports(self) -> list[Report]:
        """Every report queued right now (for batching), without waiting."""
        out = []
        while not self._reports.empty():
            out.append(self._reports.get_nowait())
        return out

    async def next_report(self, within: float) -> Report | None:
        if self.closed:
            raise BrokerError("rollout: broker connection lost")
        try:
            async with asyncio.timeout(within):
                return await self._reports.get()
        except TimeoutError:
            return None

    async def set_desired(self, device_id: str, software: Mapping[str, Any] | None) -> None:
        """Set (or with ``None`` delete) the desired software; returns once the replica took it."""
        token = next(self._tokens)
        payload = {"state": {"desired": {"software": software}}, "clientToken": token}
        await self._request(device_id, "update", payload, token)

    async def request_document(self, device_id: str) -> None:
        """Ask for the full document; it arrives as a report (no wait for the answer)."""
        topics = Topics(device_id=device_id, template=self._template)
        try:
            await self._client.publish(topics.get, b"{}", qos=1)
        except aiomqtt.MqttError as exc:
            raise BrokerError(f"rollout: cannot publish to the broker: {exc}") from exc

    async def _request(
        self, device_id: str, kind: str, payload: Mapping[str, Any], token: str
    ) -> None:
        topics = Topics(device_id=device_id, template=self._template)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        try:
            await self._client.publish(
                topics.fleet_update if kind == "update" else topics.get,
                json.dumps(payload, separators=(",", ":")).encode(),
                qos=1,
            )
            async with asyncio.timeout(ANSWER_TIMEOUT):
                await future
        except aiomqtt.MqttError as exc:
            raise BrokerError(f"rollout: cannot publish to the broker: {exc}") from exc
        except TimeoutError as exc:
            raise ShadowInternal(
                f"rollout: no answer from the replica for {device_id} within {ANSWER_TIMEOUT:g}s"
            ) from exc
        finally:
            self._waiting.pop(token, None)

    async def _read(self) -> None:
        try:
            async for message in self._client.messages:
                payload = message.payload
                if not isinstance(payload, bytes | bytearray) or len(payload) > MAX_PAYLOAD:
                    continue
                self._dispatch(str(message.topic), bytes(payload))
        except aiomqtt.MqttError as exc:
            log.warning("rollout_broker_lost", error=str(exc))
            raise BrokerError(f"rollout: broker connection lost: {exc}") from exc

    def _dispatch(self, topic: str, payload: bytes) -> None:
        match = self._topic.match(topic)
        if match is None:
            return
        device_id, kind, outcome = match.groups()
        try:
            doc = json.loads(payload)
        except ValueError:
            log.warning("rollout_message_unreadable", device=device_id, topic=topic)
            return
        if not isinstance(doc, dict):
            return
        token = doc.get("clientToken")
        if isinstance(token, str) and token in self._waiting:
            future = self._waiting[token]
            if not future.done():
                if outcome == "rejected":
                    future.set_exception(_rejection(device_id, doc))
                else:
                    future.set_result(None)
        if kind == "update" and outcome == "documents":
            current = doc.get("current")
            software = _dig(current, "state", "reported", "software")
            if isinstance(software, dict):
                self._emit(device_id, software, full=True)
        elif outcome == "accepted":
            software = _dig(doc, "state", "reported", "software")
            if isinstance(software, dict):
                self._emit(device_id, software, full=kind == "get")

    def _emit(self, device_id: str, software: dict[str, Any], *, full: bool) -> None:
        if full:
            merged = dict(software)
        else:
            merged = merge_state(self._software.get(device_id, {}), software)
        if self._software.get(device_id) == merged:
            return  # the same state twice (documents + accepted of one update)
        self._software[device_id] = merged
        self._reports.put_nowait(Report(device_id, merged))


def _dig(doc: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _rejection(device_id: str, doc: Mapping[str, Any]) -> ShadowError:
    code = doc.get("code")
    message = doc.get("message")
    return ShadowError(
        f"rollout: the replica rejected the desired state of {device_id}: "
        f"{code} {message if isinstance(message, str) else ''}".strip()
    )

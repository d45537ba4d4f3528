"""Helpers for replica tests: a replica in the test's event loop, a recording device client."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiomqtt
from plugins.cloud_env import identity, mqtt_client

from otad.cloud.db import SqliteStore
from otad.cloud.pki import CloudDir
from otad.cloud.replica import BrokerSettings, Replica


def settings(cloud_dir: CloudDir, broker: Any, who: str) -> BrokerSettings:
    return BrokerSettings(
        broker.host, broker.port, cloud_dir.client_context(identity(cloud_dir, who))
    )


@asynccontextmanager
async def running_replica(
    cloud_dir: CloudDir, broker: Any, db: Path, *, session: str | None = None, **kwargs: Any
) -> AsyncIterator[Replica]:
    store = SqliteStore(db)
    await store.start()
    broker_settings = settings(cloud_dir, broker, "replica")
    if session is not None:
        broker_settings = dataclasses.replace(broker_settings, identifier=session, persistent=True)
    replica = Replica(store, broker_settings, **kwargs)
    stop = asyncio.Event()
    task = asyncio.create_task(replica.run(stop))
    try:
        await asyncio.wait_for(replica.ready.wait(), 15)
        yield replica
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await store.close()


class Device:
    """A device-side MQTT client that records every message on its shadow topics."""

    def __init__(self, client: aiomqtt.Client, device_id: str, prefix: str) -> None:
        self.client = client
        self.device_id = device_id
        self.prefix = prefix
        self.received: list[tuple[str, Any]] = []
        self._new = asyncio.Event()

    async def publish(self, suffix: str, payload: Any) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self.client.publish(f"{self.prefix}/{suffix}", raw, qos=1)

    async def read(self) -> None:
        async for message in self.client.messages:
            suffix = str(message.topic)[len(self.prefix) + 1 :]
            self.received.append((suffix, json.loads(bytes(message.payload))))  # type: ignore[arg-type]
            self._new.set()

    async def wait_for(self, suffix: str, *, count: int = 1, within: float = 10) -> list[Any]:
        """The payloads received on ``suffix`` once there are ``count`` of them."""
        deadline = time.monotonic() + within
        while True:
            got = [p for s, p in self.received if s == suffix]
            if len(got) >= count:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{count} x {suffix} not received; got {self.received}")
            self._new.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)

    async def request(self, suffix: str, payload: Any, answer: str, within: float = 10) -> Any:
        """Publish and return the answer: the one echoing the request's clientToken if it has
        one (other requests' answers may arrive in between), else the next one."""
        token = payload.get("clientToken") if isinstance(payload, dict) else None
        before = len(self.of(answer))
        await self.publish(suffix, payload)
        deadline = time.monotonic() + within
        count = before + 1
        while True:
            got = await self.wait_for(answer, count=count, within=deadline - time.monotonic())
            if token is None:
                return got[before]
            for body in got[before:]:
                if body.get("clientToken") == token:
                    return body
            count = len(got) + 1

    def of(self, suffix: str) -> list[Any]:
        return [p for s, p in self.received if s == suffix]


@asynccontextmanager
async def device(
    cloud_dir: CloudDir,
    broker: Any,
    device_id: str,
    template: str = "state/{device_id}",
    *,
    identity: str | None = None,
) -> AsyncIterator[Device]:
    """A client on ``device_id``'s shadow topics, as that device or as ``identity`` (e.g.
    "fleet": the fleet side, which may also publish on ``fleet/update``)."""
    prefix = template.replace("{device_id}", device_id)
    async with mqtt_client(cloud_dir, identity or device_id, broker) as client:
        # The answers only: update/# would also bring back the device's own (maybe malformed)
        # requests.
        for suffix in ("accepted", "rejected", "delta", "documents"):
            await client.subscribe(f"{prefix}/update/{suffix}", qos=1)
        await client.subscribe(f"{prefix}/get/+", qos=1)
        dev = Device(client, device_id, prefix)
        reader = asyncio.create_task(dev.read())
        try:
            yield dev
        finally:
            reader.cancel()
            with suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader

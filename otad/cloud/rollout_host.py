"""Run the cloud side of a fleet in one event loop: replica, artifact store, rollout service.

The demo, the fleet tests and the scale benchmark use :class:`LocalCloud`; the rollout service
is built by :func:`rollout_service`, which is also the one call a composition root such as
``otad cloud serve`` needs::

    service = rollout_service(cloud_dir, config, store_runner(shadow_store), signer.presign)
    tg.create_task(service.run(stop), name="rollout")

The broker runs outside (a :class:`otad.cloud.broker.BrokerProcess`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog

from otad.bundle import Keyring
from otad.cloud.config import CloudConfig
from otad.cloud.db import SqliteStore
from otad.cloud.pki import CloudDir
from otad.cloud.replica import BrokerSettings, Replica
from otad.cloud.rollout import Presigner, RolloutService
from otad.cloud.rollout_db import Runner, store_runner
from otad.cloud.rollout_mqtt import FleetShadow
from otad.cloud.store import ArtifactStore
from otad.errors import OtadError

__layer__ = "root"

log = structlog.get_logger(__name__)

READY_TIMEOUT = 30.0


def rollout_service(
    cloud: CloudDir, config: CloudConfig, runner: Runner, presign: Presigner
) -> RolloutService:
    """The rollout service of a cloud dir: fleet identity on the broker, tables via ``runner``."""
    tls = cloud.client_context(cloud.service("fleet"))

    def connect() -> FleetShadow:
        return FleetShadow(
            host=config.broker_host,
            port=config.broker_port,
            tls_context=tls,
            topic_template=config.topic_template,
        )

    return RolloutService(runner, connect, presign)


class LocalCloud:
    """Replica + store + rollout service as tasks of the running loop (``async with``)."""

    def __init__(
        self,
        cloud: CloudDir,
        config: CloudConfig | None = None,
        *,
        wrap_presign: Callable[[Presigner], Presigner] | None = None,
        serve_store: bool = True,
    ) -> None:
        """``serve_store=False``: another process serves the artifacts (the URLs still point at
        the configured store address); this one only signs them."""
        self.cloud = cloud
        self.config = config or cloud.config()
        self.db = SqliteStore(self.config.db_path)
        self.store = ArtifactStore(
            self.config,
            keyring=Keyring.load(cloud.keyring_dir),
            ssl_context=cloud.server_context(),
        )
        self.replica = Replica(
            self.db,
            BrokerSettings(
                self.config.broker_host,
                self.config.broker_port,
                cloud.client_context(cloud.service("replica")),
                identifier="otad-svc-replica",
            ),
            template=self.config.topic_template,
        )
        # wrap_presign: tests hand out URLs that are already expired, to see them replaced.
        presign: Presigner = self.store.signer.presign
        if wrap_presign is not None:
            presign = wrap_presign(presign)
        self.rollouts = rollout_service(cloud, self.config, store_runner(self.db), presign)
        self.serve_store = serve_store
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    async def __aenter__(self) -> LocalCloud:
        await self.db.start()
        if self.serve_store:
            await self.store.start()
        self._tasks = [
            asyncio.create_task(self.replica.run(self._stop), name="replica"),
            asyncio.create_task(self.rollouts.run(self._stop), name="rollouts"),
        ]
        ready = asyncio.ensure_future(
            asyncio.gather(self.replica.ready.wait(), self.rollouts.ready.wait())
        )
        await asyncio.wait(
            [ready, *self._tasks], timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        crashed = [t for t in self._tasks if t.done()]
        if crashed or not ready.done():
            ready.cancel()
            await self.__aexit__(None, None, None)
            for task in crashed:
                task.result()
            raise OtadError("cloud: replica or rollout service not ready in time")
        log.info("local_cloud_started", store=self.store.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await asyncio.wait_for(task, 15)
                except TimeoutError:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
        self._tasks = []
        if self.serve_store:
            await self.store.stop()
        await self.db.close()
        log.info("local_cloud_stopped")

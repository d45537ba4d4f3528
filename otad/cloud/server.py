"""`otad cloud serve`: the replica, the artifact store and the rollout service in one process.

The composition root of the backend. It builds each part from the cloud dir (identities, config),
runs them as named tasks of one TaskGroup and stops them in reverse order when the stop Event is
set: the replica and the rollout service finish what they committed, then the HTTPS listener
closes, then the database. If one part fails, the others are cancelled and the error ends the
process (a supervisor restarts it; everything acknowledged is durable).

Signals (:func:`serve`): the first SIGTERM/SIGINT sets the stop Event; a second one exits at once
with status 130, for when a graceful stop hangs.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any

import structlog

from otad.bundle import Keyring
from otad.cloud import rollout_db
from otad.cloud.config import CloudConfig
from otad.cloud.db import SqliteStore
from otad.cloud.pki import CloudDir
from otad.cloud.replica import BrokerSettings, Replica, ShadowClient
from otad.cloud.rollout import RolloutService
from otad.cloud.rollout_host import rollout_service
from otad.cloud.store import ArtifactStore
from otad.errors import OtadError

__layer__ = "root"

log = structlog.get_logger(__name__)

READY_TIMEOUT = 30.0


class CloudServer:
    """Replica + artifact store (+ rollout service) for one cloud dir.

    ``store_host``/``store_port`` override the config's listener (port 0 picks a free port; then
    pre-signed URLs point at the real port unless ``public_url`` is given). ``config`` may be a
    modified copy of the cloud dir's config (tests give each run its own database).
    """

    def __init__(
        self,
        cloud: CloudDir,
        config: CloudConfig | None = None,
        *,
        store_host: str | None = None,
        store_port: int | None = None,
        public_url: str | None = None,
        rollouts: bool = True,
    ) -> None:
        self.cloud = cloud
        self.config = config or cloud.config()
        self.db = SqliteStore(self.config.db_path)
        self.store = ArtifactStore(
            self.config,
            keyring=Keyring.load(cloud.keyring_dir),
            ssl_context=cloud.server_context(),
            host=store_host,
            port=store_port,
            public_url=public_url,
        )
        self.replica = Replica(
            self.db,
            self.broker_settings("replica"),
            template=self.config.topic_template,
        )
        self.rollouts: RolloutService | None = None
        if rollouts:
            # The same SqliteStore: rollout rows ride in the replica writer's group commit.
            self.rollouts = rollout_service(
                cloud, self.config, rollout_db.store_runner(self.db), self.store.signer.presign
            )
        self.ready = asyncio.Event()

    def broker_settings(self, service: str) -> BrokerSettings:
        """How the named service identity connects to this cloud dir's broker."""
        return BrokerSettings(
            host=self.config.broker_host,
            port=self.config.broker_port,
            tls_context=self.cloud.client_context(self.cloud.service(service)),
        )

    def shadow_client_factory(self) -> Callable[[], AbstractAsyncContextManager[Any]]:
        settings = self.broker_settings("fleet")
        template = self.config.topic_template
        return lambda: ShadowClient(settings, template=template)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; ``ready`` is set once every part is serving."""
        self.config.db_path.parent.mkdir(parents=True, exist_ok=True)
        await self.db.start()
        try:
            await self.store.start()
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(
                        _stop_all_on_failure(self.replica.run(stop), stop), name="replica"
                    )
                    if self.rollouts is not None:
                        group.create_task(
                            _stop_all_on_failure(self.rollouts.run(stop), stop), name="rollouts"
                        )
                    group.create_task(self._announce_ready(stop), name="ready")
            except ExceptionGroup as failure:
                # One part failed with an error of ours: let it end the process as itself (the
                # CLI prints it as one line), not wrapped in a group.
                first = failure.exceptions[0]
                if len(failure.exceptions) == 1 and isinstance(first, OtadError):
                    log.error("cloud_part_failed", code=first.code, error=str(first))
                    raise first from failure
                raise
            finally:
                await self.store.stop()
        finally:
            await self.db.close()
            self.ready.clear()
            log.info("cloud_stopped")

    async def _announce_ready(self, stop: asyncio.Event) -> None:
        async def all_ready() -> None:
            await self.replica.ready.wait()
            if self.rollouts is not None:
                await self.rollouts.ready.wait()

        ready = asyncio.ensure_future(all_ready())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            stopped.cancel()
        if not stop.is_set():
            self.ready.set()
            log.info(
                "cloud_serving",
                store=self.store.url,
                broker=f"{self.config.broker_host}:{self.config.broker_port}",
                rollouts=self.rollouts is not None,
            )


async def _stop_all_on_failure(part: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """Run one part; if it fails, set ``stop`` so the others end the way they end on SIGTERM.

    The TaskGroup cancels the others too, but a part that reconnects in a loop until ``stop``
    may see the cancellation surface as a connection error (aiomqtt translates it) and keep
    going; the Event is the signal every part honours.
    """
    try:
        await part
    except BaseException:
        stop.set()
        raise


async def serve(server: CloudServer) -> int:
    """Run ``server`` until SIGTERM/SIGINT; a second signal exits immediately."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("cloud_forced_exit", signal=signal.Signals(signum).name)
            os._exit(130)
        log.info("cloud_stopping", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await server.run(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0

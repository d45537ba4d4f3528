"""The cloud side in one process: the replica, the artifact store and the rollout service.

The one composition root of the backend: `otad cloud serve`, the demo, the fleet tests, the scale
benchmark and the test fixtures all build it here, so they run the same wiring. It builds each
part from the cloud dir (identities, config), runs them as named tasks of one TaskGroup and stops
them in reverse order when the stop Event is set: the replica and the rollout service finish what
they committed, then the HTTPS listener closes, then the database. If one part fails, the others
are cancelled and the error ends the process (a supervisor restarts it; everything acknowledged
is durable).

Two ways to run it: ``await server.run(stop)`` (the CLI, with :func:`serve`), or
``async with server:`` as tasks of the running loop, returning once every part is serving.

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
from otad.cloud.rollout import Presigner, RolloutService
from otad.cloud.rollout_mqtt import FleetShadow
from otad.cloud.store import ArtifactStore
from otad.cloud.store_targets import ShadowTargets
from otad.errors import OtadError

__layer__ = "root"

log = structlog.get_logger(__name__)

READY_TIMEOUT = 30.0
# How long ``async with`` waits for a graceful stop before cancelling what is left.
STOP_TIMEOUT = 30.0


def rollout_service(
    cloud: CloudDir, config: CloudConfig, runner: rollout_db.Runner, presign: Presigner
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


class CloudServer:
    """Replica + artifact store (+ rollout service) for one cloud dir.

    ``store_host``/``store_port`` override the config's listener (port 0 picks a free port; then
    pre-signed URLs point at the real port unless ``public_url`` is given). ``config`` may be a
    modified copy of the cloud dir's config (tests give each run its own database).

    ``serve_store=False``: another process serves the artifacts (pre-signed URLs still point at
    the configured store address); this one only signs them. ``wrap_presign`` wraps the signer
    the rollout service uses (tests hand out URLs that are already expired, to see them replaced).
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
        serve_store: bool = True,
        wrap_presign: Callable[[Presigner], Presigner] | None = None,
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
            # The replica's own database: a token opens only what the desired state names.
            targets=ShadowTargets(self.db),
        )
        self.replica = Replica(
            self.db,
            self.broker_settings("replica"),
            template=self.config.topic_template,
            share_group=self.config.replica_share_group(),
        )
        self.serve_store = serve_store
        self.rollouts: RolloutService | None = None
        if rollouts:
            presign: Presigner = self.store.signer.presign
            if wrap_presign is not None:
                presign = wrap_presign(presign)
            # The same SqliteStore: rollout rows ride in the replica writer's group commit.
            self.rollouts = rollout_service(
                cloud, self.config, rollout_db.store_runner(self.db), presign
            )
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

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
            if self.serve_store:
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
                if self.serve_store:
                    await self.store.stop()
        finally:
            await self.db.close()
            self.ready.clear()
            log.info("cloud_stopped")

    async def __aenter__(self) -> CloudServer:
        """Start :meth:`run` as a task of this loop; return once every part is serving.

        Raises what ended the server if a part fails while starting, OtadError if it is not
        serving within READY_TIMEOUT (then it is stopped again).
        """
        if self._task is not None:
            raise OtadError("cloud: this server is already running")
        self._stop = asyncio.Event()
        task = asyncio.create_task(self.run(self._stop), name="cloud-server")
        self._task = task
        ready = asyncio.ensure_future(self.ready.wait())
        try:
            await asyncio.wait({ready, task}, timeout=READY_TIMEOUT, return_when="FIRST_COMPLETED")
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        finally:
            ready.cancel()
        if task.done():
            self._task = None
            task.result()  # raises what stopped it
            raise OtadError("cloud: the server stopped before it was serving")
        if not self.ready.is_set():
            await self.__aexit__(None, None, None)
            raise OtadError(f"cloud: replica or rollout service not ready within {READY_TIMEOUT} s")
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop gracefully; after STOP_TIMEOUT cancel what is left. A part's failure is raised."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await task
        except TimeoutError:
            # the timeout cancelled the task and waited for its finally blocks (store, db)
            log.warning("cloud_stop_timed_out", timeout=STOP_TIMEOUT)

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

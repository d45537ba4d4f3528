"""The agent's composition root: config -> journal, slots, bootloader, MQTT session, update runner.

:class:`Agent` owns no global state and installs no signal handlers, so one process can run many
(the fleet simulator does); the CLI root turns signals into the ``stop`` event. A run is::

    lock the journal -> booted slot -> recovery decision (bootloader marks + journal) -> READY=1
    -> TaskGroup: mqtt (session), supervisor (resume the step, then act on desired documents),
       watchdog (WATCHDOG=1 only while work progresses)

The supervisor acts on full shadow documents only (the session fetches one after every connect
and on every delta). One job runs at a time; a desired state naming another job cancels it while
it is still cancellable (before the slot is switched).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Mapping
from typing import Any

import structlog

from otad.agent.bootloader import Bootloader
from otad.agent.config import AgentConfig
from otad.agent.download import Downloader
from otad.agent.health import HealthChecker
from otad.agent.journal import Journal
from otad.agent.machine import RecoveryAction, Step
from otad.agent.mqtt import ShadowSession
from otad.agent.notify import Notifier, watchdog_interval
from otad.agent.slots import booted_slot
from otad.agent.update import (
    DesiredSoftware,
    HealthCheck,
    HealthResult,
    Rebooter,
    RebootPending,
    UpdateRunner,
    load_keyring,
    valid_job_id,
)
from otad.agent.wiring import command_rebooter, make_bootloader, make_layout
from otad.bundle import Keyring
from otad.errors import KeyringError, OtadError, RebootFailed

__layer__ = "root"

log = structlog.get_logger(__name__)


class Agent:
    """One device agent. ``await agent.run(stop)`` until ``stop`` is set.

    Injectables (tests and the fleet simulator): ``bootloader`` (else from the config),
    ``rebooter`` (else ``config.reboot_command``), ``booted_slot`` (else config/cmdline),
    ``boot_id`` (else the kernel's), ``health`` (else the configured checks), ``notifier``,
    ``broker_tls`` / ``store_tls`` (client contexts made from this config, shared by every start
    of a simulated device; else built from the config at each start, ~2 ms of CPU each).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        bootloader: Bootloader | None = None,
        rebooter: Rebooter | None = None,
        booted_slot: str | None = None,
        boot_id: str | None = None,
        health: HealthCheck | None = None,
        notifier: Notifier | None = None,
        broker_tls: ssl.SSLContext | None = None,
        store_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.bootloader = bootloader or make_bootloader(config)
        self.rebooter = rebooter or command_rebooter(config.reboot_command)
        self._booted_override = booted_slot or config.slots.booted
        self._boot_id = boot_id
        self._health = health
        self.notifier = notifier or Notifier()
        self._broker_tls = broker_tls
        self._store_tls = store_tls
        self.ready = asyncio.Event()
        self.rebooting = asyncio.Event()
        self.jobs_started = 0
        self.runner: UpdateRunner | None = None
        self.session: ShadowSession | None = None
        self.booted: str | None = None
        self._document: dict[str, Any] | None = None
        self._document_event = asyncio.Event()
        self._job: asyncio.Task[None] | None = None
        self._recovering = False  # a recovery step runs in the supervisor (see _supervise)
        self._job_desired: DesiredSoftware | None = None
        self._last_invalid: str | None = None
        self._last_noop: str | None = None
        self._not_started: str | None = None

    # --- wiring ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        config = self.config
        journal = Journal(config.state_dir, boot_id=self._boot_id)
        await asyncio.to_thread(journal.acquire)
        downloader = Downloader(config, tls=self._store_tls)
        try:
            layout = make_layout(config)
            self.booted = booted_slot(layout, override=self._booted_override)
            keyring = await self._load_keyring()
            self.session = ShadowSession(config, self._on_document, tls=self._broker_tls)
            runner = UpdateRunner(
                config,
                bootloader=self.bootloader,
                journal=journal,
                booted_slot=self.booted,
                layout=layout,
                downloader=downloader,
                reporter=self.session,
                rebooter=self.rebooter,
                health=self._health or self._configured_health,
                keyring=keyring,
                keyring_path=config.keyring,
                notifier=self.notifier,
            )
            self.runner = runner
            # a replacement deferred while the job could not be cancelled is acted on now
            runner.on_cancellable = self._reconsider
            action = await runner.recover()
            self.notifier.ready(f"recovered: {action.step.value}")
            self.ready.set()
            log.info("agent_ready", device=config.device_id, booted=self.booted)
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.session.run(), name="mqtt"),
                    tg.create_task(self._supervise(action), name="supervisor"),
                ]
                interval = watchdog_interval()
                if interval is not None:
                    tasks.append(tg.create_task(self._watchdog(interval), name="watchdog"))
                await stop.wait()
                log.info("agent_stopping", device=config.device_id)
                self.notifier.stopping()
                for task in tasks:
                    task.cancel()
        finally:
            try:
                await self._interrupt_job()
            finally:
                try:
                    await downloader.close()
                finally:
                    journal.release()
            log.info("agent_stopped", device=config.device_id)

    async def _load_keyring(self) -> Keyring | KeyringError:
        """The trusted keys, or why they could not be loaded.

        An agent without a usable keyring still runs: it recovers and finishes what was in
        flight (a freshly booted slot fails its health check and rolls back), reports, and
        fails every job with ``keyring_invalid`` until a job finds the keyring fixed. Exiting
        instead would leave a device that says nothing and, on a new slot, never decides
        between commit and rollback.
        """
        keyring = await load_keyring(self.config.keyring)
        if isinstance(keyring, KeyringError):
            log.error("keyring_invalid", path=str(self.config.keyring), reason=keyring.message)
        return keyring

    async def _interrupt_job(self) -> None:
        """Cancel the running job because the agent stops (it resumes on the next start)."""
        if self.runner is not None:
            # a job cancelled now is interrupted, not superseded: the journal keeps its step
            self.runner.stopping = True
        job = self._job
        if job is None or job.done():
            return
        job.cancel()
        # asyncio.wait, not `await job`: a cancellation of this task itself must go on up
        await asyncio.wait([job])
        _log_job_end(job)

    # --- health ----------------------------------------------------------------------------------

    async def _broker_reachable(self, within: float) -> bool:
        session = self.session
        if session is None:
            return False
        try:
            async with asyncio.timeout(within):
                await session.connected.wait()
        except TimeoutError:
            return False
        return True

    async def _configured_health(self) -> HealthResult:
        checker = HealthChecker.from_config(
            self.config.health, broker=self._broker_reachable, keyring=self.config.keyring
        )
        report = await checker.run()
        return HealthResult(report.ok, report.reason)

    # --- documents -------------------------------------------------------------------------------

    def _on_document(self, document: dict[str, Any]) -> None:
        self._document = document
        self._document_event.set()

    def _reconsider(self) -> None:
        """Act on the latest document again: one that came while a job could not be cancelled
        or the device waited for its reboot was only put aside, and a real device may get no
        other document for a long time."""
        if self._document is not None:
            self._document_event.set()

    async def _supervise(self, action: RecoveryAction) -> None:
        runner = self.runner
        if runner is None:  # pragma: no cover - set before the task starts
            return
        try:
            if action.step == Step.RESUME_DOWNLOAD and runner.record is not None:
                self._start_job(runner.resume(action), runner.desired_from(runner.record))
            else:
                # a recovery step (re-verify the slot, health check, commit, switch) is work
                # the watchdog watches like a job: a hung medium must stop the pings
                runner.beat()
                self._recovering = True
                try:
                    await runner.resume(action)
                finally:
                    self._recovering = False
        except RebootPending:
            await self._wait_for_power_off()
            self._reconsider()
        while True:
            await self._document_event.wait()
            self._document_event.clear()
            if self.rebooting.is_set():
                continue
            document = self._document or {}
            try:
                await self._act(runner, document)
            except RebootPending:
                await self._wait_for_power_off()
                self._reconsider()

    async def _wait_for_power_off(self) -> None:
        """The reboot command succeeded: wait for the power to go, at most ``reboot_timeout``."""
        self.rebooting.set()
        timeout = self.config.reboot_timeout
        log.info("waiting_for_reboot", within=timeout)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 30.0))
            if self.runner is not None:
                self.runner.beat()  # a shutdown takes a while; that is not a hung job
        self.rebooting.clear()
        if self.runner is not None:
            await self.runner.reboot_failed(
                RebootFailed(f"reboot: the system was still up {timeout:.0f} s after the command")
            )

    async def _act(self, runner: UpdateRunner, document: Mapping[str, Any]) -> None:
        state = document.get("state")
        desired_doc = state.get("desired") if isinstance(state, Mapping) else None
        entry = desired_doc.get("software") if isinstance(desired_doc, Mapping) else None
        if entry is None:
            # the operator withdrew the desired software: stop a job that can still stop
            await self._cancel_job("the desired software was removed")
            return
        try:
            desired = DesiredSoftware.parse(entry, store_url=self.config.store.url)
        except OtadError as exc:
            key = json.dumps(entry, sort_keys=True, default=str)
            if key == self._last_invalid:
                return
            self._last_invalid = key
            await self._cancel_job("the new desired state is invalid")
            job_id = entry.get("jobId") if isinstance(entry, Mapping) else None
            await runner.fail_invalid(job_id if valid_job_id(job_id) else None, exc)
            return
        self._last_invalid = None
        running = self._job_desired if self._job is not None and not self._job.done() else None
        if running is not None:
            if desired.job_id == running.job_id:
                if desired.url != running.url:
                    self._job_desired = desired
                    runner.offer_url(desired)
                return
            if not runner.cancellable:
                log.info("desired_deferred", job_id=desired.job_id, running=running.job_id)
                return
            await self._cancel_job(f"job {desired.job_id} replaces it")
        record = runner.record
        if record is not None and record.job_id == desired.job_id:
            return  # this job ran already (or runs): never twice
        if desired.job_id in runner.device.jobs:
            return  # an older job named again (after another one ran): never twice either
        if desired.job_id == self._not_started:
            return  # could not even start; a new jobId (or a restart) tries again
        if desired.version == runner.running_version and desired.job_id != self._last_noop:
            self._last_noop = desired.job_id
            log.info("desired_already_installed", job_id=desired.job_id, version=desired.version)
            runner.report_state("succeeded", job_id=desired.job_id, progress=100)
            return
        if desired.version == runner.running_version:
            return
        self._start_job(runner.run_job(desired), desired)

    def _start_job(self, work: Any, desired: DesiredSoftware | None) -> None:
        self.jobs_started += 1
        self._job_desired = desired
        self._job = asyncio.create_task(self._job_body(work, desired), name="job")

    async def _job_body(self, work: Any, desired: DesiredSoftware | None) -> None:
        try:
            await work
        except RebootPending:
            await self._wait_for_power_off()
        except OtadError as exc:
            # begin() refused (e.g. the data partition is full): the job never started and the
            # device is untouched. Say so once for this jobId; do not retry it on every document.
            log.error("job_not_started", error=exc.code, reason=exc.message)
            if desired is not None and self.runner is not None:
                self._not_started = desired.job_id
                await self.runner.fail_invalid(desired.job_id, exc)
        except Exception:  # the top of the job task: never let it die silently
            log.exception("job_crashed")
        finally:
            self._reconsider()

    async def _cancel_job(self, why: str) -> None:
        job = self._job
        if job is None or job.done():
            return
        if self.runner is not None and not self.runner.cancellable:
            # past the download the slot is being verified or switched: let it finish
            log.info("job_not_cancelled", reason=why)
            return
        log.info("job_cancelling", reason=why)
        job.cancel()
        # asyncio.wait, not `await job` under suppress(CancelledError): that would also swallow
        # the cancellation of the supervisor itself (the agent stopping) and hang the stop
        await asyncio.wait([job])
        _log_job_end(job)
        self._job = None

    # --- systemd watchdog --------------------------------------------------------------------

    async def _watchdog(self, interval: float) -> None:
        """Feed the watchdog only while work progresses: a hung job stops the pings."""
        stall_limit = max(
            4 * interval, 2 * self.config.download.sock_read + self.config.health.total_timeout
        )
        starved = False
        while True:
            await asyncio.sleep(interval)
            runner = self.runner
            busy = self._recovering or (self._job is not None and not self._job.done())
            if runner is not None and busy and time.monotonic() - runner.heartbeat > stall_limit:
                if not starved:
                    log.error("watchdog_starved", stalled_for=time.monotonic() - runner.heartbeat)
                starved = True
                continue
            if runner is not None and runner.stuck is not None:
                # on a slot marked bad that cannot reboot: let systemd restart the agent, whose
                # recovery tries the rollback's reboot again
                if not starved:
                    log.error("watchdog_withheld", reason=runner.stuck.message)
                starved = True
                continue
            starved = False
            self.notifier.watchdog()


def _log_job_end(job: asyncio.Task[None]) -> None:
    """Say how a cancelled job task ended if it did not end cancelled (it caught the cancel)."""
    if job.cancelled():
        return
    error = job.exception()
    if error is not None:
        log.error("job_ended_with_error", error=f"{type(error).__name__}: {error}")

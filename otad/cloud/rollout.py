"""The rollout service: runs the decisions of :mod:`otad.cloud.rollout_plan` against the fleet.

It runs inside ``otad cloud serve`` (or on its own for tests) and loops over one cycle:

1. take every device report that arrived (batched), fold each into its rollout's records;
2. pick up new rollouts and operator requests (pause/resume/abort) from the database;
3. advance every active rollout (:func:`rollout_plan.step`: timeouts, pause, next wave);
4. persist everything that changed in one transaction, THEN carry out the commands:
   pre-sign a URL per device and set its desired software through the replica.

Persist-then-act makes a crash at any point safe: on start the service loads the active
rollouts, sets the desired state again for devices that were told but never answered (the agent
runs a job id once, so a repeat is harmless) and asks for the full document of every device in
flight, catching up on reports it missed while it was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from otad.cloud import rollout_db as db
from otad.cloud import rollout_plan as plan
from otad.cloud.rollout_mqtt import Report
from otad.cloud.rollout_plan import (
    IN_FLIGHT,
    ClearDesired,
    Command,
    DeviceRecord,
    Rollout,
    SetDesired,
)
from otad.errors import BrokerError, OtadError, RolloutError

__layer__ = "service"

log = structlog.get_logger(__name__)

# How often the service looks for operator requests and wave timeouts when no report arrives.
TICK = 0.5
# Advancing the rollouts (timeouts, thresholds, next wave) looks at every device of a rollout:
# about 6 ms for 10,000 devices here. Done after every batch of reports it took most of the
# service's CPU in a large wave, so it runs at most this often (seconds) - and at once when a
# rollout or an operator request arrives. No device is told anything between two steps, so a
# wave over its threshold still pauses before another device starts.
STEP_INTERVAL = 0.25
# Desired-state updates in flight at once: enough to start a 10,000-device wave in seconds,
# few enough not to flood the replica's queue.
MAX_PARALLEL_SETS = 64
RECONNECT_INITIAL = 0.5
RECONNECT_MAX = 15.0

Presigner = Callable[[str, str, int], str]
"""(artifact id, device id, lifetime in seconds) -> pre-signed URL for that device only."""


class Shadows(Protocol):
    """What the service needs from the shadow side (see :class:`otad.cloud.rollout_mqtt`)."""

    async def set_desired(self, device_id: str, software: dict[str, Any] | None) -> None: ...

    async def request_document(self, device_id: str) -> None: ...

    async def next_report(self, within: float) -> Report | None: ...

    def pending_reports(self) -> list[Report]: ...


ShadowsFactory = Callable[[], Any]
"""Returns an async context manager that yields a connected :class:`Shadows`."""


def new_rollout_id() -> str:
    """Unique across databases too: a device treats a job id it has seen as done."""
    return f"r-{secrets.token_hex(4)}"


@dataclass
class _Live:
    rollout: Rollout
    devices: dict[str, DeviceRecord]
    dirty: dict[str, DeviceRecord] = field(default_factory=dict)
    rollout_dirty: bool = False


class RolloutService:
    """Owns the active rollouts while it runs; the database is the durable copy."""

    def __init__(
        self,
        runner: db.Runner,
        connect: ShadowsFactory,
        presign: Presigner,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._run_db = runner
        self._connect = connect
        self._presign = presign
        self._clock = clock
        self._live: dict[str, _Live] = {}
        self._owner: dict[str, str] = {}  # device id -> active rollout id
        self._unsent: dict[str, Command] = {}  # commands that failed; retried every cycle
        self._seen: dict[str, plan.DeviceSeen] = {}
        self._sets = asyncio.Semaphore(MAX_PARALLEL_SETS)
        self.ready = asyncio.Event()

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; reconnects to the broker with backoff."""
        await self._run_db(db.create_schema)
        await self._load_active()
        delay = RECONNECT_INITIAL
        while not stop.is_set():
            try:
                async with self._connect() as shadows:
                    delay = RECONNECT_INITIAL
                    await self._catch_up(shadows)
                    self.ready.set()
                    await self._serve(shadows, stop)
            except BrokerError as exc:
                log.warning("rollout_service_disconnected", error=str(exc), retry_in=delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
                delay = min(RECONNECT_MAX, delay * 2)
        await self._flush()
        log.info("rollout_service_stopped")

    async def _load_active(self) -> None:
        def load(conn: Any) -> list[tuple[Rollout, dict[str, DeviceRecord]]]:
            return [
                (r, db.load_devices(conn, r.id)) for r in db.load_rollouts(conn, active_only=True)
            ]

        for rollout, devices in await self._run_db(load):
            self._adopt(rollout, devices)
        log.info("rollout_service_started", active=len(self._live))

    def _adopt(self, rollout: Rollout, devices: dict[str, DeviceRecord]) -> None:
        self._live[rollout.id] = _Live(rollout, devices)
        for device_id in devices:
            self._owner[device_id] = rollout.id
        for command in plan.resend_commands(rollout, devices.values()):
            self._unsent[command.device_id] = command

    async def _catch_up(self, shadows: Shadows) -> None:
        """After a (re)connect: fetch documents of devices in flight (reports may be lost)."""
        in_flight = [
            device_id
            for live in self._live.values()
            for device_id, record in live.devices.items()
            if record.state in IN_FLIGHT or record.state == plan.DeviceState.TIMED_OUT
        ]
        for device_id in in_flight:
            await shadows.request_document(device_id)
        if in_flight:
            log.info("rollout_catching_up", devices=len(in_flight))

    # --- the cycle ------------------------------------------------------------------------------

    async def _serve(self, shadows: Shadows, stop: asyncio.Event) -> None:
        # Commands run in the background: a 10,000-device wave takes a while to set, and the
        # reports of devices that already started must be folded in meanwhile.
        running: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        try:
            next_poll = 0.0
            next_step = 0.0
            while not stop.is_set():
                first = await shadows.next_report(min(TICK, STEP_INTERVAL))
                reports = ([first] if first else []) + shadows.pending_reports()
                self._apply_reports(reports)
                news = False
                if self._clock() >= next_poll:
                    news = await self._poll_database()
                    next_poll = self._clock() + TICK
                if news or loop.time() >= next_step:
                    self._step_all()
                    next_step = loop.time() + STEP_INTERVAL
                await self._flush()
                for command in self._due_commands():
                    task = asyncio.create_task(self._one_kept(shadows, command))
                    running.add(task)
                    task.add_done_callback(running.discard)
                lost = next((t for t in list(running) if t.done() and t.exception()), None)
                if lost is not None:
                    raise lost.exception()  # type: ignore[misc]
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    def _apply_reports(self, reports: Iterable[Report]) -> None:
        now = self._clock()
        for report in reports:
            software = report.software
            self._seen[report.device_id] = plan.DeviceSeen(
                device_id=report.device_id,
                version=_text(software.get("version")),
                slot=_text(software.get("slot")),
                state=_text(software.get("state")),
                job_id=_text(software.get("jobId")),
                error_code=_text((software.get("error") or {}).get("code"))
                if isinstance(software.get("error"), dict)
                else None,
                last_seen=now,
            )
            rollout_id = self._owner.get(report.device_id)
            live = self._live.get(rollout_id) if rollout_id else None
            if live is None:
                continue
            record = live.devices[report.device_id]
            new, commands = plan.apply_report(live.rollout, record, software, now)
            if new != record:
                live.devices[report.device_id] = new
                live.dirty[report.device_id] = new
                if new.state != record.state:
                    log.info(
                        "rollout_device_changed",
                        rollout=live.rollout.id,
                        device=report.device_id,
                        state=new.state.value,
                        error=new.error_code,
                    )
            for command in commands:
                self._unsent[command.device_id] = command

    async def _poll_database(self) -> bool:
        """Adopt new rollouts, answer operator requests; True if there was any."""
        known = set(self._live)

        def poll(
            conn: Any,
        ) -> tuple[list[tuple[Rollout, dict[str, DeviceRecord]]], list[db.Request]]:
            fresh = [
                (db.load_rollout(conn, rid), db.load_devices(conn, rid))
                for rid in sorted(db.active_ids(conn) - known)
            ]
            return fresh, db.pending_requests(conn)

        fresh, requests = await self._run_db(poll)
        for rollout, devices in fresh:
            log.info("rollout_picked_up", rollout=rollout.id, devices=len(devices))
            self._adopt(rollout, devices)
        results = [(request.seq, self._handle_request(request)) for request in requests]
        if results:
            now = self._clock()

            def finish(conn: Any) -> None:
                for seq, result in results:
                    db.finish_request(conn, seq, result, now)

            # Persist the rollouts the requests changed before saying "done" to the operator.
            await self._flush()
            await self._run_db(finish)
        return bool(fresh or results)

    def _handle_request(self, request: db.Request) -> str:
        live = self._live.get(request.rollout_id)
        now = self._clock()
        try:
            if live is None:
                raise RolloutError(f"rollout {request.rollout_id} is not active")
            if request.action == "pause":
                live.rollout = plan.pause(live.rollout, now)
            elif request.action == "resume":
                live.rollout = plan.resume(live.rollout, live.devices, now)
            elif request.action == "abort":
                decision = plan.abort(live.rollout, live.devices, now)
                self._take(live, decision)
            else:
                raise RolloutError(f"unknown action {request.action!r}")
        except RolloutError as exc:
            log.warning("rollout_request_refused", rollout=request.rollout_id, error=str(exc))
            return f"error: {exc}"
        live.rollout_dirty = True
        log.info("rollout_request_done", rollout=request.rollout_id, action=request.action)
        return "ok"

    def _step_all(self) -> None:
        now = self._clock()
        for live in list(self._live.values()):
            decision = plan.step(live.rollout, live.devices, now)
            if decision.changed or decision.rollout != live.rollout:
                self._take(live, decision)

    def _take(self, live: _Live, decision: plan.Decision) -> None:
        live.rollout = decision.rollout
        live.rollout_dirty = True
        for record in decision.devices:
            live.devices[record.device_id] = record
            live.dirty[record.device_id] = record
        for command in decision.commands:
            self._unsent[command.device_id] = command
        for event, fields in decision.events:
            log.info(event, rollout=live.rollout.id, **fields)

    async def _flush(self) -> None:
        """Persist every change in one transaction; after it the pending commands may run."""
        dirty = [live for live in self._live.values() if live.rollout_dirty or live.dirty]
        seen = list(self._seen.values())
        if not dirty and not seen:
            return
        snapshot = [(live.rollout, list(live.dirty.values())) for live in dirty]

        def save(conn: Any) -> None:
            for rollout, devices in snapshot:
                db.save(conn, rollout, devices)
            if seen:
                db.record_seen(conn, seen)

        await self._run_db(save)
        self._seen.clear()
        for live in dirty:
            live.dirty.clear()
            live.rollout_dirty = False
            if not live.rollout.active:
                self._retire(live)

    def _retire(self, live: _Live) -> None:
        del self._live[live.rollout.id]
        for device_id in live.devices:
            if self._owner.get(device_id) == live.rollout.id:
                del self._owner[device_id]
                command = self._unsent.get(device_id)
                if isinstance(command, SetDesired):
                    del self._unsent[device_id]

    def _due_commands(self) -> list[Command]:
        commands = list(self._unsent.values())
        self._unsent.clear()
        return commands

    # --- acting ----------------------------------------------------------------------------------

    async def _one_kept(self, shadows: Shadows, command: Command) -> None:
        """Run one command; on failure keep it for the next cycle (a restart covers a crash)."""
        try:
            await self._one(shadows, command)
        except OtadError as exc:
            if not isinstance(exc, BrokerError):
                log.warning("rollout_command_failed", device=command.device_id, error=str(exc))
                # Not at once: a replica that refuses now will not accept a retry in 1 ms.
                await asyncio.sleep(TICK)
            self._unsent.setdefault(command.device_id, command)
            if isinstance(exc, BrokerError):
                raise

    async def _one(self, shadows: Shadows, command: Command) -> None:
        async with self._sets:
            if isinstance(command, ClearDesired):
                await shadows.set_desired(command.device_id, None)
                log.info("rollout_desired_cleared", device=command.device_id)
                return
            rollout_id = self._owner.get(command.device_id)
            live = self._live.get(rollout_id) if rollout_id else None
            if live is None:
                return  # the rollout ended meanwhile
            rollout = live.rollout
            lifetime = plan.url_lifetime(rollout.bundle_size)
            try:
                url = self._presign(rollout.artifact_id, command.device_id, lifetime)
            except OtadError as exc:
                log.error(
                    "rollout_presign_failed",
                    rollout=rollout.id,
                    device=command.device_id,
                    error=str(exc),
                )
                raise
            software: dict[str, Any] = {
                "version": rollout.version,
                "url": url,
                "jobId": command.job_id,
                "size": rollout.bundle_size,
            }
            if rollout.sha256:
                software["sha256"] = rollout.sha256
            await shadows.set_desired(command.device_id, software)
            log.debug(
                "rollout_desired_set",
                rollout=rollout.id,
                device=command.device_id,
                job=command.job_id,
                expires_in=lifetime,
            )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None

"""Rollout decisions, with no I/O: wave plans, per-device outcomes, the rollout state machine.

A rollout moves one artifact onto a list of devices in *waves*. A wave plan such as
``1,10,50,100%`` is a list of cumulative targets: the first wave is 1 device, the second grows the
rollout to 10 devices, the third to 50, the last to every device. Plain numbers are device counts,
numbers with ``%`` are shares of the fleet (rounded up, at least one device).

The rollout judges each wave on its own: when the share of failed devices *in that wave* goes
above ``max_failure_rate`` the rollout pauses and says why; it does not wait for the rest of the
wave, because more failures cannot be undone by later successes. A wave that runs past
``wave_timeout`` counts its unfinished devices as timed out (a failure). The next wave starts only
when every device of the current wave has an outcome. ``resume`` accepts the failures of the
wave that paused the rollout (the operator looked at them) and carries on; ``abort`` ends the
rollout, skips devices that were never told to update and withdraws the desired state of devices
that were told but have not started.

Everything here is a pure function of records and a clock value; the service in
:mod:`otad.cloud.rollout` persists what these functions return, then acts on the commands.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from otad.errors import RolloutError

__layer__ = "pure"

# A device whose URL expired mid-download gets a fresh one this many times, then it has failed:
# an expiry that keeps recurring means the link is far slower than the lifetime assumes.
MAX_URL_REFRESHES = 3

# URL lifetime: a fixed allowance for queueing and reconnects plus the time to fetch the bundle
# at a pessimistic link speed (a cellular modem on a bad day), capped at a day.
URL_BASE_LIFETIME = 15 * 60
URL_ASSUMED_RATE = 64 * 1024  # bytes per second
URL_MAX_LIFETIME = 24 * 3600

EXPIRED_URL_CODE = "download_url_expired"
TIMEOUT_CODE = "wave_timeout"

_MAX_DEVICE_ID = 128
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class DeviceState(StrEnum):
    """Where one device stands in one rollout (stable strings: stored and printed)."""

    PENDING = "pending"  # in a wave that has not started
    ASSIGNED = "assigned"  # desired state set, no report of this job yet
    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    REBOOTING = "rebooting"
    VERIFYING = "verifying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"  # told, then withdrawn by an abort before it started
    SKIPPED = "skipped"  # never told: the rollout was aborted first


IN_FLIGHT = frozenset(
    {
        DeviceState.ASSIGNED,
        DeviceState.DOWNLOADING,
        DeviceState.INSTALLING,
        DeviceState.REBOOTING,
        DeviceState.VERIFYING,
    }
)
FAILURES = frozenset({DeviceState.FAILED, DeviceState.ROLLED_BACK, DeviceState.TIMED_OUT})
DONE = frozenset(
    {
        DeviceState.SUCCEEDED,
        DeviceState.FAILED,
        DeviceState.ROLLED_BACK,
        DeviceState.TIMED_OUT,
        DeviceState.CANCELLED,
        DeviceState.SKIPPED,
    }
)

# Reported agent states (docs/agent.md) -> rollout device state, for a report of *this* job.
_PROGRESS_STATES: Mapping[str, DeviceState] = {
    "downloading": DeviceState.DOWNLOADING,
    "installing": DeviceState.INSTALLING,
    "installed": DeviceState.INSTALLING,
    "rebooting": DeviceState.REBOOTING,
    "verifying": DeviceState.VERIFYING,
}


class RolloutState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"


ACTIVE = frozenset({RolloutState.RUNNING, RolloutState.PAUSED})


# --- parsing operator input -------------------------------------------------------------------


@dataclass(frozen=True)
class WaveStep:
    """One item of a wave spec: a cumulative device count, or a cumulative percentage."""

    value: float
    percent: bool

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else f"{int(self.value)}"


def parse_waves(text: str) -> tuple[WaveStep, ...]:
    """Parse ``1,10,50,100%``; raise :class:`RolloutError` naming the bad item."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise RolloutError(f"waves {text!r}: expected a comma-separated list like 1,10,50,100%")
    steps: list[WaveStep] = []
    for item in items:
        percent = item.endswith("%")
        number = item[:-1].strip() if percent else item
        if percent:
            value = _number(number, f"waves: {item!r} is not a percentage")
            if not 0 < value <= 100:
                raise RolloutError(f"waves: {item!r} must be above 0% and at most 100%")
        else:
            if not re.fullmatch(r"[0-9]+", number):
                raise RolloutError(f"waves: {item!r} is not a device count or a percentage")
            value = float(int(number))
            if value < 1:
                raise RolloutError(f"waves: {item!r} must be at least one device")
        steps.append(WaveStep(value, percent))
    return tuple(steps)


def plan_waves(steps: Sequence[WaveStep], device_count: int) -> tuple[int, ...]:
    """Cumulative device counts per wave for a fleet of ``device_count``; duplicates merge.

    A step beyond the fleet size is capped at the fleet size, so ``1,10,50,100%`` on 20 devices
    is three waves (1, 10, 20). The last step must reach every device: a rollout that silently
    leaves part of the list out would look finished when it is not.
    """
    if device_count < 1:
        raise RolloutError("rollout: no devices to update")
    if not steps:
        raise RolloutError("waves: at least one wave is needed")
    targets: list[int] = []
    last_of_kind: dict[bool, float] = {}
    for step in steps:
        # Same kind going down is a typo; a percentage below an earlier count (1,10,50%,100%
        # on 12 devices) just merges into it, so one plan fits fleets of any size.
        if step.value < last_of_kind.get(step.percent, 0.0):
            raise RolloutError(f"waves: {step} is smaller than the wave before it")
        last_of_kind[step.percent] = step.value
        raw = step.value * device_count / 100 if step.percent else step.value
        count = min(device_count, max(1, math.ceil(raw - 1e-9)))
        if not targets or count > targets[-1]:
            targets.append(count)
    if targets[-1] != device_count:
        raise RolloutError(
            f"waves reach {targets[-1]} of {device_count} devices; end the list with 100%"
        )
    return tuple(targets)


def parse_rate(text: str) -> float:
    """``5%`` or ``0.05`` -> 0.05; between 0 and 1 inclusive."""
    raw = text.strip()
    if raw.endswith("%"):
        value = _number(raw[:-1].strip(), f"failure rate {text!r} is not a percentage") / 100
    else:
        value = _number(raw, f"failure rate {text!r} is not a number or a percentage")
    if not 0 <= value <= 1:
        raise RolloutError(f"failure rate {text!r} must be between 0% and 100%")
    return value


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)([hms])")


def parse_duration(text: str) -> float:
    """``30m``, ``90s``, ``1h30m``, ``2h`` or plain seconds -> seconds (> 0)."""
    raw = text.strip().lower()
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", raw):
        seconds = float(raw)
    else:
        pos = 0
        seconds = 0.0
        seen: set[str] = set()
        for match in _DURATION_PART.finditer(raw):
            unit = match.group(2)
            if match.start() != pos or unit in seen:
                raise RolloutError(f"duration {text!r}: expected e.g. 30m, 90s or 1h30m")
            seen.add(unit)
            seconds += float(match.group(1)) * {"h": 3600, "m": 60, "s": 1}[unit]
            pos = match.end()
        if pos != len(raw) or not seen:
            raise RolloutError(f"duration {text!r}: expected e.g. 30m, 90s or 1h30m")
    if not math.isfinite(seconds) or seconds <= 0:
        raise RolloutError(f"duration {text!r} must be longer than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """Short human form: ``45s``, ``12m05s``, ``3h02m``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def parse_device_list(text: str) -> tuple[str, ...]:
    """``dev1,dev2`` -> ids in the given order, without repeats; every id checked."""
    ids: list[str] = []
    for item in text.split(","):
        device_id = item.strip()
        if not device_id:
            continue
        check_device_id(device_id)
        if device_id not in ids:
            ids.append(device_id)
    if not ids:
        raise RolloutError("rollout: the device list is empty")
    return tuple(ids)


def check_device_id(device_id: str) -> str:
    if len(device_id) > _MAX_DEVICE_ID or not _DEVICE_ID.fullmatch(device_id):
        raise RolloutError(
            f"device id {device_id!r} is not valid (letters, digits, '.', '_', ':', '-')"
        )
    return device_id


def check_group_name(name: str) -> str:
    if not _GROUP_NAME.fullmatch(name):
        raise RolloutError(f"group name {name!r} is not valid (letters, digits, '.', '_', '-')")
    return name


def url_lifetime(bundle_size: int) -> int:
    """Seconds a pre-signed URL stays valid for a bundle of this size."""
    if bundle_size < 0:
        raise RolloutError(f"bundle size {bundle_size} is negative")
    return min(URL_MAX_LIFETIME, URL_BASE_LIFETIME + math.ceil(bundle_size / URL_ASSUMED_RATE))


def _number(text: str, message: str) -> float:
    if not re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", text):
        raise RolloutError(message)
    return float(text)


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """One rollout as stored; ``current_wave`` is -1 until the first wave starts."""

    id: str
    artifact_id: str
    version: str
    bundle_size: int
    waves: tuple[int, ...]
    max_failure_rate: float
    wave_timeout: float
    created_at: float
    state: RolloutState = RolloutState.RUNNING
    reason: str = ""
    current_wave: int = -1
    wave_started_at: float | None = None
    accepted_waves: frozenset[int] = frozenset()
    updated_at: float = 0.0
    finished_at: float | None = None
    sha256: str | None = None
    # At most this many devices between "told" and an outcome at once (None: a whole wave at
    # once). Keeps a large wave from sending every device to the store in the same second.
    max_in_flight: int | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def wave_of(self, position: int) -> int:
        """The wave index of the device at ``position`` in the rollout's device list."""
        for index, target in enumerate(self.waves):
            if position < target:
                return index
        raise RolloutError(f"rollout {self.id}: position {position} is beyond the last wave")


@dataclass(frozen=True)
class DeviceRecord:
    """One device's outcome in one rollout."""

    device_id: str
    position: int
    wave: int
    state: DeviceState = DeviceState.PENDING
    job_id: str | None = None
    progress: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    url_refreshes: int = 0
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(frozen=True)
class DeviceSeen:
    """What the fleet last heard from a device (from its reported ``software``)."""

    device_id: str
    version: str | None
    slot: str | None
    state: str | None
    job_id: str | None
    error_code: str | None
    last_seen: float


def new_rollout(
    *,
    rollout_id: str,
    artifact_id: str,
    version: str,
    bundle_size: int,
    devices: Sequence[str],
    waves: Sequence[WaveStep],
    max_failure_rate: float,
    wave_timeout: float,
    now: float,
    sha256: str | None = None,
    max_in_flight: int | None = None,
) -> tuple[Rollout, tuple[DeviceRecord, ...]]:
    """A fresh rollout and its pending device records (devices keep the given order)."""
    if len(set(devices)) != len(devices):
        raise RolloutError("rollout: a device is listed twice")
    for device_id in devices:
        check_device_id(device_id)
    if not version:
        raise RolloutError("rollout: the artifact has no version")
    if not 0 <= max_failure_rate <= 1:
        raise RolloutError("rollout: max failure rate must be between 0 and 1")
    if not wave_timeout > 0:
        raise RolloutError("rollout: wave timeout must be longer than zero")
    if max_in_flight is not None and max_in_flight < 1:
        raise RolloutError("rollout: max in flight must be at least 1")
    plan = plan_waves(waves, len(devices))
    rollout = Rollout(
        id=rollout_id,
        artifact_id=artifact_id,
        version=version,
        bundle_size=bundle_size,
        waves=plan,
        max_failure_rate=max_failure_rate,
        wave_timeout=wave_timeout,
        created_at=now,
        updated_at=now,
        sha256=sha256,
        max_in_flight=max_in_flight,
    )
    records = tuple(
        DeviceRecord(device_id=d, position=i, wave=rollout.wave_of(i))
        for i, d in enumerate(devices)
    )
    return rollout, records


def job_id_for(rollout_id: str, url_refreshes: int) -> str:
    """The job id a device is given; a fresh URL comes with a fresh job id.

    The agent treats a job id it has seen as done (it never runs a job twice), so a new URL for
    a job that failed on an expired URL needs a new id to be acted on.
    """
    return rollout_id if url_refreshes == 0 else f"{rollout_id}.{url_refreshes}"


# --- commands the service carries out -----------------------------------------------------------


@dataclass(frozen=True)
class SetDesired:
    """Pre-sign a URL for this device and set its desired software with this job id."""

    device_id: str
    job_id: str


@dataclass(frozen=True)
class ClearDesired:
    """Withdraw the desired software of a device that has not started."""

    device_id: str


Command = SetDesired | ClearDesired


@dataclass(frozen=True)
class Decision:
    """What changed (to persist first) and what to do (after persisting)."""

    rollout: Rollout
    devices: tuple[DeviceRecord, ...] = ()
    commands: tuple[Command, ...] = ()
    events: tuple[tuple[str, dict[str, Any]], ...] = field(default=())

    @property
    def changed(self) -> bool:
        return bool(self.devices or self.commands or self.events)


# --- reports ------------------------------------------------------------------------------------


def apply_report(
    rollout: Rollout, record: DeviceRecord, software: Mapping[str, Any], now: float
) -> tuple[DeviceRecord, tuple[Command, ...]]:
    """Fold one reported ``software`` entry into the device's record.

    Reports about other jobs are ignored, except one that shows the device already runs the
    target version. A device that failed on an expired URL gets a fresh one (bounded). A device
    that timed out may still report success later: the record tells the truth, although the
    wave's decision has been taken.
    """
    if record.state in (DeviceState.PENDING, DeviceState.SKIPPED, DeviceState.CANCELLED):
        return record, ()
    if not isinstance(software, Mapping):
        return record, ()
    raw_state = software.get("state")
    state = raw_state if isinstance(raw_state, str) else None
    job = software.get("jobId")
    version = software.get("version")
    error = software.get("error")
    error_code, error_message = _error_fields(error)
    progress = software.get("progress")
    if isinstance(progress, bool) or not isinstance(progress, int) or not 0 <= progress <= 100:
        progress = None

    if job is not None and job == record.job_id:
        moving = _PROGRESS_STATES.get(state) if state is not None else None
        if moving is not None:
            if record.state in DONE and record.state != DeviceState.TIMED_OUT:
                return record, ()
            if error_code == EXPIRED_URL_CODE:
                # The agent keeps the job and waits for the same jobId with a new URL. The
                # record's error marks "a fresh URL was sent for this expiry", so the same
                # report seen twice (documents + accepted, a re-sent report) refreshes once.
                if record.error_code == EXPIRED_URL_CODE:
                    return record, ()
                if record.url_refreshes >= MAX_URL_REFRESHES:
                    return _finish(
                        record,
                        DeviceState.FAILED,
                        now,
                        EXPIRED_URL_CODE,
                        f"the download URL expired {record.url_refreshes + 1} times",
                    ), ()
                fresh = replace(
                    record,
                    state=moving,
                    progress=progress,
                    url_refreshes=record.url_refreshes + 1,
                    error_code=EXPIRED_URL_CODE,
                    error_message="the download URL expired; a fresh one was sent",
                )
                return fresh, (SetDesired(record.device_id, record.job_id or rollout.id),)
            return replace(
                record, state=moving, progress=progress, error_code=None, error_message=None
            ), ()
        if state == "succeeded" or (state == "idle" and version == rollout.version):
            return _finish(record, DeviceState.SUCCEEDED, now, None, None), ()
        if state == "failed":
            if error_code == EXPIRED_URL_CODE and record.url_refreshes < MAX_URL_REFRESHES:
                refreshes = record.url_refreshes + 1
                fresh = replace(
                    record,
                    state=DeviceState.ASSIGNED,
                    job_id=job_id_for(rollout.id, refreshes),
                    url_refreshes=refreshes,
                    progress=None,
                    finished_at=None,
                )
                return fresh, (SetDesired(record.device_id, fresh.job_id or rollout.id),)
            return _finish(
                record,
                DeviceState.FAILED,
                now,
                error_code or "failed",
                error_message or "the device reported a failure without an error",
            ), ()
        if state == "rolled_back":
            return _finish(
                record,
                DeviceState.ROLLED_BACK,
                now,
                error_code or "rolled_back",
                error_message or "the device went back to its previous version",
            ), ()
        return record, ()
    if (
        record.state in IN_FLIGHT
        and version == rollout.version
        and state in ("idle", "succeeded", None)
    ):
        # Already on the target (updated earlier, or by hand): nothing to install.
        return _finish(record, DeviceState.SUCCEEDED, now, None, None), ()
    return record, ()


def _finish(
    record: DeviceRecord,
    state: DeviceState,
    now: float,
    code: str | None,
    message: str | None,
) -> DeviceRecord:
    if record.state == state and record.error_code == code:
        return record
    return replace(
        record,
        state=state,
        error_code=code,
        error_message=message,
        finished_at=now,
        progress=100 if state == DeviceState.SUCCEEDED else record.progress,
    )


def _error_fields(error: object) -> tuple[str | None, str | None]:
    if not isinstance(error, Mapping):
        return None, None
    code = error.get("code")
    message = error.get("message")
    return (
        code if isinstance(code, str) and code else None,
        message[:500] if isinstance(message, str) and message else None,
    )


# --- the wave state machine ------------------------------------------------------------------


@dataclass(frozen=True)
class WaveTally:
    index: int
    size: int
    done: int
    failed: int
    succeeded: int

    @property
    def failure_rate(self) -> float:
        return self.failed / self.size if self.size else 0.0


def tally(rollout: Rollout, devices: Iterable[DeviceRecord], wave: int) -> WaveTally:
    members = [d for d in devices if d.wave == wave]
    return WaveTally(
        index=wave,
        size=len(members),
        done=sum(d.state in DONE for d in members),
        failed=sum(d.state in FAILURES for d in members),
        succeeded=sum(d.state == DeviceState.SUCCEEDED for d in members),
    )


def step(rollout: Rollout, devices: Mapping[str, DeviceRecord], now: float) -> Decision:
    """Advance the rollout as far as the records allow: time out, pause, start, complete."""
    if not rollout.active:
        return Decision(rollout)
    changed: dict[str, DeviceRecord] = {}
    commands: list[Command] = []
    events: list[tuple[str, dict[str, Any]]] = []
    current = dict(devices)

    def update(record: DeviceRecord) -> None:
        changed[record.device_id] = record
        current[record.device_id] = record

    # A bounded loop: each turn either starts the next wave or stops.
    for _ in range(len(rollout.waves) + 1):
        if rollout.current_wave < 0:
            if rollout.state != RolloutState.RUNNING:
                break
            rollout = _start_wave(rollout, 0, current, now, update, commands, events)
            continue
        wave = rollout.current_wave
        if (
            rollout.wave_started_at is not None
            and now - rollout.wave_started_at >= rollout.wave_timeout
        ):
            for record in current.values():
                if record.wave == wave and record.state in IN_FLIGHT:
                    update(
                        _finish(
                            record,
                            DeviceState.TIMED_OUT,
                            now,
                            TIMEOUT_CODE,
                            f"no outcome within the wave timeout of "
                            f"{format_duration(rollout.wave_timeout)}",
                        )
                    )
        counts = tally(rollout, current.values(), wave)
        over = counts.failure_rate > rollout.max_failure_rate
        if over and wave not in rollout.accepted_waves and rollout.state == RolloutState.RUNNING:
            reason = (
                f"wave {wave + 1}: {counts.failed} of {counts.size} devices failed "
                f"({counts.failure_rate:.0%} > {rollout.max_failure_rate:.0%} allowed)"
            )
            rollout = replace(rollout, state=RolloutState.PAUSED, reason=reason, updated_at=now)
            events.append(("rollout_paused", {"wave": wave + 1, "reason": reason}))
            break
        if counts.done < counts.size or rollout.state != RolloutState.RUNNING:
            if rollout.state == RolloutState.RUNNING and rollout.max_in_flight is not None:
                # A paced wave: devices that finished make room for the next ones.
                _start_devices(rollout, wave, current, now, update, commands)
            break
        if wave + 1 >= len(rollout.waves):
            rollout = replace(
                rollout,
                state=RolloutState.COMPLETED,
                reason="",
                finished_at=now,
                updated_at=now,
            )
            events.append(("rollout_completed", {"waves": len(rollout.waves)}))
            break
        rollout = _start_wave(rollout, wave + 1, current, now, update, commands, events)
    return Decision(rollout, tuple(changed.values()), tuple(commands), tuple(events))


def _start_wave(
    rollout: Rollout,
    wave: int,
    current: Mapping[str, DeviceRecord],
    now: float,
    update: Any,
    commands: list[Command],
    events: list[tuple[str, dict[str, Any]]],
) -> Rollout:
    started = _start_devices(rollout, wave, current, now, update, commands)
    events.append(("wave_started", {"wave": wave + 1, "devices": started}))
    return replace(rollout, current_wave=wave, wave_started_at=now, updated_at=now, reason="")


def _start_devices(
    rollout: Rollout,
    wave: int,
    current: Mapping[str, DeviceRecord],
    now: float,
    update: Any,
    commands: list[Command],
) -> int:
    """Tell pending devices of ``wave``, in order, as many as ``max_in_flight`` leaves room for."""
    room = len(current)
    if rollout.max_in_flight is not None:
        busy = sum(r.state in IN_FLIGHT for r in current.values())
        room = rollout.max_in_flight - busy
    if room <= 0:
        return 0
    pending = [r for r in current.values() if r.wave == wave and r.state == DeviceState.PENDING]
    pending.sort(key=lambda r: r.position)
    for record in pending[:room]:
        job_id = job_id_for(rollout.id, record.url_refreshes)
        update(replace(record, state=DeviceState.ASSIGNED, job_id=job_id, started_at=now))
        commands.append(SetDesired(record.device_id, job_id))
    return min(room, len(pending))


# --- operator actions ---------------------------------------------------------------------------


def pause(rollout: Rollout, now: float, reason: str = "paused by the operator") -> Rollout:
    if rollout.state != RolloutState.RUNNING:
        raise RolloutError(f"rollout {rollout.id} is {rollout.state}, only a running one pauses")
    return replace(rollout, state=RolloutState.PAUSED, reason=reason, updated_at=now)


def resume(rollout: Rollout, devices: Mapping[str, DeviceRecord], now: float) -> Rollout:
    """Run again; if the current wave is over the failure threshold the operator accepts it."""
    if rollout.state != RolloutState.PAUSED:
        raise RolloutError(f"rollout {rollout.id} is {rollout.state}, only a paused one resumes")
    accepted = rollout.accepted_waves
    if rollout.current_wave >= 0:
        counts = tally(rollout, devices.values(), rollout.current_wave)
        if counts.failure_rate > rollout.max_failure_rate:
            accepted = accepted | {rollout.current_wave}
    return replace(
        rollout,
        state=RolloutState.RUNNING,
        reason="",
        accepted_waves=frozenset(accepted),
        updated_at=now,
    )


def abort(rollout: Rollout, devices: Mapping[str, DeviceRecord], now: float) -> Decision:
    """End the rollout: skip devices never told, withdraw devices told but not started."""
    if not rollout.active:
        raise RolloutError(f"rollout {rollout.id} is {rollout.state} already")
    changed: list[DeviceRecord] = []
    commands: list[Command] = []
    for record in sorted(devices.values(), key=lambda r: r.position):
        if record.state == DeviceState.PENDING:
            changed.append(replace(record, state=DeviceState.SKIPPED, finished_at=now))
        elif record.state == DeviceState.ASSIGNED:
            changed.append(replace(record, state=DeviceState.CANCELLED, finished_at=now))
            commands.append(ClearDesired(record.device_id))
    aborted = replace(
        rollout,
        state=RolloutState.ABORTED,
        reason="aborted by the operator",
        finished_at=now,
        updated_at=now,
    )
    return Decision(
        aborted,
        tuple(changed),
        tuple(commands),
        (("rollout_aborted", {"skipped": len(changed) - len(commands)}),),
    )


def resend_commands(rollout: Rollout, devices: Iterable[DeviceRecord]) -> tuple[Command, ...]:
    """After a restart: repeat what may not have reached the replica before the crash.

    Setting the same desired state again is harmless (the agent runs a job id once), so the
    service repeats it for every device still waiting to start instead of tracking delivery.
    """
    if not rollout.active:
        return ()
    return tuple(
        SetDesired(d.device_id, d.job_id or job_id_for(rollout.id, d.url_refreshes))
        for d in sorted(devices, key=lambda r: r.position)
        if d.state == DeviceState.ASSIGNED
    )

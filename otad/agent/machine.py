"""The update state machine: a transition table, the job record, and the recovery decision.

Pure: no I/O. The journal (:mod:`otad.agent.journal`) stores :class:`JobRecord`; the update
runner applies events with :func:`advance` and stores the result *before* doing the step the new
state stands for ("persist, then act"). Every state's entry step is idempotent, so a restart that
re-enters a state repeats it safely.

States (stable strings, on disk and - through :func:`reported_state` - on the wire)::

    idle --download_started--> downloading --payload_verified--> installing
      downloading: the target is marked bad, the bundle streams into it (resume: download_resumed)
      installing:  every byte written; the slot is fsync'd, re-read and hashed (slot_verified)
    installing --slot_verified--> rebooting
      rebooting:   entry step: try_once(target), then request a reboot (reboot_requested)
    rebooting --booted_target--> verifying --health_passed--> succeeded
    verifying --health_failed--> rolling_back --booted_other--> rolled_back
    rebooting / verifying --booted_other--> rolled_back        (the bootloader fell back)
    downloading / installing / rebooting --cancelled / failed--> failed
    any unfinished state --loop_detected--> failed             (the loop breaker)

``succeeded``, ``failed`` and ``rolled_back`` are final, with one exception: a ``succeeded``
job whose committed target no longer boots (``booted_other`` after a reboot) becomes
``rolled_back`` - the device must not keep reporting success while it runs the old slot.
``rolling_back`` is reported as
``verifying``: the final report (``rolled_back``) is sent once the old slot actually runs.

:func:`decide_recovery` is the pure decision the agent takes on start from (journal record,
booted slot, bootloader state, did a reboot happen); ``tests/platform/test_machine.py`` checks it
over the whole cross product of its inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from otad.agent.bootloader import BootState, check_slot, other_slot
from otad.errors import BootFailed, HealthCheckFailed, JobError, RebootLoop, TransitionError

__layer__ = "pure"

#: Stored transitions after which an unfinished job is failed instead of retried (Mender uses
#: 28 too): it bounds every retry loop, including reboot loops, whatever their cause.
MAX_TRANSITIONS = 28


class State(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    REBOOTING = "rebooting"
    VERIFYING = "verifying"
    ROLLING_BACK = "rolling_back"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class Event(StrEnum):
    DOWNLOAD_STARTED = "download_started"
    DOWNLOAD_RESUMED = "download_resumed"
    INSTALL_RESUMED = "install_resumed"
    PAYLOAD_VERIFIED = "payload_verified"
    SLOT_VERIFIED = "slot_verified"
    REBOOT_REQUESTED = "reboot_requested"
    BOOTED_TARGET = "booted_target"
    BOOTED_OTHER = "booted_other"
    HEALTH_PASSED = "health_passed"
    HEALTH_FAILED = "health_failed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    LOOP_DETECTED = "loop_detected"


FINAL_STATES: frozenset[State] = frozenset({State.SUCCEEDED, State.FAILED, State.ROLLED_BACK})
UNFINISHED_STATES: frozenset[State] = frozenset(
    {State.DOWNLOADING, State.INSTALLING, State.REBOOTING, State.VERIFYING, State.ROLLING_BACK}
)

_S, _E = State, Event
TRANSITIONS: Mapping[tuple[State, Event], State] = {
    (_S.IDLE, _E.DOWNLOAD_STARTED): _S.DOWNLOADING,
    # a final record is replaced by the next job: starting a job is allowed from every end state
    (_S.SUCCEEDED, _E.DOWNLOAD_STARTED): _S.DOWNLOADING,
    # a committed target that later stops booting: the bootloader fell back, say so
    (_S.SUCCEEDED, _E.BOOTED_OTHER): _S.ROLLED_BACK,
    (_S.FAILED, _E.DOWNLOAD_STARTED): _S.DOWNLOADING,
    (_S.ROLLED_BACK, _E.DOWNLOAD_STARTED): _S.DOWNLOADING,
    (_S.DOWNLOADING, _E.DOWNLOAD_RESUMED): _S.DOWNLOADING,
    (_S.DOWNLOADING, _E.PAYLOAD_VERIFIED): _S.INSTALLING,
    (_S.DOWNLOADING, _E.CANCELLED): _S.FAILED,
    (_S.DOWNLOADING, _E.FAILED): _S.FAILED,
    (_S.DOWNLOADING, _E.LOOP_DETECTED): _S.FAILED,
    (_S.INSTALLING, _E.INSTALL_RESUMED): _S.INSTALLING,
    (_S.INSTALLING, _E.SLOT_VERIFIED): _S.REBOOTING,
    (_S.INSTALLING, _E.CANCELLED): _S.FAILED,
    (_S.INSTALLING, _E.FAILED): _S.FAILED,
    (_S.INSTALLING, _E.LOOP_DETECTED): _S.FAILED,
    (_S.REBOOTING, _E.REBOOT_REQUESTED): _S.REBOOTING,
    (_S.REBOOTING, _E.BOOTED_TARGET): _S.VERIFYING,
    (_S.REBOOTING, _E.BOOTED_OTHER): _S.ROLLED_BACK,
    (_S.REBOOTING, _E.CANCELLED): _S.FAILED,
    (_S.REBOOTING, _E.FAILED): _S.FAILED,
    (_S.REBOOTING, _E.LOOP_DETECTED): _S.FAILED,
    (_S.VERIFYING, _E.BOOTED_TARGET): _S.VERIFYING,
    (_S.VERIFYING, _E.HEALTH_PASSED): _S.SUCCEEDED,
    (_S.VERIFYING, _E.HEALTH_FAILED): _S.ROLLING_BACK,
    (_S.VERIFYING, _E.BOOTED_OTHER): _S.ROLLED_BACK,
    (_S.VERIFYING, _E.FAILED): _S.FAILED,
    (_S.VERIFYING, _E.LOOP_DETECTED): _S.FAILED,
    (_S.ROLLING_BACK, _E.REBOOT_REQUESTED): _S.ROLLING_BACK,
    (_S.ROLLING_BACK, _E.BOOTED_OTHER): _S.ROLLED_BACK,
    (_S.ROLLING_BACK, _E.FAILED): _S.FAILED,
    (_S.ROLLING_BACK, _E.LOOP_DETECTED): _S.FAILED,
}

_REPORTED: Mapping[State, str] = {
    State.IDLE: "idle",
    State.DOWNLOADING: "downloading",
    State.INSTALLING: "installing",
    State.REBOOTING: "rebooting",
    State.VERIFYING: "verifying",
    State.ROLLING_BACK: "verifying",
    State.SUCCEEDED: "succeeded",
    State.FAILED: "failed",
    State.ROLLED_BACK: "rolled_back",
}

#: The states the shadow ``reported.software.state`` may carry.
REPORT_STATES: tuple[str, ...] = (
    "idle",
    "downloading",
    "installing",
    "rebooting",
    "verifying",
    "succeeded",
    "failed",
    "rolled_back",
)


def transition(state: State | str, event: Event | str) -> State:
    """The state after ``event`` in ``state``; TransitionError for a pair not in the table."""
    try:
        key = (State(state), Event(event))
    except ValueError as exc:
        raise TransitionError(
            f"machine: unknown state or event {state!r} / {event!r}", state=str(state)
        ) from exc
    try:
        return TRANSITIONS[key]
    except KeyError:
        raise TransitionError(
            f"machine: event {key[1].value!r} is not allowed in state {key[0].value!r}",
            state=key[0].value,
            event=key[1].value,
        ) from None


def reported_state(state: State | str) -> str:
    """The state string reported on the shadow for a stored state."""
    return _REPORTED[State(state)]


@dataclass(frozen=True)
class JobRecord:
    """The journaled job in flight (or the last one, once final).

    ``bundle_url`` is stored so a restart can resume; it may carry a pre-signed credential in its
    query: never log it. ``runtime`` is the runner's own extensible data (resume offsets, ETag,
    manifest fields ...); values must be JSON-serialisable. ``boot_id`` is the kernel boot id at
    the last store, so "did a reboot happen since" is a fact. ``transitions`` counts the stored
    transitions of this job (the loop breaker); ``last_event`` is the event of the last one.
    ``reported``: the final state was acknowledged.
    """

    job_id: str
    state: State
    target_slot: str
    version: str
    bundle_url: str = ""
    from_version: str = ""
    boot_id: str = ""
    transitions: int = 0
    last_event: str = ""
    reported: bool = False
    error: Mapping[str, str] | None = None
    created: float = 0.0
    updated: float = 0.0
    runtime: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_slot(self.target_slot)
        object.__setattr__(self, "state", State(self.state))

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def __repr__(self) -> str:
        # the URL may hold a pre-signed credential: keep it out of reprs (tracebacks, logs)
        return (
            f"JobRecord(job_id={self.job_id!r}, state={self.state.value!r}, "
            f"target_slot={self.target_slot!r}, version={self.version!r}, "
            f"transitions={self.transitions}, reported={self.reported})"
        )


def advance(
    record: JobRecord,
    event: Event | str,
    *,
    boot_id: str,
    now: float,
    **changes: Any,
) -> JobRecord:
    """The record after ``event``: new state, one more stored transition, this boot's id.

    ``changes`` replaces other fields (``error=``, ``runtime=``, ...). A final state resets
    ``reported`` unless the caller says otherwise. Raises TransitionError.
    """
    new_state = transition(record.state, event)
    fields: dict[str, Any] = {"reported": False} if new_state in FINAL_STATES else {}
    fields["last_event"] = Event(event).value
    fields.update(changes)
    return dataclasses.replace(
        record,
        state=new_state,
        transitions=record.transitions + 1,
        boot_id=boot_id,
        updated=now,
        **fields,
    )


def error_wire(code: str, message: str) -> dict[str, str]:
    """The ``error`` object of a record/report."""
    return {"code": code, "message": message}


# --- recovery --------------------------------------------------------------------------------


class Step(StrEnum):
    """What the agent does after a (re)start, once the action's bootloader marks are applied."""

    NONE = "none"  # nothing in flight
    REPORT = "report"  # a final state whose report was not acknowledged: send it
    RESUME_DOWNLOAD = "resume_download"  # continue streaming into the (bad) target
    REVERIFY_SLOT = "reverify_slot"  # re-read + hash the target, then switch and reboot
    SWITCH_AND_REBOOT = "switch_and_reboot"  # try_once(target), then reboot
    VERIFY = "verify"  # the target runs: run the health checks
    COMMIT = "commit"  # the bootloader already committed the target: finish the job
    ROLLBACK = "rollback"  # mark the target bad and reboot into the other slot
    FINISH = "finish"  # the job ended (failed / rolled_back): store it, then report

    @property
    def retries(self) -> bool:
        """A step that may repeat on every restart: the loop breaker bounds these."""
        return self in _RETRYING


_RETRYING = frozenset(
    {
        Step.RESUME_DOWNLOAD,
        Step.REVERIFY_SLOT,
        Step.SWITCH_AND_REBOOT,
        Step.VERIFY,
        Step.ROLLBACK,
    }
)


@dataclass(frozen=True)
class RecoveryAction:
    """The decision; the agent applies it in this order:

    1. ``mark_bad``: bootloader.mark_bad(slot) (always safe first: it only removes a choice);
    2. ``event``: journal ``advance(record, event, error=error)`` (persist, then act);
    3. ``confirm``: bootloader.mark_good(slot) - the booted slot, known good, confirmed for
       this boot (both schemes consume an attempt on every boot). Never a slot on trial.
       Before the step: SWITCH_AND_REBOOT's try_once must come after it (mark_good reorders).
    4. ``step``. SWITCH_AND_REBOOT and ROLLBACK carry no event: their step journals
       ``reboot_requested`` itself, after try_once / mark_bad, so the record tells whether the
       switch reached the bootloader (``last_event``).
    """

    step: Step
    event: Event | None = None
    mark_bad: str | None = None
    confirm: str | None = None
    error: Mapping[str, str] | None = None
    reason: str = ""


def _needs_confirm(boot: BootState, slot: str) -> bool:
    """Is a mark_good(slot) needed for the booted, known-good slot to stay the default?

    Yes unless it is committed, first, and still has all its attempts: both schemes consume
    one at every boot, so without a confirmation a committed slot falls back after them.
    """
    state = boot.slot(slot)
    return not (state.good and boot.next_boot() == slot and state.tries_left >= boot.full_tries)


def _confirm(boot: BootState, booted: str) -> str | None:
    return booted if _needs_confirm(boot, booted) else None


def _ensure_bad(boot: BootState, slot: str, booted: str) -> str | None:
    """mark_bad(slot) unless it is already bad; never the booted slot when the other slot is
    not bootable, so a device is never left without a bootable slot."""
    if boot.slot(slot).bad:
        return None
    if slot == booted and not boot.slot(other_slot(slot)).bootable:
        return None
    return slot


def decide_recovery(
    record: JobRecord | None,
    booted_slot: str,
    boot_state: BootState,
    rebooted: bool,
    *,
    max_transitions: int = MAX_TRANSITIONS,
) -> RecoveryAction:
    """What to do on start, from facts only. Pure; total over its inputs.

    ``rebooted``: the kernel boot id differs from the one stored with ``record``.
    """
    check_slot(booted_slot)
    if record is None or record.state == State.IDLE:
        return RecoveryAction(Step.NONE, confirm=_confirm(boot_state, booted_slot), reason="no job")
    action = _decide(record, booted_slot, boot_state, rebooted)
    if action.step.retries and record.transitions >= max_transitions:
        return _loop_broken(record, booted_slot, boot_state)
    return action


def _decide(record: JobRecord, booted: str, boot: BootState, rebooted: bool) -> RecoveryAction:
    target = record.target_slot
    on_target = booted == target
    target_state = boot.slot(target)

    if record.final:
        return _decide_final(record, booted, boot, rebooted)

    if on_target and record.state == State.DOWNLOADING:
        # mark_bad(target) comes before the first byte, so a target the bootloader could boot
        # was never written: it runs its old, good content (the power went before mark_bad
        # and the old slot's confirmation). The job cannot go on - its target runs - but the
        # running slot is sound: confirm it, leave it bootable, report the failure.
        message = (
            f"slot {target} booted before the download into it began; nothing was written to it"
        )
        return RecoveryAction(
            Step.FINISH,
            event=Event.FAILED,
            confirm=_confirm(boot, booted),
            error=error_wire(JobError.code, message),
            reason=message,
        )
    if on_target and record.state == State.INSTALLING:
        # every byte was written after mark_bad: a bootloader that boots it is not following
        # the env; the content is unverified, so it is not confirmed
        return _inconsistent(record, booted, boot, "the target slot runs while being written")

    if record.state == State.DOWNLOADING:
        return RecoveryAction(
            Step.RESUME_DOWNLOAD,
            event=Event.DOWNLOAD_RESUMED,
            mark_bad=_ensure_bad(boot, target, booted),
            confirm=_confirm(boot, booted),
            reason="download interrupted" + (" by a reboot" if rebooted else ""),
        )

    if record.state == State.INSTALLING:
        # journaled before the re-read: an agent that dies in it (out of memory, a hung medium
        # and the watchdog) counts a transition at every start, so the loop breaker ends it
        return RecoveryAction(
            Step.REVERIFY_SLOT,
            event=Event.INSTALL_RESUMED,
            mark_bad=_ensure_bad(boot, target, booted),
            confirm=_confirm(boot, booted),
            reason="install interrupted before the slot was verified",
        )

    if record.state == State.REBOOTING:
        if on_target:
            if not rebooted:
                return _inconsistent(record, booted, boot, "target runs without a reboot")
            if target_state.good:
                # crash after mark_good and before the journal said so
                return RecoveryAction(
                    Step.COMMIT,
                    event=Event.BOOTED_TARGET,
                    reason="target booted and is already committed",
                )
            return RecoveryAction(Step.VERIFY, event=Event.BOOTED_TARGET, reason="target booted")
        switched = record.last_event == Event.REBOOT_REQUESTED.value
        if not rebooted or target_state.bootable or (target_state.bad and not switched):
            # no reboot yet; or the bootloader never tried the target (it still has its try,
            # or the power went before try_once reached the env): switch (again) and reboot
            return RecoveryAction(
                Step.SWITCH_AND_REBOOT,
                confirm=_confirm(boot, booted),
                reason="reboot into the target not done yet",
            )
        # the try was used (or the target was already marked bad after it): it fell back
        return _boot_failed(record, booted, boot, "the target slot did not come up")

    if record.state == State.VERIFYING:
        if on_target:
            if target_state.good:
                return RecoveryAction(
                    Step.COMMIT,
                    event=Event.HEALTH_PASSED,
                    reason="target committed in the bootloader before the journal",
                )
            return RecoveryAction(
                Step.VERIFY, event=Event.BOOTED_TARGET, reason="verification interrupted"
            )
        if not rebooted:
            return _inconsistent(record, booted, boot, "the other slot runs without a reboot")
        return _boot_failed(record, booted, boot, "the target slot fell back during verification")

    # ROLLING_BACK
    if on_target:
        return RecoveryAction(
            Step.ROLLBACK, mark_bad=_ensure_bad(boot, target, booted), reason="rollback interrupted"
        )
    return RecoveryAction(
        Step.FINISH,
        event=Event.BOOTED_OTHER,
        mark_bad=_ensure_bad(boot, target, booted),
        confirm=_confirm(boot, booted),
        error=record.error
        or error_wire(HealthCheckFailed.code, "the health check failed on the target slot"),
        reason="rolled back to the previous slot",
    )


def _decide_final(
    record: JobRecord, booted: str, boot: BootState, rebooted: bool
) -> RecoveryAction:
    target = record.target_slot
    on_target = booted == target
    step = Step.NONE if record.reported else Step.REPORT
    if record.state == State.SUCCEEDED:
        if not on_target and rebooted:
            # the committed target stopped booting and the bootloader fell back
            message = f"slot {target} was committed but the bootloader fell back to slot {booted}"
            return RecoveryAction(
                Step.FINISH,
                event=Event.BOOTED_OTHER,
                mark_bad=_ensure_bad(boot, target, booted),
                confirm=_confirm(boot, booted),
                error=error_wire(BootFailed.code, message),
                reason=message,
            )
        return RecoveryAction(step, confirm=_confirm(boot, booted), reason="job succeeded")
    mark_bad = _ensure_bad(boot, target, booted)
    if on_target:
        # e.g. a loop breaker that stopped on the target: it stays unconfirmed
        return RecoveryAction(step, mark_bad=mark_bad, reason=f"job {record.state.value}")
    return RecoveryAction(
        step, mark_bad=mark_bad, confirm=_confirm(boot, booted), reason=f"job {record.state.value}"
    )


def _boot_failed(record: JobRecord, booted: str, boot: BootState, reason: str) -> RecoveryAction:
    return RecoveryAction(
        Step.FINISH,
        event=Event.BOOTED_OTHER,
        mark_bad=_ensure_bad(boot, record.target_slot, booted),
        confirm=_confirm(boot, booted),
        error=error_wire(BootFailed.code, reason),
        reason=reason,
    )


def _inconsistent(record: JobRecord, booted: str, boot: BootState, why: str) -> RecoveryAction:
    target = record.target_slot
    return RecoveryAction(
        Step.FINISH,
        event=Event.FAILED if (record.state, Event.FAILED) in TRANSITIONS else Event.LOOP_DETECTED,
        mark_bad=_ensure_bad(boot, target, booted),
        confirm=None if booted == target else _confirm(boot, booted),
        error=error_wire(JobError.code, f"inconsistent state after restart: {why}"),
        reason=why,
    )


def _loop_broken(record: JobRecord, booted: str, boot: BootState) -> RecoveryAction:
    target = record.target_slot
    message = f"stopped after {record.transitions} stored transitions in {record.state.value}"
    return RecoveryAction(
        Step.FINISH,
        event=Event.LOOP_DETECTED,
        mark_bad=_ensure_bad(boot, target, booted),
        confirm=None if booted == target else _confirm(boot, booted),
        error=error_wire(RebootLoop.code, message),
        reason="loop breaker",
    )

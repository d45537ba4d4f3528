"""The transition table and the recovery decision, checked over the whole input space."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from otad.agent.bootloader import SLOTS, BootState, SlotBoot, other_slot
from otad.agent.bootloader.sim import SimBootloader
from otad.agent.machine import (
    FINAL_STATES,
    MAX_TRANSITIONS,
    REPORT_STATES,
    TRANSITIONS,
    UNFINISHED_STATES,
    Event,
    JobRecord,
    RecoveryAction,
    State,
    Step,
    advance,
    decide_recovery,
    reported_state,
    transition,
)
from otad.errors import TransitionError

# --- the table -----------------------------------------------------------------------------


def test_machine_every_pair_outside_the_table_raises() -> None:
    for state, event in itertools.product(State, Event):
        if (state, event) in TRANSITIONS:
            assert transition(state, event) == TRANSITIONS[(state, event)]
        else:
            with pytest.raises(TransitionError) as info:
                transition(state, event)
            assert info.value.code == "invalid_transition"
            assert state.value in str(info.value) and event.value in str(info.value)


def test_machine_unknown_strings_raise_transition_error() -> None:
    with pytest.raises(TransitionError):
        transition("nonsense", "download_started")
    with pytest.raises(TransitionError):
        transition("idle", "nonsense")


def test_machine_happy_path_reaches_succeeded() -> None:
    path = [
        Event.DOWNLOAD_STARTED,
        Event.PAYLOAD_VERIFIED,
        Event.SLOT_VERIFIED,
        Event.REBOOT_REQUESTED,
        Event.BOOTED_TARGET,
        Event.HEALTH_PASSED,
    ]
    state = State.IDLE
    for event in path:
        state = transition(state, event)
    assert state == State.SUCCEEDED


def test_machine_health_failure_path_reaches_rolled_back() -> None:
    state = State.VERIFYING
    for event in (Event.HEALTH_FAILED, Event.REBOOT_REQUESTED, Event.BOOTED_OTHER):
        state = transition(state, event)
    assert state == State.ROLLED_BACK


def test_machine_final_states_only_start_a_new_job() -> None:
    for state in FINAL_STATES:
        allowed = {e for (s, e) in TRANSITIONS if s == state}
        extra = {Event.BOOTED_OTHER} if state == State.SUCCEEDED else set()
        assert allowed == {Event.DOWNLOAD_STARTED} | extra


def test_machine_every_unfinished_state_has_a_loop_breaker_and_reaches_an_end() -> None:
    for state in UNFINISHED_STATES:
        assert transition(state, Event.LOOP_DETECTED) == State.FAILED
    # every state is reachable from idle and reaches a final state
    reachable = {State.IDLE}
    frontier = [State.IDLE]
    while frontier:
        here = frontier.pop()
        for (s, _), nxt in TRANSITIONS.items():
            if s == here and nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(State)


def test_machine_cancel_is_possible_only_before_the_target_runs() -> None:
    cancellable = {s for (s, e) in TRANSITIONS if e == Event.CANCELLED}
    assert cancellable == {State.DOWNLOADING, State.INSTALLING, State.REBOOTING}


def test_machine_reported_states_are_the_wire_states() -> None:
    assert {reported_state(s) for s in State} == set(REPORT_STATES)
    assert reported_state(State.ROLLING_BACK) == "verifying"


def test_machine_advance_counts_and_stamps() -> None:
    rec = JobRecord(job_id="j1", state=State.IDLE, target_slot="B", version="2.0")
    rec = advance(rec, Event.DOWNLOAD_STARTED, boot_id="b1", now=5.0)
    assert (rec.state, rec.transitions, rec.boot_id, rec.updated) == (
        State.DOWNLOADING,
        1,
        "b1",
        5.0,
    )
    rec = advance(rec, Event.FAILED, boot_id="b1", now=6.0, error={"code": "x", "message": "y"})
    assert rec.state == State.FAILED and rec.transitions == 2 and not rec.reported
    assert rec.error == {"code": "x", "message": "y"}
    with pytest.raises(TransitionError):
        advance(rec, Event.HEALTH_PASSED, boot_id="b1", now=7.0)


def test_machine_record_repr_hides_the_url() -> None:
    rec = JobRecord(
        job_id="j",
        state=State.DOWNLOADING,
        target_slot="A",
        version="1",
        bundle_url="https://h/x?sig=s",
    )
    assert "sig=" not in repr(rec)


def test_machine_record_rejects_unknown_slot_and_state() -> None:
    with pytest.raises(ValueError, match="slot"):
        JobRecord(job_id="j", state=State.IDLE, target_slot="C", version="1")
    with pytest.raises(ValueError, match="bogus"):
        JobRecord(job_id="j", state="bogus", target_slot="A", version="1")  # type: ignore[arg-type]


# --- the recovery decision over the whole input space ----------------------------------------

SLOT_STATES = {
    "bad": SlotBoot(bad=True, tries_left=0, good=False),
    "tried": SlotBoot(bad=False, tries_left=0, good=False),
    "trial": SlotBoot(bad=False, tries_left=1, good=False),
    "good": SlotBoot(bad=False, tries_left=3, good=True),
    "good_consumed": SlotBoot(bad=False, tries_left=0, good=True),
}


def boot_states(target: str) -> list[tuple[str, BootState]]:
    other = other_slot(target)
    out = []
    for (tn, ts), (on, os_), first, full in itertools.product(
        SLOT_STATES.items(), SLOT_STATES.items(), ("target", "other"), (1, 3)
    ):
        order = (target, other) if first == "target" else (other, target)
        out.append(
            (
                f"target_{tn}__other_{on}__{first}_first__full_{full}",
                BootState(order, {target: ts, other: os_}, full_tries=full),
            )
        )
    return out


def records(target: str) -> list[tuple[str, JobRecord | None]]:
    out: list[tuple[str, JobRecord | None]] = [("no_record", None)]
    for state, reported, count in itertools.product(State, (False, True), (0, MAX_TRANSITIONS)):
        # every event that can have led into the state (and none, as an old record has)
        incoming = ["", *sorted({e.value for (_, e), nxt in TRANSITIONS.items() if nxt == state})]
        for last in incoming:
            rec = JobRecord(
                job_id="j1",
                state=state,
                target_slot=target,
                version="2.0",
                transitions=count,
                last_event=last,
                reported=reported,
                boot_id="boot-1",
            )
            name = f"{state.value}__after_{last or 'nothing'}__reported_{reported}__n_{count}"
            out.append((name, rec))
    return out


CASES = [
    (
        f"{rname}__booted_{'target' if booted == target else 'other'}"
        f"__rebooted_{rebooted}__{bname}",
        rec,
        booted,
        bstate,
        rebooted,
    )
    for target in SLOTS
    for rname, rec in records(target)
    for booted in SLOTS
    for rebooted in (False, True)
    for bname, bstate in boot_states(target)
]


def check_safety(
    rec: JobRecord | None, booted: str, boot: BootState, rebooted: bool, act: RecoveryAction
) -> None:
    """The properties every decision keeps, whatever the inputs."""
    # the event, if any, is legal from the stored state
    if act.event is not None:
        assert rec is not None
        after = transition(rec.state, act.event)
    else:
        after = rec.state if rec is not None else State.IDLE
    # a download target that boots was never written (mark_bad precedes every byte)
    never_written = rec is not None and rec.state == State.DOWNLOADING and rec.target_slot == booted
    # confirm only ever names the booted slot, and never one on trial
    if act.confirm is not None:
        assert act.confirm == booted
        if rec is not None and rec.target_slot == booted and rec.state != State.IDLE:
            assert after == State.SUCCEEDED or act.step == Step.COMMIT or never_written
    # never mark the only bootable slot bad while running on it
    if act.mark_bad is not None:
        assert not (act.mark_bad == booted and not boot.slot(other_slot(booted)).bootable)
        assert act.mark_bad == (rec.target_slot if rec is not None else None)
    if rec is None or rec.state == State.IDLE:
        assert act.step == Step.NONE and act.event is None and act.mark_bad is None
        return
    target = rec.target_slot
    target_was_bad = boot.slot(target).bad
    target_ends_bad = target_was_bad or act.mark_bad == target
    # commit only the slot that runs
    if act.step == Step.COMMIT or (after == State.SUCCEEDED and act.event is not None):
        assert booted == target
    # a target being written or just written (unverified) is never left bootable
    if act.step in (Step.RESUME_DOWNLOAD, Step.REVERIFY_SLOT):
        assert target_ends_bad and booted != target
    # a job that ends failed / rolled back leaves its target unbootable, unless it runs on the
    # target and the other slot cannot boot (then the device must stay bootable)
    if after in (State.FAILED, State.ROLLED_BACK) and not target_ends_bad and not never_written:
        assert booted == target and not boot.slot(other_slot(target)).bootable
    # reboots go the right way
    if act.step == Step.SWITCH_AND_REBOOT:
        assert booted != target
        # a target that used its try is never given another one
        target_state = boot.slot(target)
        used = not target_state.bootable and (
            not target_state.bad or rec.last_event == Event.REBOOT_REQUESTED.value
        )
        assert not (rebooted and used)
    if act.error is not None and act.error["code"] == "boot_failed":
        assert booted != target
        if rec.state == State.REBOOTING:  # the target never ran: only a used try is a failure
            assert not boot.slot(target).bootable
    if act.step == Step.ROLLBACK:
        assert booted == target
        assert target_ends_bad or not boot.slot(other_slot(target)).bootable
    if act.step == Step.VERIFY:
        assert booted == target and (rebooted or rec.state == State.VERIFYING)
    # the loop breaker holds: past the bound nothing is retried
    if rec.transitions >= MAX_TRANSITIONS:
        assert not act.step.retries
    # a final job causes no event and at most its report - except a committed target that
    # the bootloader no longer boots: that success is over, it becomes rolled_back
    if rec.final:
        if rec.state == State.SUCCEEDED and booted != target and rebooted:
            assert act.event == Event.BOOTED_OTHER and act.step == Step.FINISH
            assert act.error is not None and act.error["code"] == "boot_failed"
        else:
            assert act.event is None
            assert act.step == (Step.NONE if rec.reported else Step.REPORT)
    else:
        # an unfinished job always moves: an event is stored, or the step journals one itself
        # (switch and rollback store reboot_requested after their bootloader write)
        assert act.event is not None or act.step in (Step.SWITCH_AND_REBOOT, Step.ROLLBACK)
    # a job that is over (or none) leaves the running slot confirmed, unless it is the target
    # and the job did not succeed (its content never passed the health check)
    if act.step in (Step.NONE, Step.REPORT, Step.FINISH) and not (
        booted == target and after != State.SUCCEEDED and not never_written
    ):
        state = boot.slot(booted)
        confirmed = (
            state.good and boot.next_boot() == booted and state.tries_left >= boot.full_tries
        )
        assert act.confirm == booted or confirmed
    # never "succeeded" while the other slot runs after a reboot
    if rec.state == State.SUCCEEDED and booted != target and rebooted:
        assert after != State.SUCCEEDED
    if act.event is not None and after in FINAL_STATES:
        assert act.step in (Step.FINISH, Step.COMMIT)
        if after != State.SUCCEEDED:
            assert act.error is not None and act.error["code"]


@pytest.mark.parametrize("record_kind", sorted({c[0].split("__booted_")[0] for c in CASES}))
def test_machine_recovery_keeps_the_safety_properties(record_kind: str) -> None:
    # one test per stored record kind; the case id names the failing combination
    cases = [c for c in CASES if c[0].split("__booted_")[0] == record_kind]
    assert cases
    for case_id, rec, booted, bstate, rebooted in cases:
        act = decide_recovery(rec, booted, bstate, rebooted)
        try:
            check_safety(rec, booted, bstate, rebooted, act)
        except AssertionError as exc:
            raise AssertionError(f"{case_id}: {act}") from exc


def test_machine_recovery_cross_product_size() -> None:
    # 2 targets x records (state x last event x reported x counter) x 2 booted x 2 rebooted
    # x 100 bootloader states
    assert len(CASES) == 2 * len(records("A")) * 2 * 2 * 100 > 30_000


# --- the named cases a reader checks first ---------------------------------------------------


def rec_in(state: State, **kw: object) -> JobRecord:
    return dataclasses.replace(
        JobRecord(job_id="j1", state=state, target_slot="B", version="2.0", boot_id="b0"), **kw
    )


GOOD = SlotBoot(tries_left=3, good=True)
BAD = SlotBoot(bad=True)
TRIED = SlotBoot(tries_left=0)
TRIAL = SlotBoot(tries_left=1)


def boot(a: SlotBoot, b: SlotBoot, order: tuple[str, ...] = ("A", "B")) -> BootState:
    return BootState(order, {"A": a, "B": b})


def test_machine_recovery_booted_target_after_reboot_runs_the_health_check() -> None:
    act = decide_recovery(rec_in(State.REBOOTING), "B", boot(GOOD, TRIED, ("B", "A")), True)
    assert act.step == Step.VERIFY and act.event == Event.BOOTED_TARGET
    assert act.confirm is None and act.mark_bad is None


def test_machine_recovery_fallback_reports_boot_failed() -> None:
    rec = rec_in(State.REBOOTING, last_event="reboot_requested")
    act = decide_recovery(rec, "A", boot(SlotBoot(good=True), TRIED), True)
    assert act.step == Step.FINISH and act.event == Event.BOOTED_OTHER
    assert act.error is not None and act.error["code"] == "boot_failed"
    assert act.mark_bad == "B" and act.confirm == "A"


def test_machine_recovery_power_cut_before_the_switch_switches_again() -> None:
    rec = rec_in(State.REBOOTING, last_event="slot_verified")
    used = BootState(("A", "B"), {"A": SlotBoot(tries_left=2, good=True), "B": BAD}, full_tries=3)
    act = decide_recovery(rec, "A", used, True)
    assert act.step == Step.SWITCH_AND_REBOOT and act.event is None
    assert act.confirm == "A"  # the old slot is confirmed before try_once reorders


def test_machine_recovery_target_marked_bad_after_its_try_is_boot_failed() -> None:
    # fallback seen, mark_bad done, power gone before the journal said rolled_back
    rec = rec_in(State.REBOOTING, last_event="reboot_requested")
    act = decide_recovery(rec, "A", boot(GOOD, BAD), True)
    assert act.step == Step.FINISH and act.error is not None
    assert act.error["code"] == "boot_failed"


def test_machine_recovery_untried_target_is_switched_again() -> None:
    rec = rec_in(State.REBOOTING, last_event="reboot_requested")
    act = decide_recovery(rec, "A", boot(GOOD, TRIAL, ("A", "B")), True)
    assert act.step == Step.SWITCH_AND_REBOOT


def test_machine_recovery_crash_before_reboot_reboots() -> None:
    act = decide_recovery(rec_in(State.REBOOTING), "A", boot(GOOD, TRIAL, ("B", "A")), False)
    assert act.step == Step.SWITCH_AND_REBOOT and act.event is None


def test_machine_recovery_committed_in_bootloader_finishes_commit() -> None:
    act = decide_recovery(rec_in(State.VERIFYING), "B", boot(GOOD, GOOD, ("B", "A")), False)
    assert act.step == Step.COMMIT and act.event == Event.HEALTH_PASSED


def test_machine_recovery_interrupted_download_resumes_with_target_bad() -> None:
    act = decide_recovery(rec_in(State.DOWNLOADING), "A", boot(GOOD, GOOD), True)
    assert act.step == Step.RESUME_DOWNLOAD and act.mark_bad == "B"


def test_machine_recovery_rollback_finishes_on_the_old_slot() -> None:
    err = {"code": "health_check_failed", "message": "unit x failed"}
    act = decide_recovery(
        rec_in(State.ROLLING_BACK, error=err),
        "A",
        boot(SlotBoot(tries_left=0, good=True), BAD),
        True,
    )
    assert act.step == Step.FINISH and act.event == Event.BOOTED_OTHER
    assert act.error == err and act.confirm == "A" and act.mark_bad is None


def test_machine_recovery_loop_breaker_stops_retrying() -> None:
    rec = rec_in(State.REBOOTING, transitions=MAX_TRANSITIONS)
    act = decide_recovery(rec, "A", boot(GOOD, BAD), True)
    assert act.step == Step.FINISH and act.event == Event.LOOP_DETECTED
    assert act.error is not None and act.error["code"] == "reboot_loop"


def test_machine_recovery_idle_confirms_the_booted_slot_once() -> None:
    assert decide_recovery(None, "A", boot(TRIED, GOOD, ("A", "B")), True).confirm == "A"
    assert decide_recovery(None, "A", boot(GOOD, GOOD), True).confirm is None
    # an attempt used this boot (U-Boot 3 -> 2) needs a confirmation too
    used = BootState(("A", "B"), {"A": SlotBoot(tries_left=2, good=True), "B": GOOD}, full_tries=3)
    assert decide_recovery(None, "A", used, True).confirm == "A"


@pytest.mark.parametrize("attempts", [1, 3])
def test_machine_recovery_keeps_an_idle_device_on_its_slot(tmp_path: Path, attempts: int) -> None:
    # 3 x attempts power cycles of an idle device: applying the decision's confirmation each
    # time keeps it on A (without it, it would fall back to B after `attempts` boots)
    sim = SimBootloader(tmp_path / "sim.json", attempts=attempts)
    for _ in range(3 * attempts):
        booted = sim.power_on()
        assert booted == "A"
        act = decide_recovery(None, booted, sim.state(), True)
        if act.confirm is not None:
            sim.mark_good(act.confirm)


def test_machine_recovery_download_target_that_boots_was_never_written() -> None:
    # power cut before mark_bad(B), then A's confirmation lost: the firmware boots B's old
    # content. The job fails, B (sound, running) is confirmed and stays bootable.
    used = BootState(("A", "B"), {"A": TRIED, "B": SlotBoot(tries_left=0, good=True)})
    act = decide_recovery(rec_in(State.DOWNLOADING), "B", used, True)
    assert act.step == Step.FINISH and act.event == Event.FAILED
    assert act.confirm == "B" and act.mark_bad is None
    assert act.error is not None and "nothing was written" in act.error["message"]


def test_machine_recovery_committed_target_that_falls_back_is_rolled_back() -> None:
    rec = rec_in(State.SUCCEEDED, reported=True)
    act = decide_recovery(
        rec, "A", boot(SlotBoot(tries_left=0, good=True), TRIED, ("B", "A")), True
    )
    assert act.step == Step.FINISH and act.event == Event.BOOTED_OTHER
    assert act.error == {
        "code": "boot_failed",
        "message": "slot B was committed but the bootloader fell back to slot A",
    }
    assert act.mark_bad == "B" and act.confirm == "A"
    # the same record without a reboot (the agent restarted) stays succeeded
    same_boot = decide_recovery(rec, "A", boot(GOOD, TRIED), False)
    assert same_boot.step == Step.NONE


def test_machine_recovery_unreported_final_state_is_reported() -> None:
    act = decide_recovery(rec_in(State.SUCCEEDED), "B", boot(GOOD, GOOD, ("B", "A")), True)
    assert act.step == Step.REPORT and act.event is None

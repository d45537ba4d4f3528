"""The pure rollout logic: parsers, wave plans, report folding, the wave state machine."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otad.cloud import rollout_plan as rp
from otad.cloud.rollout_plan import (
    ClearDesired,
    DeviceRecord,
    DeviceState,
    Rollout,
    RolloutState,
    SetDesired,
)
from otad.errors import RolloutError

# --- parsers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "plan"),
    [
        ("1,10,50,100%", 20, (1, 10, 20)),
        ("1,10,50,100%", 1000, (1, 10, 50, 1000)),
        ("1,10,50,100%", 1, (1,)),
        ("100%", 7, (7,)),
        ("10%,50%,100%", 10, (1, 5, 10)),
        ("10%,50%,100%", 3, (1, 2, 3)),
        ("1%,100%", 250, (3, 250)),
        ("2,5,9", 9, (2, 5, 9)),
        ("5,5,100%", 10, (5, 10)),
        ("33.3%,100%", 3, (1, 3)),
        ("1,5,50%,100%", 6, (1, 5, 6)),
        ("1,10,50%,100%", 12, (1, 10, 12)),
    ],
)
def test_plan_waves_gives_cumulative_counts(text: str, count: int, plan: tuple[int, ...]) -> None:
    assert rp.plan_waves(rp.parse_waves(text), count) == plan


@pytest.mark.parametrize(
    "text", ["", " ", "1,,2", "a", "1,b%", "0", "0%", "101%", "-1", "1.5", "%", "1,10,", "1e3"]
)
def test_parse_waves_rejects_garbage(text: str) -> None:
    with pytest.raises(RolloutError):
        rp.parse_waves(text)


def test_plan_waves_rejects_decreasing_steps() -> None:
    with pytest.raises(RolloutError, match="smaller than the wave before"):
        rp.plan_waves(rp.parse_waves("10,5,100%"), 20)
    with pytest.raises(RolloutError, match="smaller than the wave before"):
        rp.plan_waves(rp.parse_waves("1,50%,10%,100%"), 20)


def test_plan_waves_rejects_a_plan_that_leaves_devices_out() -> None:
    with pytest.raises(RolloutError, match="reach 10 of 20 devices"):
        rp.plan_waves(rp.parse_waves("1,10"), 20)


def test_plan_waves_rejects_an_empty_fleet() -> None:
    with pytest.raises(RolloutError, match="no devices"):
        rp.plan_waves(rp.parse_waves("100%"), 0)
    with pytest.raises(RolloutError, match="at least one wave"):
        rp.plan_waves((), 3)


@given(
    steps=st.lists(
        st.one_of(
            st.integers(1, 10_000).map(lambda v: rp.WaveStep(float(v), False)),
            st.floats(0.01, 100).map(lambda v: rp.WaveStep(round(v, 2), True)),
        ),
        min_size=1,
        max_size=6,
    ),
    count=st.integers(1, 5000),
)
def test_plan_waves_is_increasing_and_ends_at_the_fleet_or_refuses(
    steps: list[rp.WaveStep], count: int
) -> None:
    try:
        plan = rp.plan_waves([*steps, rp.WaveStep(100.0, True)], count)
    except RolloutError:
        return
    assert plan[-1] == count
    assert all(a < b for a, b in itertools.pairwise(plan))
    assert plan[0] >= 1


@given(st.text(max_size=30))
def test_parsers_never_crash_on_garbage(text: str) -> None:
    for parse in (rp.parse_waves, rp.parse_rate, rp.parse_duration, rp.parse_device_list):
        with contextlib.suppress(RolloutError):
            parse(text)


@given(st.lists(st.integers(1, 1000), min_size=1, max_size=5, unique=True))
def test_parse_waves_round_trips_its_text(values: list[int]) -> None:
    text = ",".join(str(v) for v in sorted(values)) + ",100%"
    assert ",".join(str(s) for s in rp.parse_waves(text)) == text


@pytest.mark.parametrize(
    ("text", "rate"), [("5%", 0.05), ("0%", 0.0), ("100%", 1.0), ("0.25", 0.25), ("12.5%", 0.125)]
)
def test_parse_rate_accepts_percent_and_fraction(text: str, rate: float) -> None:
    assert rp.parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("text", ["", "%", "101%", "1.5", "-5%", "five", "5 %x", "nan"])
def test_parse_rate_rejects_garbage(text: str) -> None:
    with pytest.raises(RolloutError):
        rp.parse_rate(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30m", 1800), ("90s", 90), ("1h30m", 5400), ("2h", 7200), ("45", 45), ("1m30s", 90)],
)
def test_parse_duration_accepts_units(text: str, seconds: float) -> None:
    assert rp.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "m", "30x", "1m1m", "s30", "1h 2m", "-5s", "1d"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(RolloutError):
        rp.parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(3.25, "3.2s"), (45, "45s"), (725, "12m05s"), (10920, "3h02m"), (-1, "0.0s")],
)
def test_format_duration_is_short(seconds: float, text: str) -> None:
    assert rp.format_duration(seconds) == text


def test_parse_device_list_keeps_order_and_drops_repeats() -> None:
    assert rp.parse_device_list("b, a,b,,c") == ("b", "a", "c")


@pytest.mark.parametrize("text", ["", ",", "a b", "../x", "dev/1", "-x", "x" * 129])
def test_parse_device_list_rejects_bad_ids(text: str) -> None:
    with pytest.raises(RolloutError):
        rp.parse_device_list(text)


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "-a", "a/b"])
def test_check_group_name_rejects_bad_names(name: str) -> None:
    with pytest.raises(RolloutError):
        rp.check_group_name(name)


def test_url_lifetime_grows_with_size_and_is_capped() -> None:
    small = rp.url_lifetime(4096)
    big = rp.url_lifetime(1024**3)
    assert rp.URL_BASE_LIFETIME < small < big <= rp.URL_MAX_LIFETIME
    assert rp.url_lifetime(10**15) == rp.URL_MAX_LIFETIME
    with pytest.raises(RolloutError):
        rp.url_lifetime(-1)


# --- helpers -------------------------------------------------------------------------------------


def make(
    count: int = 10,
    waves: str = "1,5,100%",
    rate: float = 0.2,
    timeout: float = 600,
    max_in_flight: int | None = None,
) -> tuple[Rollout, dict[str, DeviceRecord]]:
    rollout, records = rp.new_rollout(
        rollout_id="r-1",
        artifact_id="art",
        version="2.0",
        bundle_size=1000,
        devices=[f"dev{i}" for i in range(count)],
        waves=rp.parse_waves(waves),
        max_failure_rate=rate,
        wave_timeout=timeout,
        now=0.0,
        max_in_flight=max_in_flight,
    )
    return rollout, {r.device_id: r for r in records}


def apply(
    rollout: Rollout, devices: dict[str, DeviceRecord], now: float
) -> tuple[Rollout, rp.Decision]:
    decision = rp.step(rollout, devices, now)
    devices.update({d.device_id: d for d in decision.devices})
    return decision.rollout, decision


def report(
    rollout: Rollout,
    devices: dict[str, DeviceRecord],
    device_id: str,
    state: str,
    now: float = 1.0,
    **extra: object,
) -> tuple[Command, ...]:
    record = devices[device_id]
    software = {"state": state, "jobId": record.job_id, "version": "1.0", **extra}
    new, commands = rp.apply_report(rollout, record, software, now)
    devices[device_id] = new
    return commands


Command = rp.Command


def finish_wave(
    rollout: Rollout, devices: dict[str, DeviceRecord], wave: int, fail: set[str] = frozenset()
) -> None:
    for d in list(devices.values()):
        if d.wave == wave:
            if d.device_id in fail:
                report(rollout, devices, d.device_id, "rolled_back", error={"code": "boot_failed"})
            else:
                report(rollout, devices, d.device_id, "succeeded", version="2.0")


# --- new_rollout ---------------------------------------------------------------------------------


def test_new_rollout_assigns_waves_by_position() -> None:
    rollout, devices = make()
    assert rollout.waves == (1, 5, 10)
    assert [devices[f"dev{i}"].wave for i in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert all(d.state == DeviceState.PENDING for d in devices.values())
    assert rollout.current_wave == -1 and rollout.state == RolloutState.RUNNING


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"devices": ["a", "a"]}, "listed twice"),
        ({"devices": ["a b"]}, "not valid"),
        ({"version": ""}, "no version"),
        ({"max_failure_rate": 1.5}, "between 0 and 1"),
        ({"wave_timeout": 0}, "longer than zero"),
        ({"devices": []}, "no devices"),
        ({"max_in_flight": 0}, "at least 1"),
        ({"max_in_flight": -5}, "at least 1"),
    ],
)
def test_new_rollout_rejects_bad_input(change: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "rollout_id": "r",
        "artifact_id": "a",
        "version": "2",
        "bundle_size": 1,
        "devices": ["a"],
        "waves": rp.parse_waves("100%"),
        "max_failure_rate": 0.1,
        "wave_timeout": 10,
        "now": 0.0,
    }
    args.update(change)
    with pytest.raises(RolloutError, match=message):
        rp.new_rollout(**args)  # type: ignore[arg-type]


def test_wave_of_rejects_a_position_past_the_plan() -> None:
    rollout, _ = make()
    with pytest.raises(RolloutError):
        rollout.wave_of(10)


# --- step ----------------------------------------------------------------------------------------


def test_step_starts_the_first_wave_only() -> None:
    rollout, devices = make()
    rollout, decision = apply(rollout, devices, 1.0)
    assert rollout.current_wave == 0 and rollout.wave_started_at == 1.0
    assert decision.commands == (SetDesired("dev0", "r-1"),)
    assert devices["dev0"].state == DeviceState.ASSIGNED and devices["dev0"].job_id == "r-1"
    assert devices["dev1"].state == DeviceState.PENDING
    assert ("wave_started", {"wave": 1, "devices": 1}) in decision.events
    # Nothing new happens until the device reports.
    rollout, again = apply(rollout, devices, 2.0)
    assert not again.changed


def test_step_walks_three_waves_to_completion() -> None:
    rollout, devices = make()
    rollout, _ = apply(rollout, devices, 1.0)
    for wave, started in ((0, 4), (1, 5)):
        report(rollout, devices, "dev0", "downloading", progress=40)
        finish_wave(rollout, devices, wave)
        rollout, decision = apply(rollout, devices, 2.0 + wave)
        assert rollout.current_wave == wave + 1
        assert len(decision.commands) == started
    finish_wave(rollout, devices, 2)
    rollout, decision = apply(rollout, devices, 9.0)
    assert rollout.state == RolloutState.COMPLETED and rollout.finished_at == 9.0
    assert all(d.state == DeviceState.SUCCEEDED for d in devices.values())
    assert rp.step(rollout, devices, 10.0).changed is False


def test_step_waits_for_every_device_of_a_wave() -> None:
    rollout, devices = make()
    rollout, _ = apply(rollout, devices, 1.0)
    finish_wave(rollout, devices, 0)
    rollout, _ = apply(rollout, devices, 2.0)
    for name in ("dev1", "dev2", "dev3"):
        report(rollout, devices, name, "succeeded")
    report(rollout, devices, "dev4", "verifying")
    rollout, decision = apply(rollout, devices, 3.0)
    assert rollout.current_wave == 1 and not decision.commands


def test_step_pauses_as_soon_as_a_wave_is_over_the_threshold() -> None:
    rollout, devices = make(rate=0.2)
    rollout, _ = apply(rollout, devices, 1.0)
    finish_wave(rollout, devices, 0)
    rollout, _ = apply(rollout, devices, 2.0)
    # Wave 2 has 4 devices: one failure is 25% > 20%, even with the others still running.
    report(rollout, devices, "dev1", "failed", error={"code": "bundle_bad_signature"})
    rollout, decision = apply(rollout, devices, 3.0)
    assert rollout.state == RolloutState.PAUSED
    assert rollout.reason == "wave 2: 1 of 4 devices failed (25% > 20% allowed)"
    assert decision.events[-1][0] == "rollout_paused"
    # Paused: the rest of the wave finishing starts nothing.
    for name in ("dev2", "dev3", "dev4"):
        report(rollout, devices, name, "succeeded")
    rollout, decision = apply(rollout, devices, 4.0)
    assert rollout.state == RolloutState.PAUSED and not decision.commands


def test_step_tolerates_failures_at_the_threshold() -> None:
    rollout, devices = make(count=10, waves="5,100%", rate=0.2)
    rollout, _ = apply(rollout, devices, 1.0)
    finish_wave(rollout, devices, 0, fail={"dev0"})  # 1 of 5 = 20%, not above
    rollout, decision = apply(rollout, devices, 2.0)
    assert rollout.state == RolloutState.RUNNING and rollout.current_wave == 1
    assert len(decision.commands) == 5


def test_step_with_zero_tolerance_pauses_on_the_first_failure() -> None:
    rollout, devices = make(rate=0.0)
    rollout, _ = apply(rollout, devices, 1.0)
    finish_wave(rollout, devices, 0, fail={"dev0"})
    rollout, _ = apply(rollout, devices, 2.0)
    assert rollout.state == RolloutState.PAUSED and "wave 1: 1 of 1" in rollout.reason


def test_step_with_full_tolerance_never_pauses() -> None:
    rollout, devices = make(rate=1.0)
    rollout, _ = apply(rollout, devices, 1.0)
    for wave in range(3):
        finish_wave(rollout, devices, wave, fail=set(devices))
        rollout, _ = apply(rollout, devices, 2.0 + wave)
    assert rollout.state == RolloutState.COMPLETED


def test_step_times_out_unfinished_devices() -> None:
    rollout, devices = make(rate=0.5, timeout=60)
    rollout, _ = apply(rollout, devices, 0.0)
    finish_wave(rollout, devices, 0)
    rollout, _ = apply(rollout, devices, 1.0)
    report(rollout, devices, "dev1", "succeeded")
    report(rollout, devices, "dev2", "succeeded")
    report(rollout, devices, "dev3", "succeeded")
    report(rollout, devices, "dev4", "installing")
    rollout, decision = apply(rollout, devices, 60.9)
    assert rollout.current_wave == 1 and not decision.devices
    rollout, decision = apply(rollout, devices, 61.0)
    assert devices["dev4"].state == DeviceState.TIMED_OUT
    assert devices["dev4"].error_code == rp.TIMEOUT_CODE
    assert "1m00s" in (devices["dev4"].error_message or "")
    assert rollout.current_wave == 2  # 1 of 4 = 25% <= 50%: carries on


def test_step_times_out_into_a_pause() -> None:
    rollout, devices = make(rate=0.0, timeout=10)
    rollout, _ = apply(rollout, devices, 0.0)
    rollout, _ = apply(rollout, devices, 10.0)
    assert rollout.state == RolloutState.PAUSED
    assert devices["dev0"].state == DeviceState.TIMED_OUT


def test_step_does_nothing_for_finished_rollouts() -> None:
    rollout, devices = make()
    for state in (RolloutState.COMPLETED, RolloutState.ABORTED):
        assert not rp.step(replace(rollout, state=state), devices, 1.0).changed


def test_step_does_not_start_a_paused_rollout() -> None:
    rollout, devices = make()
    paused = rp.pause(rollout, 0.5)
    assert not rp.step(paused, devices, 1.0).changed


def test_step_completes_a_single_wave_rollout() -> None:
    rollout, devices = make(count=3, waves="100%")
    rollout, decision = apply(rollout, devices, 0.0)
    assert len(decision.commands) == 3
    finish_wave(rollout, devices, 0)
    rollout, _ = apply(rollout, devices, 1.0)
    assert rollout.state == RolloutState.COMPLETED


# --- operator actions ----------------------------------------------------------------------------


def in_flight(devices: dict[str, DeviceRecord]) -> list[str]:
    return sorted(d.device_id for d in devices.values() if d.state in rp.IN_FLIGHT)


def test_step_paces_a_wave_to_max_in_flight() -> None:
    rollout, devices = make(count=10, waves="100%", max_in_flight=3)
    rollout, decision = apply(rollout, devices, 1.0)
    assert decision.commands == tuple(SetDesired(f"dev{i}", "r-1") for i in range(3))
    assert ("wave_started", {"wave": 1, "devices": 3}) in decision.events
    assert in_flight(devices) == ["dev0", "dev1", "dev2"]
    # A device that started (downloading) still holds its place; one that finished frees it.
    report(rollout, devices, "dev0", "downloading", progress=10)
    rollout, decision = apply(rollout, devices, 2.0)
    assert not decision.commands
    report(rollout, devices, "dev0", "succeeded", version="2.0")
    report(rollout, devices, "dev1", "rolled_back", error={"code": "boot_failed"})
    rollout, decision = apply(rollout, devices, 3.0)
    # In position order, and with their start time.
    assert decision.commands == (SetDesired("dev3", "r-1"), SetDesired("dev4", "r-1"))
    assert devices["dev3"].started_at == 3.0 and devices["dev5"].state == DeviceState.PENDING
    assert rollout.current_wave == 0 and rollout.state == RolloutState.RUNNING


def test_step_paced_rollout_completes_and_never_exceeds_the_limit() -> None:
    rollout, devices = make(count=23, waves="1,10,100%", rate=1.0, max_in_flight=4)
    now = 1.0
    for _ in range(100):
        rollout, _ = apply(rollout, devices, now)
        assert len(in_flight(devices)) <= 4
        if not rollout.active:
            break
        # Every device in flight finishes before the next step; one in three fails.
        for name in in_flight(devices):
            if int(name[3:]) % 3 == 0:
                report(rollout, devices, name, "failed", error={"code": "x"})
            else:
                report(rollout, devices, name, "succeeded", version="2.0")
        now += 1.0
    assert rollout.state == RolloutState.COMPLETED
    assert {d.state for d in devices.values()} == {DeviceState.SUCCEEDED, DeviceState.FAILED}
    # Waves still run one after the other: a device of wave 3 started after wave 2 finished.
    wave2_end = max(d.finished_at or 0 for d in devices.values() if d.wave == 1)
    assert min(d.started_at or 0 for d in devices.values() if d.wave == 2) >= wave2_end


def test_step_paced_wave_starts_nobody_while_paused_and_goes_on_after_resume() -> None:
    rollout, devices = make(count=6, waves="100%", max_in_flight=2)
    rollout, _ = apply(rollout, devices, 1.0)
    rollout = rp.pause(rollout, 2.0)
    report(rollout, devices, "dev0", "succeeded", version="2.0")
    rollout, decision = apply(rollout, devices, 3.0)
    assert not decision.commands and in_flight(devices) == ["dev1"]
    rollout = rp.resume(rollout, devices, 4.0)
    rollout, decision = apply(rollout, devices, 5.0)
    assert decision.commands == (SetDesired("dev2", "r-1"),)


def test_step_paced_wave_over_the_threshold_pauses_before_starting_more() -> None:
    rollout, devices = make(count=10, waves="100%", rate=0.1, max_in_flight=3)
    rollout, _ = apply(rollout, devices, 1.0)
    report(rollout, devices, "dev0", "failed", error={"code": "x"})
    report(rollout, devices, "dev1", "failed", error={"code": "x"})
    rollout, decision = apply(rollout, devices, 2.0)
    assert rollout.state == RolloutState.PAUSED and not decision.commands


def test_abort_of_a_paced_wave_skips_the_devices_it_never_told() -> None:
    rollout, devices = make(count=5, waves="100%", max_in_flight=2)
    rollout, _ = apply(rollout, devices, 1.0)
    report(rollout, devices, "dev0", "downloading")
    decision = rp.abort(rollout, devices, 2.0)
    states = {d.device_id: d.state for d in decision.devices}
    assert states == {
        "dev1": DeviceState.CANCELLED,
        "dev2": DeviceState.SKIPPED,
        "dev3": DeviceState.SKIPPED,
        "dev4": DeviceState.SKIPPED,
    }
    assert decision.commands == (ClearDesired("dev1"),)


def test_pause_and_resume_round_trip() -> None:
    rollout, devices = make()
    paused = rp.pause(rollout, 1.0)
    assert paused.state == RolloutState.PAUSED and paused.reason == "paused by the operator"
    resumed = rp.resume(paused, devices, 2.0)
    assert resumed.state == RolloutState.RUNNING and resumed.reason == ""
    assert resumed.accepted_waves == frozenset()


def test_pause_and_resume_refuse_the_wrong_state() -> None:
    rollout, devices = make()
    with pytest.raises(RolloutError, match="only a paused one resumes"):
        rp.resume(rollout, devices, 1.0)
    paused = rp.pause(rollout, 1.0)
    with pytest.raises(RolloutError, match="only a running one pauses"):
        rp.pause(paused, 2.0)
    done = replace(rollout, state=RolloutState.COMPLETED)
    with pytest.raises(RolloutError):
        rp.pause(done, 2.0)


def test_resume_accepts_the_failures_of_the_paused_wave() -> None:
    rollout, devices = make(rate=0.2)
    rollout, _ = apply(rollout, devices, 1.0)
    finish_wave(rollout, devices, 0, fail={"dev0"})
    rollout, _ = apply(rollout, devices, 2.0)
    assert rollout.state == RolloutState.PAUSED
    rollout = rp.resume(rollout, devices, 3.0)
    assert rollout.accepted_waves == frozenset({0})
    rollout, decision = apply(rollout, devices, 4.0)
    assert rollout.current_wave == 1 and len(decision.commands) == 4
    # The next wave is judged on its own.
    finish_wave(rollout, devices, 1, fail={"dev1", "dev2"})
    rollout, _ = apply(rollout, devices, 5.0)
    assert rollout.state == RolloutState.PAUSED and rollout.reason.startswith("wave 2: 2 of 4")


def test_resume_of_an_operator_pause_accepts_nothing() -> None:
    rollout, devices = make()
    rollout, _ = apply(rollout, devices, 1.0)
    rollout = rp.resume(rp.pause(rollout, 2.0), devices, 3.0)
    assert rollout.accepted_waves == frozenset()


def test_abort_skips_untold_and_withdraws_unstarted_devices() -> None:
    rollout, devices = make()
    rollout, _ = apply(rollout, devices, 1.0)
    finish_wave(rollout, devices, 0)
    rollout, _ = apply(rollout, devices, 2.0)
    report(rollout, devices, "dev1", "downloading")
    report(rollout, devices, "dev2", "succeeded")
    decision = rp.abort(rollout, devices, 3.0)
    states = {d.device_id: d.state for d in decision.devices}
    assert states == {
        "dev3": DeviceState.CANCELLED,
        "dev4": DeviceState.CANCELLED,
        **{f"dev{i}": DeviceState.SKIPPED for i in range(5, 10)},
    }
    assert decision.commands == (ClearDesired("dev3"), ClearDesired("dev4"))
    assert decision.rollout.state == RolloutState.ABORTED
    assert decision.rollout.reason == "aborted by the operator"
    with pytest.raises(RolloutError, match="aborted already"):
        rp.abort(decision.rollout, devices, 4.0)


def test_abort_leaves_started_devices_alone_and_still_records_their_outcome() -> None:
    rollout, devices = make(count=2, waves="100%")
    rollout, _ = apply(rollout, devices, 1.0)
    report(rollout, devices, "dev0", "installing")
    decision = rp.abort(rollout, devices, 2.0)
    devices.update({d.device_id: d for d in decision.devices})
    report(decision.rollout, devices, "dev0", "succeeded")
    assert devices["dev0"].state == DeviceState.SUCCEEDED
    report(decision.rollout, devices, "dev1", "succeeded")
    assert devices["dev1"].state == DeviceState.CANCELLED


# --- apply_report ---------------------------------------------------------------------------


def started(**change: object) -> tuple[Rollout, dict[str, DeviceRecord]]:
    rollout, devices = make(count=1, waves="100%")
    rollout, _ = apply(rollout, devices, 0.0)
    if change:
        devices["dev0"] = replace(devices["dev0"], **change)  # type: ignore[arg-type]
    return rollout, devices


@pytest.mark.parametrize(
    ("reported", "expected"),
    [
        ("downloading", DeviceState.DOWNLOADING),
        ("installing", DeviceState.INSTALLING),
        ("installed", DeviceState.INSTALLING),
        ("rebooting", DeviceState.REBOOTING),
        ("verifying", DeviceState.VERIFYING),
        ("succeeded", DeviceState.SUCCEEDED),
        ("failed", DeviceState.FAILED),
        ("rolled_back", DeviceState.ROLLED_BACK),
        ("idle", DeviceState.ASSIGNED),
        ("weird", DeviceState.ASSIGNED),
    ],
)
def test_apply_report_maps_agent_states(reported: str, expected: DeviceState) -> None:
    rollout, devices = started()
    report(rollout, devices, "dev0", reported, progress=50)
    assert devices["dev0"].state == expected


def test_apply_report_keeps_progress_and_error() -> None:
    rollout, devices = started()
    report(rollout, devices, "dev0", "downloading", progress=42)
    assert devices["dev0"].progress == 42
    report(rollout, devices, "dev0", "downloading", progress=True)
    assert devices["dev0"].progress is None
    report(
        rollout,
        devices,
        "dev0",
        "rolled_back",
        now=7.0,
        error={"code": "health_check_failed", "message": "unit x failed"},
    )
    record = devices["dev0"]
    assert (record.error_code, record.error_message, record.finished_at) == (
        "health_check_failed",
        "unit x failed",
        7.0,
    )


def test_apply_report_fills_in_a_missing_error() -> None:
    rollout, devices = started()
    report(rollout, devices, "dev0", "failed", error="not an object")
    assert devices["dev0"].error_code == "failed"
    assert devices["dev0"].error_message


def test_apply_report_idle_on_the_target_version_is_success() -> None:
    rollout, devices = started()
    report(rollout, devices, "dev0", "idle", version="2.0")
    assert devices["dev0"].state == DeviceState.SUCCEEDED and devices["dev0"].progress == 100


def test_apply_report_ignores_other_jobs_unless_already_on_target() -> None:
    rollout, devices = started()
    record = devices["dev0"]
    other = {"state": "failed", "jobId": "old", "version": "1.0", "error": {"code": "x"}}
    assert rp.apply_report(rollout, record, other, 1.0) == (record, ())
    current = {"state": "idle", "jobId": "old", "version": "2.0"}
    new, _ = rp.apply_report(rollout, record, current, 1.0)
    assert new.state == DeviceState.SUCCEEDED


@pytest.mark.parametrize("software", [None, "x", 5, [], {}, {"state": 1, "jobId": ["r-1"]}])
def test_apply_report_ignores_garbage(software: object) -> None:
    rollout, devices = started()
    record = devices["dev0"]
    assert rp.apply_report(rollout, record, software, 1.0) == (record, ())  # type: ignore[arg-type]


@pytest.mark.parametrize("state", [DeviceState.PENDING, DeviceState.SKIPPED, DeviceState.CANCELLED])
def test_apply_report_ignores_devices_not_in_play(state: DeviceState) -> None:
    rollout, devices = started(state=state)
    record = devices["dev0"]
    assert rp.apply_report(rollout, record, {"state": "succeeded", "jobId": "r-1"}, 1.0) == (
        record,
        (),
    )


def test_apply_report_expired_url_gets_a_fresh_job_until_the_limit() -> None:
    rollout, devices = started()
    expired = {"code": rp.EXPIRED_URL_CODE, "message": "store said 403 expired"}
    for attempt in range(1, rp.MAX_URL_REFRESHES + 1):
        commands = report(rollout, devices, "dev0", "failed", error=expired)
        record = devices["dev0"]
        assert record.state == DeviceState.ASSIGNED and record.url_refreshes == attempt
        assert record.job_id == f"r-1.{attempt}"
        assert commands == (SetDesired("dev0", f"r-1.{attempt}"),)
    commands = report(rollout, devices, "dev0", "failed", error=expired)
    assert commands == () and devices["dev0"].state == DeviceState.FAILED
    assert devices["dev0"].error_code == rp.EXPIRED_URL_CODE


def test_apply_report_expired_url_while_waiting_gets_a_fresh_url_for_the_same_job() -> None:
    rollout, devices = started()
    expired = {"code": rp.EXPIRED_URL_CODE, "message": "store said 403 expired"}
    commands = report(rollout, devices, "dev0", "downloading", progress=30, error=expired)
    record = devices["dev0"]
    assert commands == (SetDesired("dev0", "r-1"),)
    assert (record.state, record.url_refreshes, record.job_id) == (
        DeviceState.DOWNLOADING,
        1,
        "r-1",
    )
    # The same report again (documents and accepted both carry it): no second URL.
    assert report(rollout, devices, "dev0", "downloading", progress=30, error=expired) == ()
    # The agent took the new URL: the marker clears, a later expiry refreshes again.
    report(rollout, devices, "dev0", "downloading", progress=60)
    assert devices["dev0"].error_code is None
    for attempt in range(2, rp.MAX_URL_REFRESHES + 1):
        assert report(rollout, devices, "dev0", "downloading", error=expired) != ()
        assert devices["dev0"].url_refreshes == attempt
        report(rollout, devices, "dev0", "downloading", progress=70)
    assert report(rollout, devices, "dev0", "downloading", error=expired) == ()
    assert devices["dev0"].state == DeviceState.FAILED
    assert devices["dev0"].error_code == rp.EXPIRED_URL_CODE


def test_apply_report_late_success_after_a_timeout_is_recorded() -> None:
    rollout, devices = started(state=DeviceState.TIMED_OUT, error_code=rp.TIMEOUT_CODE)
    report(rollout, devices, "dev0", "verifying")
    assert devices["dev0"].state == DeviceState.VERIFYING
    report(rollout, devices, "dev0", "succeeded")
    assert devices["dev0"].state == DeviceState.SUCCEEDED and devices["dev0"].error_code is None


def test_apply_report_progress_never_reopens_a_finished_device() -> None:
    rollout, devices = started(state=DeviceState.SUCCEEDED)
    report(rollout, devices, "dev0", "downloading")
    assert devices["dev0"].state == DeviceState.SUCCEEDED


def test_apply_report_repeated_outcome_is_unchanged() -> None:
    rollout, devices = started()
    report(rollout, devices, "dev0", "succeeded", now=1.0)
    first = devices["dev0"]
    report(rollout, devices, "dev0", "succeeded", now=5.0)
    assert devices["dev0"] is first


# --- every (device state, report) pair is handled ------------------------------------------------

REPORTED = ["idle", "downloading", "installing", "rebooting", "verifying", "succeeded", "failed"]
REPORTED += ["rolled_back", None]


@pytest.mark.parametrize("device_state", list(DeviceState))
@pytest.mark.parametrize("reported", REPORTED)
@pytest.mark.parametrize("same_job", [True, False])
def test_apply_report_every_pair_yields_a_known_state(
    device_state: DeviceState, reported: str | None, same_job: bool
) -> None:
    rollout, devices = started(state=device_state)
    record = devices["dev0"]
    software = {"state": reported, "jobId": "r-1" if same_job else "zzz", "version": "1.0"}
    new, commands = rp.apply_report(rollout, record, software, 3.0)
    assert new.state in DeviceState
    if device_state in (DeviceState.PENDING, DeviceState.SKIPPED, DeviceState.CANCELLED):
        assert new == record
    if not same_job:
        assert new == record and commands == ()
    if new.state in rp.FAILURES and new != record:
        assert new.error_code


# --- restart ---------------------------------------------------------------------------------


def test_resend_commands_repeats_unstarted_devices_only() -> None:
    rollout, devices = make()
    rollout, _ = apply(rollout, devices, 1.0)
    finish_wave(rollout, devices, 0)
    rollout, _ = apply(rollout, devices, 2.0)
    report(rollout, devices, "dev1", "downloading")
    assert rp.resend_commands(rollout, devices.values()) == tuple(
        SetDesired(f"dev{i}", "r-1") for i in (2, 3, 4)
    )
    assert rp.resend_commands(replace(rollout, state=RolloutState.ABORTED), devices.values()) == ()


def test_tally_counts_one_wave() -> None:
    rollout, devices = make()
    rollout, _ = apply(rollout, devices, 1.0)
    finish_wave(rollout, devices, 0, fail={"dev0"})
    counts = rp.tally(rollout, devices.values(), 0)
    assert (counts.size, counts.done, counts.failed, counts.succeeded) == (1, 1, 1, 0)
    assert counts.failure_rate == 1.0
    assert rp.WaveTally(0, 0, 0, 0, 0).failure_rate == 0.0

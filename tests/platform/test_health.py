"""Health checks: systemd state, required units, health.d scripts, broker probe.

systemd itself cannot run in the test sandbox: a `systemctl` stand-in script answers from
files (the approach RAUC's tests take with fake tools on PATH); everything else is real.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otad.agent.health import CheckResult, HealthChecker, HealthReport, Outcome

FAKE_SYSTEMCTL = """#!/bin/sh
# stand-in for systemctl: answers from files in $FAKE_SYSTEMD, notes each call in calls
echo "$*" >> "$FAKE_SYSTEMD/calls"
case "$1" in
  list-units)
    if [ -f "$FAKE_SYSTEMD/no-bus" ]; then echo "Failed to connect to bus"; exit 1; fi
    cat "$FAKE_SYSTEMD/failed" 2>/dev/null; true ;;
  is-system-running) cat "$FAKE_SYSTEMD/system"; [ "$(cat "$FAKE_SYSTEMD/system")" = running ] ;;
  is-active)
    f="$FAKE_SYSTEMD/unit-$2"
    if [ -f "$f.activating" ]; then
      n=$(cat "$f.activating")
      if [ "$n" -gt 0 ]; then echo $((n-1)) > "$f.activating"; echo activating; exit 3; fi
    fi
    if [ -f "$f" ]; then cat "$f"; [ "$(cat "$f")" = active ]; else echo inactive; exit 3; fi ;;
esac
"""


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Path:
    root = tmp_path / "systemd"
    (root / "marker").mkdir(parents=True)
    ctl = root / "systemctl"
    ctl.write_text(FAKE_SYSTEMCTL)
    ctl.chmod(0o755)
    (root / "system").write_text("running\n")
    return root


def checker(fake: Path, **kw: object) -> HealthChecker:
    values: dict[str, object] = {
        "systemctl": str(fake / "systemctl"),
        "systemd_marker": fake / "marker",
        "env": {"FAKE_SYSTEMD": str(fake)},
        "broker_policy": "ignore",
    }
    values.update(kw)
    return HealthChecker(**values)  # type: ignore[arg-type]


def script(d: Path, name: str, body: str, mode: int = 0o755) -> None:
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(mode)


def outcomes(report: HealthReport) -> dict[str, Outcome]:
    return {c.name: c.outcome for c in report.checks}


def process_state(pid: int) -> tuple[str, int] | None:
    """(state, parent) of process ``pid`` from /proc; None when there is no such process."""
    try:
        state, ppid = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[:2]
    except FileNotFoundError:
        return None
    return state, int(ppid)


async def assert_ended(pid: int) -> None:
    """``pid`` is gone within 5 s: reaped, or (not our child) a zombie left to its new parent."""
    for _ in range(50):  # bounded wait for the kernel to finish the kill
        found = process_state(pid)
        if found is None or (found[0] == "Z" and found[1] != os.getpid()):
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"process {pid} outlived the health check: {process_state(pid)}")


async def test_health_all_pass(fake_systemd: Path, tmp_path: Path) -> None:
    (fake_systemd / "unit-app.service").write_text("active\n")
    script(tmp_path / "health.d", "10-ok", "exit 0")

    async def reachable(within: float) -> bool:
        return True

    report = await checker(
        fake_systemd,
        required_units=("app.service",),
        health_d=tmp_path / "health.d",
        broker=reachable,
        broker_policy="required",
    ).run()
    assert report.ok, report.reason
    assert outcomes(report) == {
        "system": Outcome.PASSED,
        "unit:app.service": Outcome.PASSED,
        "script:10-ok": Outcome.PASSED,
        "broker": Outcome.PASSED,
    }
    assert report.reason == "4 checks passed"


async def test_health_degraded_system_fails_naming_the_failed_units(fake_systemd: Path) -> None:
    (fake_systemd / "system").write_text("degraded\n")
    (fake_systemd / "failed").write_text(
        "app.service loaded failed failed My app\nnet.mount loaded failed failed Net\n"
    )
    report = await checker(fake_systemd).run()
    assert not report.ok
    assert report.reason == "system: system is degraded (failed units: app.service, net.mount)"


@pytest.mark.parametrize("state", ["initializing", "starting", "running"])
async def test_health_boot_in_progress_passes_without_waiting(
    fake_systemd: Path, state: str
) -> None:
    # the check runs inside the boot transaction: it must never wait for the boot to finish
    (fake_systemd / "system").write_text(f"{state}\n")
    report = await checker(fake_systemd).run()
    assert report.ok and outcomes(report)["system"] == Outcome.PASSED


@pytest.mark.parametrize("state", ["initializing", "starting"])
async def test_health_boot_in_progress_with_a_failed_unit_fails_naming_it(
    fake_systemd: Path, state: str
) -> None:
    # systemd says "degraded" only once the boot is over, after the check: the check must
    # look for failed units itself
    (fake_systemd / "system").write_text(f"{state}\n")
    (fake_systemd / "failed").write_text(
        "app.service loaded failed failed My app\n\u25cf net.mount loaded failed failed Net\n"
    )
    report = await checker(fake_systemd).run()
    assert report.reason == f"system: system is {state} (failed units: app.service, net.mount)"


async def test_health_boot_in_progress_without_failed_units_passes(fake_systemd: Path) -> None:
    (fake_systemd / "system").write_text("starting\n")
    report = await checker(fake_systemd).run()
    assert report.ok, report.reason
    assert [c.detail for c in report.checks if c.name == "system"] == ["starting"]
    calls = (fake_systemd / "calls").read_text().splitlines()
    assert calls == ["is-system-running", "list-units --state=failed --plain --no-legend --full"]


async def test_health_boot_in_progress_fails_when_failed_units_cannot_be_listed(
    fake_systemd: Path,
) -> None:
    (fake_systemd / "system").write_text("starting\n")
    (fake_systemd / "no-bus").touch()
    report = await checker(fake_systemd).run()
    assert report.reason == "system: system is starting (cannot list the failed units)"


@pytest.mark.parametrize("state", ["maintenance", "stopping", "offline", "unknown"])
async def test_health_other_system_states_fail(fake_systemd: Path, state: str) -> None:
    (fake_systemd / "system").write_text(f"{state}\n")
    report = await checker(fake_systemd).run()
    assert report.reason == f"system: system is {state}"


async def test_health_inactive_and_failed_units_fail(fake_systemd: Path) -> None:
    (fake_systemd / "unit-a.service").write_text("failed\n")
    start = time.monotonic()
    report = await checker(
        fake_systemd, required_units=("a.service", "b.service"), total_timeout=1.5
    ).run()
    assert time.monotonic() - start < 10  # b is polled until the deadline, a fails at once
    assert outcomes(report)["unit:a.service"] == Outcome.FAILED
    assert "unit:a.service: unit is failed" in report.reason
    assert "unit:b.service: unit is inactive" in report.reason


async def test_health_activating_unit_is_polled_until_active(fake_systemd: Path) -> None:
    (fake_systemd / "unit-slow.service").write_text("active\n")
    (fake_systemd / "unit-slow.service.activating").write_text("2\n")
    report = await checker(fake_systemd, required_units=("slow.service",)).run()
    assert report.ok, report.reason


async def test_health_not_under_systemd_skips_system_but_fails_required_units(
    fake_systemd: Path, tmp_path: Path
) -> None:
    report = await checker(
        fake_systemd, systemd_marker=tmp_path / "absent", required_units=("app.service",)
    ).run()
    assert outcomes(report) == {
        "system": Outcome.SKIPPED,
        "unit:app.service": Outcome.FAILED,
        "broker": Outcome.SKIPPED,
    }
    assert "cannot check: not running under systemd" in report.reason
    alone = await checker(fake_systemd, systemd_marker=tmp_path / "absent").run()
    assert alone.ok and alone.reason == "0 checks passed, skipped: system, broker"


async def test_health_scripts_run_in_order_with_status_and_output(
    tmp_path: Path, fake_systemd: Path
) -> None:
    d = tmp_path / "health.d"
    log = tmp_path / "order"
    script(d, "20-fail", f"echo 20 >> {log}; echo 'disk check: /data is full'; exit 3")
    script(d, "10-ok", f'echo 10 >> {log}; [ "$OTAD_SLOT" = B ]')
    script(d, "30-not-exec", "exit 1", mode=0o644)
    script(d, ".hidden", "exit 1")
    report = await checker(
        fake_systemd, health_d=d, check_systemd=False, env={"OTAD_SLOT": "B"}
    ).run()
    assert outcomes(report) == {
        "script:10-ok": Outcome.PASSED,
        "script:20-fail": Outcome.FAILED,
        "script:30-not-exec": Outcome.SKIPPED,
        "broker": Outcome.SKIPPED,
    }
    assert log.read_text().split() == ["10", "20"]
    assert report.reason == "script:20-fail: exit status 3: disk check: /data is full"


async def test_health_hanging_script_is_killed_with_its_children(
    tmp_path: Path, fake_systemd: Path
) -> None:
    d = tmp_path / "health.d"
    pidfile = tmp_path / "child.pid"
    script(d, "10-hang", f"sleep 60 & echo $! > {pidfile}; wait")
    start = time.monotonic()
    report = await checker(fake_systemd, health_d=d, check_systemd=False, script_timeout=0.5).run()
    assert time.monotonic() - start < 10
    assert "script:10-hang: timed out after 0.5s" in report.reason
    await assert_ended(int(pidfile.read_text()))  # the script's child died with it


@pytest.mark.parametrize(
    "redirect", ["", ">/dev/null 2>&1"], ids=["child-keeps-output", "child-output-redirected"]
)
async def test_health_script_that_exits_passes_and_its_children_die(
    tmp_path: Path, fake_systemd: Path, redirect: str
) -> None:
    # the script's exit ends it, not the end of its output; what it left behind is killed
    d = tmp_path / "health.d"
    pids = tmp_path / "pids"
    script(d, "10-spawn", f"sleep 60 {redirect} & echo $$ $! > {pids}; exit 0")
    start = time.monotonic()
    report = await checker(fake_systemd, health_d=d, check_systemd=False, script_timeout=3).run()
    assert report.ok, report.reason
    assert time.monotonic() - start < 2.5
    for pid in map(int, pids.read_text().split()):  # the script, and the child it left
        await assert_ended(pid)


async def test_health_script_past_its_timeout_is_killed_with_its_children_and_named(
    tmp_path: Path, fake_systemd: Path
) -> None:
    d = tmp_path / "health.d"
    pids = tmp_path / "pids"
    script(
        d,
        "10-hang",
        f"echo 'waiting for the modem'; sleep 60 >/dev/null 2>&1 & echo $$ $! > {pids}; "
        "printf 'still wait'; wait",
    )
    start = time.monotonic()
    report = await checker(fake_systemd, health_d=d, check_systemd=False, script_timeout=0.5).run()
    assert time.monotonic() - start < 10
    # the last whole line: the unfinished one was cut by the kill
    assert report.reason == "script:10-hang: timed out after 0.5s: waiting for the modem"
    for pid in map(int, pids.read_text().split()):
        await assert_ended(pid)


PEAK_RUNNER = """
import asyncio, json, sys
from pathlib import Path
from otad.agent.health import HealthChecker

def peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise SystemExit("no VmHWM")

before = peak_kib()
checker = HealthChecker(
    health_d=Path(sys.argv[1]), script_timeout=1.5, check_systemd=False, broker_policy="ignore"
)
report = asyncio.run(checker.run())
print(json.dumps({"reason": report.reason, "grew_kib": peak_kib() - before}))
"""


def test_health_endless_output_keeps_memory_bounded_and_the_tail(tmp_path: Path) -> None:
    # a fresh process, so its peak resident memory (VmHWM) is the check's alone
    d = tmp_path / "health.d"
    script(d, "10-chatty", 'exec yes "health check line"')
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RUNNER, str(d)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["grew_kib"] < 32 * 1024, result
    assert result["reason"] == "script:10-chatty: timed out after 1.5s: health check line"


async def test_health_broker_probe_outcomes(fake_systemd: Path) -> None:
    async def no(within: float) -> bool:
        return False

    async def boom(within: float) -> bool:
        raise RuntimeError("session gone")

    async def hang(within: float) -> bool:
        await asyncio.sleep(60)
        return True

    base = {"check_systemd": False, "broker_policy": "required", "broker_timeout": 0.3}
    r1 = await checker(fake_systemd, broker=no, **base).run()
    assert r1.reason == "broker: not reachable within 0.3s"
    r2 = await checker(fake_systemd, broker=boom, **base).run()
    assert r2.reason == "broker: probe failed: session gone"
    start = time.monotonic()
    r3 = await checker(fake_systemd, broker=hang, **base).run()
    assert not r3.ok and time.monotonic() - start < 5
    r4 = await checker(fake_systemd, broker=None, **base).run()
    assert r4.reason == "broker: no broker probe configured"


async def test_health_hanging_systemctl_is_bounded(fake_systemd: Path) -> None:
    slow = fake_systemd / "systemctl"
    slow.write_text("#!/bin/sh\nsleep 60\n")
    start = time.monotonic()
    report = await checker(fake_systemd, total_timeout=0.5).run()
    assert time.monotonic() - start < 10
    assert report.reason == "system: systemctl did not answer"


async def test_health_unit_that_starts_later_is_waited_for(fake_systemd: Path) -> None:
    unit = fake_systemd / "unit-late.service"

    async def start_it() -> None:
        await asyncio.sleep(1.0)
        unit.write_text("active\n")

    task = asyncio.create_task(start_it())
    report = await checker(fake_systemd, required_units=("late.service",), total_timeout=10).run()
    await task
    assert report.ok, report.reason


async def test_health_missing_systemctl_is_a_failure(fake_systemd: Path, tmp_path: Path) -> None:
    report = await checker(fake_systemd, systemctl=str(tmp_path / "nope")).run()
    assert report.reason.startswith("system: cannot run ") and "No such file" in report.reason


def test_health_from_config_reads_the_agent_settings(tmp_path: Path) -> None:
    class Settings:
        required_units = ("a.service",)
        health_d = tmp_path
        script_timeout = 3.0
        total_timeout = 9.0
        check_systemd = False
        broker = "ignore"
        broker_timeout = 4.0

    c = HealthChecker.from_config(Settings())
    assert (c.required_units, c.health_d, c.script_timeout, c.total_timeout) == (
        ("a.service",),
        tmp_path,
        3.0,
        9.0,
    )
    assert (c.check_systemd, c.broker_policy, c.broker_timeout) == (False, "ignore", 4.0)


def test_health_report_serialises() -> None:
    r = HealthReport((CheckResult("x", Outcome.FAILED, "why", 0.12345),))
    assert r.to_dict() == {
        "ok": False,
        "reason": "x: why",
        "checks": [{"name": "x", "outcome": "failed", "detail": "why", "seconds": 0.123}],
    }


async def test_health_keyring_must_load(fake_systemd: Path, tmp_path: Path) -> None:
    from otad.bundle import generate_private_key, key_id_of, public_key_pem

    keyring = tmp_path / "keyring"
    keyring.mkdir()
    missing = await checker(fake_systemd, keyring=keyring / "missing").run()
    assert not missing.ok and "keyring: " in missing.reason and "missing" in missing.reason
    key = generate_private_key()
    key_id = key_id_of(key)
    (keyring / f"{key_id}.pem").write_bytes(public_key_pem(key))
    report = await checker(fake_systemd, keyring=keyring).run()
    assert report.ok
    assert [c.detail for c in report.checks if c.name == "keyring"] == [f"trusts {key_id}"]
    (keyring / "revoked").write_text("not-a-key-id\n")
    report = await checker(fake_systemd, keyring=keyring).run()
    assert not report.ok and "keyring: " in report.reason and "revoked" in report.reason
    # no keyring given (a checker of scripts only): no keyring check at all
    assert not [c for c in (await checker(fake_systemd).run()).checks if c.name == "keyring"]

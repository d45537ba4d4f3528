"""Post-reboot health checks: is the slot that just booted fit to be committed?

Checks, all bounded in time, run concurrently (scripts one after the other, in name order):

``system``
    ``systemctl is-system-running`` (never ``--wait``: the check itself runs inside the boot
    transaction - otad-health.service is RequiredBy=boot-complete.target, and the agent's own
    unit is not started yet - so waiting for the boot to finish would wait for itself). Passes
    when ``running``. ``initializing``/``starting`` (what the check normally sees: systemd says
    ``degraded`` only once the boot is over) pass only if ``systemctl list-units
    --state=failed`` lists no unit; failed units fail the check, named, and so does a list that
    cannot be had. Fails when ``degraded`` (the reason names the failed units),
    ``maintenance``, ``stopping``, ``offline`` or anything else. Not under systemd (no
    ``/run/systemd/system``): reported as *skipped* - visible in the report, never a silent
    pass - and it does not fail the result, because there is nothing to ask.
``unit:<name>``
    each required unit must become ``active``: ``systemctl is-active`` is polled until the
    deadline (the units are ordered independently of the check); ``failed`` fails at once. A
    required unit on a system without systemd *fails*: a configured check that cannot run is
    a failure, never a pass.
``script:<name>``
    every executable in the health.d directory, run with a timeout; exit status 0 passes. The
    script's exit ends it, not the end of its output: its process group is killed once it
    exits or its time is up, so processes it started do not outlive it (unless they left its
    session). A failure names the last line of its output (after a timeout the last complete
    one; only the last few KiB are kept). Non-executable files are reported as skipped.
``keyring``
    the agent's keyring must load (a new image that cannot verify bundles would never be
    updated again); passes naming the trusted key ids. Only when a keyring path is given.
``broker``
    the agent passes an async callable ``reachable(within_seconds) -> bool``; policy
    ``required`` fails the check when it returns False or raises, ``ignore`` reports it skipped.

The result (:class:`HealthReport`) has one :class:`CheckResult` per check and a short
``reason`` for the shadow report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import structlog

from otad.bundle import Keyring
from otad.errors import KeyringError

__layer__ = "adapter"

log = structlog.get_logger(__name__)

SYSTEMD_MARKER = Path("/run/systemd/system")
BrokerProbe = Callable[[float], Awaitable[bool]]
_OUTPUT_LIMIT = 200
#: Output kept per program: its tail only, so a script that prints without end costs no memory.
_TAIL_BYTES = 4096
#: After the kill: how long to wait for the program to be reaped and its output to end.
_KILL_GRACE = 5.0
_CANNOT_RUN = -1  # _run's status when the program could not be started at all
#: Boot still in progress: the check runs inside the boot transaction, so it never waits for
#: the boot to finish (that would include waiting for itself). systemd says ``degraded`` only
#: once the boot is done, so in these states the failed units are listed instead.
_SYSTEM_BOOTING = frozenset({"initializing", "starting"})


class Outcome(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class CheckResult:
    name: str
    outcome: Outcome
    detail: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "outcome": self.outcome.value,
            "detail": self.detail,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class HealthReport:
    checks: tuple[CheckResult, ...] = ()

    @property
    def ok(self) -> bool:
        """No check failed (skipped checks are listed in ``reason``, they do not pass)."""
        return not any(c.outcome == Outcome.FAILED for c in self.checks)

    @property
    def reason(self) -> str:
        failed = [f"{c.name}: {c.detail}" for c in self.checks if c.outcome == Outcome.FAILED]
        skipped = [c.name for c in self.checks if c.outcome == Outcome.SKIPPED]
        if failed:
            return "; ".join(failed)
        passed = sum(c.outcome == Outcome.PASSED for c in self.checks)
        text = f"{passed} checks passed"
        return f"{text}, skipped: {', '.join(skipped)}" if skipped else text

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "reason": self.reason, "checks": [c.to_dict() for c in self.checks]}


class HealthSettings(Protocol):
    """What :meth:`HealthChecker.from_config` reads (the agent's ``[health]`` table)."""

    @property
    def required_units(self) -> tuple[str, ...]: ...
    @property
    def health_d(self) -> Path: ...
    @property
    def script_timeout(self) -> float: ...
    @property
    def total_timeout(self) -> float: ...
    @property
    def check_systemd(self) -> bool: ...
    @property
    def broker(self) -> str: ...
    @property
    def broker_timeout(self) -> float: ...


@dataclass(frozen=True)
class HealthChecker:
    """Runs the configured checks; see the module docstring for what each one means."""

    required_units: tuple[str, ...] = ()
    health_d: Path | None = None
    script_timeout: float = 30.0
    total_timeout: float = 120.0
    check_systemd: bool = True
    broker: BrokerProbe | None = None
    broker_policy: str = "required"  # required | ignore
    broker_timeout: float = 60.0
    keyring: Path | None = None
    systemctl: str = "systemctl"
    systemd_marker: Path = SYSTEMD_MARKER
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(
        cls, config: HealthSettings, *, broker: BrokerProbe | None = None, **overrides: object
    ) -> HealthChecker:
        values: dict[str, object] = {
            "required_units": tuple(config.required_units),
            "health_d": config.health_d,
            "script_timeout": config.script_timeout,
            "total_timeout": config.total_timeout,
            "check_systemd": config.check_systemd,
            "broker": broker,
            "broker_policy": config.broker,
            "broker_timeout": config.broker_timeout,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    @property
    def under_systemd(self) -> bool:
        return self.systemd_marker.is_dir()

    async def run(self) -> HealthReport:
        """Run every check; never longer than ``total_timeout`` (+ the kill grace period)."""
        deadline = time.monotonic() + self.total_timeout
        groups: list[Awaitable[list[CheckResult]]] = [
            self._system(deadline),
            self._units(deadline),
            self._scripts(deadline),
            self._broker(deadline),
            self._keyring(),
        ]
        results = await asyncio.gather(*groups)
        report = HealthReport(tuple(c for group in results for c in group))
        log.info(
            "health_checked",
            ok=report.ok,
            reason=report.reason,
            checks={c.name: c.outcome.value for c in report.checks},
        )
        return report

    # --- systemd ---------------------------------------------------------------------------

    async def _system(self, deadline: float) -> list[CheckResult]:
        if not self.check_systemd:
            return []
        start = time.monotonic()
        if not self.under_systemd:
            return [CheckResult("system", Outcome.SKIPPED, "not running under systemd")]
        code, out = await _run([self.systemctl, "is-system-running"], _left(deadline), self.env)
        took = time.monotonic() - start
        if code is None:
            return [CheckResult("system", Outcome.FAILED, "systemctl did not answer", took)]
        if code == _CANNOT_RUN:
            return [CheckResult("system", Outcome.FAILED, out, took)]
        state = out.strip().splitlines()[-1] if out.strip() else f"exit status {code}"
        if state == "running":
            return [CheckResult("system", Outcome.PASSED, state, took)]
        if state not in _SYSTEM_BOOTING and state != "degraded":
            return [CheckResult("system", Outcome.FAILED, f"system is {state}", took)]
        failed = await self._failed_units(deadline)
        took = time.monotonic() - start
        if state in _SYSTEM_BOOTING and failed == "":
            return [CheckResult("system", Outcome.PASSED, state, took)]
        # while booting, a unit that already failed fails the check now: systemd would say
        # "degraded" only once the boot is over, after the check
        if failed:
            because = f"failed units: {failed}"
        elif state == "degraded":
            because = "a unit failed"
        else:
            because = "cannot list the failed units"
        return [CheckResult("system", Outcome.FAILED, f"system is {state} ({because})", took)]

    async def _failed_units(self, deadline: float) -> str | None:
        """The failed units, comma-separated ("" for none); None when systemctl gives no list."""
        code, out = await _run(
            [self.systemctl, "list-units", "--state=failed", "--plain", "--no-legend", "--full"],
            min(5.0, _left(deadline)),
            self.env,
        )
        if code != 0:  # no answer, or an error message (stderr is merged): not a list of units
            return None
        # the unit is the first column; some systemd versions mark a failed unit with a "●"
        rows = (line.replace("●", " ").split() for line in out.splitlines())
        return ", ".join(row[0] for row in rows if row)[:_OUTPUT_LIMIT]

    async def _units(self, deadline: float) -> list[CheckResult]:
        if not self.required_units:
            return []
        if not self.under_systemd:
            return [
                CheckResult(f"unit:{u}", Outcome.FAILED, "cannot check: not running under systemd")
                for u in self.required_units
            ]
        return list(await asyncio.gather(*(self._unit(u, deadline) for u in self.required_units)))

    async def _unit(self, unit: str, deadline: float) -> CheckResult:
        start = time.monotonic()
        state = "unknown"
        # bounded: each round waits 0.5 s and the deadline ends the loop
        while True:
            code, out = await _run([self.systemctl, "is-active", unit], _left(deadline), self.env)
            if code == _CANNOT_RUN:
                return CheckResult(f"unit:{unit}", Outcome.FAILED, out, time.monotonic() - start)
            if code is not None:
                state = out.strip() or f"exit status {code}"
            if state == "active":
                return CheckResult(f"unit:{unit}", Outcome.PASSED, state, time.monotonic() - start)
            # not started yet (inactive) or on its way: wait; failed (or gone) is final
            if state in ("failed", "unknown") or code is None or _left(deadline) <= 0.5:
                return CheckResult(
                    f"unit:{unit}", Outcome.FAILED, f"unit is {state}", time.monotonic() - start
                )
            await asyncio.sleep(0.5)

    # --- health.d ----------------------------------------------------------------------------

    async def _scripts(self, deadline: float) -> list[CheckResult]:
        if self.health_d is None or not self.health_d.is_dir():
            return []
        results: list[CheckResult] = []
        for path in sorted(self.health_d.iterdir()):
            name = f"script:{path.name}"
            if path.name.startswith(".") or path.name.endswith("~") or path.is_dir():
                continue
            if not os.access(path, os.X_OK):
                results.append(CheckResult(name, Outcome.SKIPPED, "not executable"))
                continue
            timeout = min(self.script_timeout, _left(deadline))
            start = time.monotonic()
            code, out = await _run([str(path)], timeout, self.env)
            took = time.monotonic() - start
            if code == 0:
                results.append(CheckResult(name, Outcome.PASSED, "exit status 0", took))
                continue
            if code is None:
                # killed in the middle of a line: the last whole line says more
                detail, last = f"timed out after {timeout:.1f}s", _last_line(out, whole=True)
            else:
                detail, last = f"exit status {code}", _last_line(out)
            detail += f": {last}" if last else ""
            results.append(CheckResult(name, Outcome.FAILED, detail, took))
        return results

    # --- broker ------------------------------------------------------------------------------

    async def _broker(self, deadline: float) -> list[CheckResult]:
        if self.broker_policy == "ignore":
            return [CheckResult("broker", Outcome.SKIPPED, "policy: ignore")]
        if self.broker is None:
            return [CheckResult("broker", Outcome.FAILED, "no broker probe configured")]
        within = min(self.broker_timeout, _left(deadline))
        start = time.monotonic()
        try:
            async with asyncio.timeout(within + 1.0):
                reachable = await self.broker(within)
        except TimeoutError:
            reachable, why = False, f"no answer within {within:.1f}s"
        except Exception as exc:  # the probe is the agent's code: its failure is a check failure
            reachable, why = False, f"probe failed: {exc}"
        else:
            why = f"not reachable within {within:.1f}s"
        took = time.monotonic() - start
        if reachable:
            return [CheckResult("broker", Outcome.PASSED, "reachable", took)]
        return [CheckResult("broker", Outcome.FAILED, why, took)]

    async def _keyring(self) -> list[CheckResult]:
        if self.keyring is None:
            return []
        start = time.monotonic()
        try:
            keyring = await asyncio.to_thread(Keyring.load, self.keyring)
        except KeyringError as exc:
            return [CheckResult("keyring", Outcome.FAILED, exc.message, time.monotonic() - start)]
        trusted = f"trusts {' '.join(keyring.key_ids)}"
        return [CheckResult("keyring", Outcome.PASSED, trusted, time.monotonic() - start)]


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _last_line(out: str, *, whole: bool = False) -> str:
    """The last non-blank line of ``out``, cut to ``_OUTPUT_LIMIT``; ``whole``: ignore an
    unfinished last line (one without its newline) if a finished one comes before it."""
    if whole and not out.endswith("\n") and "\n" in out:
        out = out[: out.rindex("\n")]
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[-1][:_OUTPUT_LIMIT] if lines else ""


class _Program(asyncio.SubprocessProtocol):
    """Keeps the tail of a program's output and tells when it exits.

    Not ``create_subprocess_exec``: its ``wait()`` (3.11) returns only once the output is
    closed too, which a background child of the program can keep open as long as it likes,
    and its reader buffers everything the program prints.
    """

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()  # exited and output closed
        self._tail = bytearray()

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        self._tail += data.encode() if isinstance(data, str) else data
        del self._tail[:-_TAIL_BYTES]

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    @property
    def output(self) -> str:
        return self._tail.decode("utf-8", "replace")


async def _run(argv: list[str], seconds: float, env: Mapping[str, str]) -> tuple[int | None, str]:
    """Run ``argv`` for at most ``seconds``; (exit status or None on timeout, output's tail).

    The program gets its own session (so its own process group), killed as a whole once the
    program exits, its time is up or the caller is cancelled: its children cannot outlive it.
    """
    loop = asyncio.get_running_loop()
    try:
        transport, program = await loop.subprocess_exec(
            _Program,
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env},
        )
    except OSError as exc:
        return _CANNOT_RUN, f"cannot run {argv[0]}: {exc.strerror or exc}"
    pid = transport.get_pid()
    code: int | None = None
    try:
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await asyncio.shield(program.exited)
            code = transport.get_returncode()
        finally:
            # exited, timed out or cancelled: whatever the program started dies with it
            if _kill_group(pid) and code is not None:
                log.info("health_program_children_killed", program=argv[0], pid=pid)
        # bounded: the kill ended every writer of the output, so its end (and the reaping of
        # the program) follows at once - unless a child left the session: then it is cut off
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_KILL_GRACE):
                await asyncio.shield(program.finished)
    finally:
        transport.close()  # closes the pipe; kills the program if still there (reaped later)
    return code, program.output


def _kill_group(pid: int) -> bool:
    """SIGKILL the process group ``pid`` leads; whether any process was still in it."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True

"""`otad agent ...`: the device agent: run the daemon, local status, installs, marks, health.

Argument parsing and printing only; the work is in :mod:`otad.agent.daemon` and friends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otad.agent import config as agent_config
from otad.agent.bootloader import BootState, other_slot
from otad.agent.config import AgentConfig
from otad.errors import BrokerError, OtadError

if TYPE_CHECKING:
    from otad.agent.update import HealthResult

# The agent's runtime (aiomqtt, pyudev, the download client) is imported inside the handlers:
# every `otad` command imports this module, and `otad bundle ...` must run on a build host
# without them.

__layer__ = "cli"

SLOT_CHOICES = ("booted", "other", "A", "B")


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = groups.add_parser(
        "agent",
        help="The device agent: run the daemon, local status and installs.",
        description="The device agent: run the daemon, local status and installs.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, handler: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--config",
            type=Path,
            default=agent_config.DEFAULT_PATH,
            help=f"agent config file (default {agent_config.DEFAULT_PATH})",
        )
        sub.set_defaults(handler=handler)
        return sub

    command("run", "Run the agent daemon until SIGTERM/SIGINT.", _run)
    status = command("status", "Show the booted slot, versions, bootloader and job state.", _status)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    install = command(
        "install",
        "Install a bundle file or an https:// URL now (the same path as a job).",
        _install,
    )
    install.add_argument("bundle", help="bundle file or https:// URL")
    install.add_argument(
        "--no-reboot", action="store_true", help="switch the slot but do not reboot"
    )
    good = command("mark-good", "Commit a slot in the bootloader (default: booted).", _mark_good)
    good.add_argument("slot", nargs="?", default="booted", choices=SLOT_CHOICES)
    good.add_argument(
        "--force", action="store_true", help="also a slot a job is writing or has not verified"
    )
    bad = command("mark-bad", "Mark a slot not bootable (default: booted).", _mark_bad)
    bad.add_argument("slot", nargs="?", default="booted", choices=SLOT_CHOICES)
    bad.add_argument("--force", action="store_true", help="even if no bootable slot is left")
    command(
        "health-check",
        "Run the configured health checks; exit 0 when healthy, 1 when not.",
        _health_check,
    )


# --- run -------------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> int:
    from otad.agent.daemon import Agent
    from otad.agent.wiring import limit_malloc_arenas

    config = agent_config.load(args.config)
    limit_malloc_arenas()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            # a second signal: the operator does not want to wait for a graceful stop
            print(f"otad: {signal.Signals(signum).name} again, exiting now", file=sys.stderr)
            os._exit(130)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await Agent(config).run(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


# --- status ----------------------------------------------------------------------------------


def _resolve_slot(config: AgentConfig, which: str) -> tuple[str, str]:
    """(booted slot, the slot ``which`` names)."""
    from otad.agent.slots import booted_slot
    from otad.agent.wiring import make_layout

    booted = booted_slot(make_layout(config), override=config.slots.booted)
    if which == "booted":
        return booted, booted
    if which == "other":
        return booted, other_slot(booted)
    return booted, which


def collect_status(config: AgentConfig) -> dict[str, Any]:
    """Everything `otad agent status` shows, as one JSON-friendly object."""
    from otad.agent.journal import Journal
    from otad.agent.machine import reported_state
    from otad.agent.slots import booted_slot
    from otad.agent.update import DeviceState
    from otad.agent.wiring import make_bootloader, make_layout
    from otad.bundle import Keyring

    booted = booted_slot(make_layout(config), override=config.slots.booted)
    device = DeviceState.load(config.state_dir)
    out: dict[str, Any] = {
        "device": config.device_id,
        "compatible": config.compatible,
        "booted": booted,
        "version": device.versions.get(booted, "unknown"),
        "versions": device.versions,
        "securityVersion": device.security_version,
    }
    try:
        out["bootloader"] = {
            "type": config.bootloader.type,
            **make_bootloader(config).state().to_dict(),
        }
    except OtadError as exc:
        out["bootloader"] = {"type": config.bootloader.type, "error": exc.to_wire()}
    try:
        keyring = Keyring.load(config.keyring)
    except OtadError as exc:
        out["keyring"] = {"path": str(config.keyring), "error": exc.to_wire()}
    else:
        out["keyring"] = {
            "path": str(config.keyring),
            "keyIds": keyring.key_ids,
            "revoked": sorted(keyring.revoked),
        }
    try:
        record = Journal(config.state_dir, boot_id="").load()
    except OtadError as exc:
        out["job"] = {"error": exc.to_wire()}
    else:
        out["job"] = (
            None
            if record is None
            else {
                "jobId": record.job_id,
                "state": reported_state(record.state),
                "journalState": record.state.value,
                "version": record.version,
                "targetSlot": record.target_slot,
                "transitions": record.transitions,
                "reported": record.reported,
                "error": dict(record.error) if record.error else None,
            }
        )
    return out


def _status(args: argparse.Namespace) -> int:
    status = collect_status(agent_config.load(args.config))
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(f"device:      {status['device']} ({status['compatible']})")
    print(f"booted slot: {status['booted']}  version {status['version']}")
    print(f"security:    floor {status['securityVersion']}")
    boot = status["bootloader"]
    if "error" in boot:
        print(f"bootloader:  {boot['type']}: {boot['error']['message']}")
    else:
        print(f"bootloader:  {boot['type']}, order {' '.join(boot['order'])}, next {boot['next']}")
        for name, slot in boot["slots"].items():
            flags = ", ".join(f for f, on in (("good", slot["good"]), ("bad", slot["bad"])) if on)
            print(f"  slot {name}: tries left {slot['triesLeft']}{', ' + flags if flags else ''}")
    keyring = status["keyring"]
    if "error" in keyring:
        print(f"keyring:     {keyring['error']['code']}: {keyring['error']['message']}")
    else:
        revoked = f", revoked {' '.join(keyring['revoked'])}" if keyring["revoked"] else ""
        print(f"keyring:     trusts {' '.join(keyring['keyIds'])}{revoked}")
    job = status["job"]
    if job is None:
        print("job:         none")
    elif "jobId" not in job:
        print(f"job:         journal unreadable: {job['error']['message']}")
    else:
        line = f"job:         {job['jobId']} {job['state']} (target {job['targetSlot']})"
        if job["error"]:
            line += f": {job['error']['code']}: {job['error']['message']}"
        print(line)
    return 0


# --- marks -----------------------------------------------------------------------------------


def _mark(args: argparse.Namespace, good: bool) -> int:
    from otad.agent.wiring import make_bootloader

    config = agent_config.load(args.config)
    booted, slot = _resolve_slot(config, args.slot)
    bootloader = make_bootloader(config)
    if good:
        if not args.force:
            _check_mark_good(config, booted, slot)
        bootloader.mark_good(slot)
    else:
        if not args.force:
            _check_mark_bad(bootloader.state(), slot)
        bootloader.mark_bad(slot)
    role = "booted" if slot == booted else "other"
    print(f"slot {slot} marked {'good' if good else 'bad'} ({role})")
    return 0


def _check_mark_good(config: AgentConfig, booted: str, slot: str) -> None:
    """Refuse to commit a slot the journal says a job is writing, has not verified, or is
    rolling back: the bootloader would boot it as good. The one job step where a slot may be
    committed from outside is its trial boot (an external health check's verdict)."""
    from otad.agent.journal import Journal
    from otad.agent.machine import UNFINISHED_STATES, State
    from otad.errors import JournalCorrupt, MarkRefused

    try:
        record = Journal(config.state_dir, boot_id="").load()
    except JournalCorrupt as exc:
        raise MarkRefused(
            f"mark-good: the journal is unreadable, so whether slot {slot} holds a verified "
            f"image is unknown ({exc.message}); --force to commit it anyway"
        ) from exc
    if record is None or record.state not in UNFINISHED_STATES or record.target_slot != slot:
        return
    if record.state == State.VERIFYING and slot == booted:
        return
    raise MarkRefused(
        f"mark-good: slot {slot} is the target of job {record.job_id}, which is "
        f"{record.state.value}: it is not verified to boot; --force to commit it anyway"
    )


def _check_mark_bad(state: BootState, slot: str) -> None:
    """Refuse a mark that leaves no bootable slot: the bootloader's last resort would then
    boot a slot it was told not to."""
    from otad.errors import MarkRefused

    other = other_slot(slot)
    if not state.slot(slot).bad and not state.slot(other).bootable:
        raise MarkRefused(
            f"mark-bad: slot {other} is not bootable, so marking slot {slot} bad leaves no "
            "bootable slot; --force to mark it anyway"
        )


def _mark_good(args: argparse.Namespace) -> int:
    return _mark(args, True)


def _mark_bad(args: argparse.Namespace) -> int:
    return _mark(args, False)


# --- health ----------------------------------------------------------------------------------


async def broker_reachable(config: AgentConfig, within: float) -> bool:
    """Connect to the broker with the device identity (another client id) and disconnect."""
    from otad.agent.mqtt import probe_broker

    try:
        await probe_broker(config, within)
    except BrokerError:
        return False
    return True


async def run_health(config: AgentConfig) -> HealthResult:
    from otad.agent.health import HealthChecker
    from otad.agent.update import HealthResult

    async def broker(within: float) -> bool:
        return await broker_reachable(config, within)

    checker = HealthChecker.from_config(config.health, broker=broker, keyring=config.keyring)
    report = await checker.run()
    for check in report.checks:
        print(f"{check.outcome.value:8} {check.name} {check.detail}".rstrip())
    return HealthResult(report.ok, report.reason)


async def _health_check(args: argparse.Namespace) -> int:
    result = await run_health(agent_config.load(args.config))
    if result.ok:
        print("healthy")
        return 0
    print(f"unhealthy: {result.reason}", file=sys.stderr)
    return 1


# --- install ---------------------------------------------------------------------------------


class _ProgressReporter:
    """Shows the reported software state as a rich progress bar instead of sending it."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), transient=False
        )
        self.task = self.progress.add_task("starting", total=100)
        self.last: Mapping[str, Any] = {}
        self._seq = 0

    def report(self, reported: Mapping[str, Any], *, client_token: str | None = None) -> int:
        software = reported.get("software") or {}
        self.last = software
        state = software.get("state", "?")
        percent = software.get("progress") or 0
        self.progress.update(self.task, description=state, completed=percent)
        error = software.get("error")
        if error:
            self.progress.console.print(f"[red]{error['code']}[/red]: {error['message']}")
        self._seq += 1
        return self._seq

    async def flush(self, within: float) -> bool:
        return True


def _install(args: argparse.Namespace) -> Any:
    """Resolve the source here (blocking path checks), then run the install coroutine."""
    source = args.bundle
    if source.startswith("https://"):
        url = source
    elif "://" in source:
        raise OtadError(f"install: only https:// URLs or local files, got {source.split(':')[0]}")
    else:
        path = Path(os.path.abspath(source))
        if not os.path.isfile(path):
            raise OtadError(f"install: no bundle file at {path}")
        url = f"file://{path}"
    return _install_job(args, url)


async def _install_job(args: argparse.Namespace, url: str) -> int:
    from otad.agent.download import Downloader
    from otad.agent.journal import Journal
    from otad.agent.slots import booted_slot
    from otad.agent.update import DesiredSoftware, HealthResult, RebootPending, UpdateRunner
    from otad.agent.wiring import (
        command_rebooter,
        limit_malloc_arenas,
        make_bootloader,
        make_layout,
    )
    from otad.bundle import Keyring

    config = agent_config.load(args.config)
    limit_malloc_arenas()
    job = DesiredSoftware(version="", url=url, job_id=f"local-{int(time.time())}")
    journal = Journal(config.state_dir)
    await asyncio.to_thread(journal.acquire)  # AgentLocked while the daemon runs
    downloader = Downloader(config)
    reporter = _ProgressReporter()
    rebooted = False

    async def reboot() -> None:
        nonlocal rebooted
        rebooted = True
        if not args.no_reboot:
            await command_rebooter(config.reboot_command)()

    async def no_health() -> HealthResult:  # pragma: no cover - install never verifies
        return HealthResult(False, "install does not run health checks")

    try:
        layout = make_layout(config)
        booted = booted_slot(layout, override=config.slots.booted)
        runner = UpdateRunner(
            config,
            bootloader=make_bootloader(config),
            journal=journal,
            booted_slot=booted,
            layout=layout,
            downloader=downloader,
            reporter=reporter,
            rebooter=reboot,
            health=no_health,
            keyring=await asyncio.to_thread(Keyring.load, config.keyring),
        )
        with reporter.progress, contextlib.suppress(RebootPending):
            await runner.run_job(job)
    finally:
        await downloader.close()
        journal.release()
    software = reporter.last
    if software.get("state") == "failed":
        error = software.get("error") or {}
        print(f"otad: install failed: {error.get('code')}: {error.get('message')}", file=sys.stderr)
        return 1
    target = other_slot(booted)
    if args.no_reboot:
        print(f"installed into slot {target}; it boots once on the next reboot")
    else:
        print(f"installed into slot {target}; rebooting")
    return 0 if rebooted else 1

"""`otad demo`: the whole system on loopback, in about a minute.

It makes a throwaway cloud dir (CA, device certificates, signing key), starts Mosquitto with TLS
and ACLs, runs the replica, the artifact store and the rollout service in this process, builds and
signs a small bundle, boots simulated devices (real agents on sim hardware, a few of them made to
fail), rolls the bundle out in waves with a live table, prints a summary, and stops everything it
started. Logs go to a file in the demo dir, not to the screen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from otad.errors import OtadError

if TYPE_CHECKING:
    from rich.console import Console

    from otad.cloud import rollout_plan as plan
    from otad.cloud.pki import CloudDir

__layer__ = "cli"

# Heavy modules (the cloud, the agent, rich.live) are imported inside the functions, so other
# commands do not pay for them (see otad/cli/__init__.py).

COMPATIBLE = "otad-demo"
IMAGE_SIZE = 96 * 1024
SLOT_SIZE = 128 * 1024
DEADLINE = 150.0  # seconds for the rollout itself; the demo never hangs


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = groups.add_parser(
        "demo",
        help="Run the end-to-end demo on loopback.",
        description="Run the end-to-end demo on loopback: broker, cloud, simulated devices, "
        "a rollout in waves with a live table. Needs mosquitto; no network beyond 127.0.0.1.",
    )
    parser.add_argument(
        "--devices", type=int, default=20, metavar="N", help="simulated devices (default 20)"
    )
    parser.add_argument(
        "--fail-health", type=int, default=1, metavar="N", help="devices failing health (1)"
    )
    parser.add_argument(
        "--fail-boot", type=int, default=1, metavar="N", help="devices whose update panics (1)"
    )
    parser.add_argument(
        "--waves", default="1,5,50%,100%", help="cumulative wave targets (1,5,50%%,100%%)"
    )
    parser.add_argument("--max-failure-rate", default="20%", metavar="RATE", help="per wave (20%%)")
    parser.add_argument("--dir", type=Path, help="keep the demo files here (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=7, help="which devices fail (7)")
    parser.add_argument(
        "--no-live", action="store_true", help="plain progress lines instead of a live table"
    )
    parser.set_defaults(handler=cmd_demo)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from otad import logs

    if args.devices < 2:
        raise OtadError("demo: --devices must be at least 2")
    if args.fail_health + args.fail_boot >= args.devices:
        raise OtadError("demo: leave at least one device that succeeds")
    console = Console()
    with contextlib.ExitStack() as stack:
        if args.dir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="otad-demo-")))
        else:
            root = args.dir.resolve()
            root.mkdir(parents=True, exist_ok=True)
        log_file = stack.enter_context((root / "demo.log").open("w"))
        logs.configure(level="info", stream=log_file)
        # Runs before the file closes (last in, first out): late log lines go to stderr.
        stack.callback(logs.configure, level="warning")
        return await run_demo(args, root, console)
    return 1  # pragma: no cover (the with block always returns)


async def run_demo(args: argparse.Namespace, root: Path, console: Console) -> int:
    from rich.panel import Panel

    from otad.cli.fleet import create_rollout, make_fleet
    from otad.cloud import rollout_plan as plan
    from otad.cloud.broker import BrokerProcess
    from otad.cloud.pki import init_cloud
    from otad.cloud.server import CloudServer

    started = time.monotonic()
    ids = [f"dev-{n:02d}" for n in range(1, args.devices + 1)]

    def step(text: str) -> None:
        console.print(f"[bold cyan]>[/] {text} [dim]({time.monotonic() - started:.1f}s)[/]")

    console.print(
        Panel.fit("otad demo: an A/B update rolled out to a simulated fleet", style="bold")
    )
    cloud_path = root / "cloud"
    cloud = await asyncio.to_thread(
        init_cloud, cloud_path, ids, broker_port=free_port(), store_port=free_port()
    )
    step(f"cloud dir with a CA, {len(ids)} device certificates and a signing key: {cloud_path}")

    bundle = root / "demo-2.0.bundle"
    await asyncio.to_thread(make_bundle, cloud, root / "rootfs-2.0.img", bundle)
    step(f"signed bundle: version 2.0, {bundle.stat().st_size:,} bytes")

    broker = BrokerProcess(cloud, log_path=root / "mosquitto.log")
    await asyncio.to_thread(broker.start)
    try:
        config = cloud.config()
        step(f"mosquitto on 127.0.0.1:{config.broker_port} (TLS, client certificates, ACL)")
        async with CloudServer(cloud) as local:
            step(f"replica, artifact store ({local.store.url}) and rollout service running")
            fleet = make_fleet(
                cloud,
                ids,
                root / "devices",
                fail_health=args.fail_health / len(ids),
                fail_boot=args.fail_boot / len(ids),
                seed=args.seed,
                spare=1,
                slot_size=SLOT_SIZE,
                compatible=COMPATIBLE,
            )
            await fleet.start()
            try:
                bad = sorted(fleet.faults.fail_health | fleet.faults.fail_boot)
                step(
                    f"{len(ids)} simulated devices booted on slot A, version 1.0 "
                    f"(made to fail: {', '.join(bad) or 'none'})"
                )
                rollout = await asyncio.to_thread(
                    create_rollout,
                    cloud_path,
                    str(bundle),
                    devices=",".join(ids),
                    waves=args.waves,
                    max_failure_rate=args.max_failure_rate,
                    wave_timeout="2m",
                )
                step(
                    f"rollout {rollout.id}: waves {', '.join(map(str, rollout.waves))}, "
                    f"pause above {rollout.max_failure_rate:.0%} failures in a wave"
                )
                rollout, devices = await follow(cloud_path, rollout.id, console, args.no_live)
            finally:
                await fleet.stop()
        step("devices, replica, store and rollout service stopped")
    finally:
        await asyncio.to_thread(broker.stop)
    step("mosquitto stopped")
    print_summary(console, rollout, devices, time.monotonic() - started, root, args.dir is not None)
    return 0 if rollout.state == plan.RolloutState.COMPLETED else 1


def make_bundle(cloud: CloudDir, image: Path, out: Path) -> None:
    from otad.bundle import build_bundle, load_private_key

    # Random bytes (not zeros), so compression and hashing do real work on a small image.
    image.write_bytes(random.Random(2).randbytes(IMAGE_SIZE))
    build_bundle(
        image,
        out,
        key=load_private_key(cloud.signing_key),
        version="2.0",
        compatible=COMPATIBLE,
    )


async def follow(
    cloud_path: Path, rollout_id: str, console: Console, plain: bool
) -> tuple[plan.Rollout, dict[str, plan.DeviceRecord]]:
    """Live table until the rollout ends; a pause is shown, then resumed as an operator would."""
    from rich.live import Live

    from otad.cli.fleet import request_action
    from otad.cloud import rollout_db as db
    from otad.cloud import rollout_plan as plan
    from otad.cloud import rollout_view as view
    from otad.cloud.pki import CloudDir

    store = db.RolloutDB(CloudDir(cloud_path).config().db_path)
    deadline = time.monotonic() + DEADLINE

    def load() -> tuple[plan.Rollout, dict[str, plan.DeviceRecord]]:
        return store.run(lambda c: (db.load_rollout(c, rollout_id), db.load_devices(c, rollout_id)))

    try:
        rollout, devices = await asyncio.to_thread(load)
        live = None if plain else Live(console=console, refresh_per_second=8, transient=False)
        last_line = ""
        with live or contextlib.nullcontext():
            while time.monotonic() < deadline:
                rollout, devices = await asyncio.to_thread(load)
                if live is not None:
                    live.update(view.render_rollout(rollout, devices, time.time()))
                else:
                    counts = view.outcome_counts(devices.values())
                    line = f"  {rollout.state.value} wave {rollout.current_wave + 1}: {counts}"
                    if line != last_line:
                        console.print(line)
                        last_line = line
                if rollout.state == plan.RolloutState.PAUSED:
                    console.print(
                        f"[bold yellow]paused by itself:[/] {rollout.reason}\n"
                        "[dim]an operator would look at the failures now; the demo resumes "
                        f"(otad fleet resume DIR {rollout.id})[/]"
                    )
                    await asyncio.sleep(1.5)
                    await asyncio.to_thread(request_action, cloud_path, rollout.id, "resume", 10)
                    continue
                if not rollout.active:
                    break
                await asyncio.sleep(0.25)
        console.print()
        if rollout.active:
            await asyncio.to_thread(request_action, cloud_path, rollout.id, "abort", 10)
            rollout, devices = await asyncio.to_thread(load)
            console.print(f"[bold red]the rollout did not finish within {DEADLINE:.0f}s[/]")
        return rollout, devices
    finally:
        store.close()


def print_summary(
    console: Console,
    rollout: plan.Rollout,
    devices: dict[str, plan.DeviceRecord],
    elapsed: float,
    root: Path,
    kept: bool,
) -> None:
    from rich.panel import Panel
    from rich.table import Table

    from otad.cloud import rollout_plan as plan
    from otad.cloud import rollout_view as view

    counts = view.outcome_counts(devices.values())
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("rollout", f"{rollout.id}: {rollout.state.value}")
    table.add_row("updated to 2.0", f"[green]{counts['updated']}[/] of {len(devices)}")
    table.add_row(
        "rolled back", f"[yellow]{counts['rolled_back']}[/] (still running 1.0 on slot A)"
    )
    table.add_row("failed", f"[red]{counts['failed']}[/]")
    if counts["skipped"] or counts["not_done"]:
        table.add_row("not updated", str(counts["skipped"] + counts["not_done"]))
    failures = [d for d in devices.values() if d.state in plan.FAILURES]
    for d in failures:
        table.add_row("", f"{d.device_id}: {d.state.value} ({d.error_code})")
    rollout_time = (rollout.finished_at or time.time()) - rollout.created_at
    table.add_row("rollout time", plan.format_duration(rollout_time))
    table.add_row("total time", plan.format_duration(elapsed))
    table.add_row("files", str(root) if kept else f"removed ({root.name}; --dir keeps them)")
    style = "green" if rollout.state == plan.RolloutState.COMPLETED else "red"
    console.print(Panel(table, title="summary", border_style=style, expand=False))

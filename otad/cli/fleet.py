"""`otad fleet ...`: Rollouts across a fleet, fleet status, simulated devices."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otad.errors import RolloutError

if TYPE_CHECKING:
    from otad.cloud import rollout_plan as plan
    from otad.cloud.pki import CloudDir
    from otad.cloud.rollout_db import RolloutDB
    from otad.fleet.simulator import Fleet

__layer__ = "cli"

# The cloud, agent and rich.live modules are imported inside the functions: `otad bundle ...`
# must start on a build host that has none of aiohttp/aiomqtt, and every command starts faster.

REQUEST_WAIT = 10.0


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = groups.add_parser(
        "fleet",
        help="Rollouts across a fleet, fleet status, simulated devices.",
        description="Rollouts across a fleet, fleet status, simulated devices.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("rollout", help="start a rollout of an artifact in waves")
    p.add_argument("dir", type=Path, metavar="DIR", help="the cloud dir")
    p.add_argument("artifact", metavar="ARTIFACT", help="an artifact id, or a bundle file to add")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--devices", help="comma-separated device ids, in rollout order")
    target.add_argument("--group", help="a static group (otad fleet group)")
    p.add_argument("--waves", default="1,10,50,100%", help="cumulative counts or percentages")
    p.add_argument("--max-failure-rate", default="5%", help="per wave, e.g. 5%% or 0.05")
    p.add_argument("--wave-timeout", default="30m", help="e.g. 30m, 90s, 1h30m")
    p.add_argument(
        "--max-in-flight",
        type=int,
        metavar="N",
        help="at most N devices updating at once (default: a whole wave at once)",
    )
    p.set_defaults(handler=cmd_rollout)

    p = commands.add_parser("status", help="show a rollout (the latest one by default)")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("rollout", nargs="?", metavar="ROLLOUT")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.add_argument("--watch", action="store_true", help="live table until the rollout ends")
    p.add_argument("--all", action="store_true", help="list every rollout")
    p.set_defaults(handler=cmd_status)

    for action, text in (
        ("pause", "stop starting devices (those in flight finish)"),
        ("resume", "continue a paused rollout (accepts the failures of the current wave)"),
        ("abort", "end a rollout: devices not yet started never start; those in flight finish"),
    ):
        p = commands.add_parser(action, help=text)
        p.add_argument("dir", type=Path, metavar="DIR")
        p.add_argument("rollout", metavar="ROLLOUT")
        p.add_argument(
            "--wait",
            type=float,
            default=REQUEST_WAIT,
            metavar="SECONDS",
            help="how long to wait for the rollout service's answer (default 10)",
        )
        p.set_defaults(handler=cmd_action, action=action)

    p = commands.add_parser("devices", help="version, slot, last state, last seen per device")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_devices)

    p = commands.add_parser("group", help="show or change a static group")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--add", help="comma-separated device ids to add")
    p.add_argument("--remove", help="comma-separated device ids to remove")
    p.set_defaults(handler=cmd_group)

    p = commands.add_parser("simulate", help="run N simulated devices (real agents) here")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--devices", type=int, default=10, metavar="N")
    p.add_argument("--prefix", default="sim-", help="device id prefix (ids: sim-0001 ...)")
    p.add_argument("--fail-health", type=float, default=0.0, metavar="SHARE")
    p.add_argument("--fail-boot", type=float, default=0.0, metavar="SHARE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slot-size", type=int, default=256 * 1024, metavar="BYTES")
    p.add_argument("--version", default="1.0", help="factory version of slot A")
    p.add_argument("--compatible", default="otad-sim")
    p.add_argument("--state", type=Path, help="where device dirs live (default DIR/sim)")
    p.set_defaults(handler=cmd_simulate)


# --- helpers -------------------------------------------------------------------------------------


def open_db(cloud_dir: Path) -> RolloutDB:
    from otad.cloud.pki import CloudDir
    from otad.cloud.rollout_db import RolloutDB

    return RolloutDB(CloudDir(cloud_dir).config().db_path)


def resolve_artifact(cloud: CloudDir, artifact: str) -> tuple[str, str, int]:
    """(artifact id, version, size): an existing id, or a bundle file verified and added."""
    from otad.bundle import Keyring
    from otad.cloud.store import ArtifactRepository

    config = cloud.config()
    repository = ArtifactRepository(config.artifacts_dir)
    path = Path(artifact)
    if path.is_file():
        config.artifacts_dir.mkdir(parents=True, exist_ok=True)
        info = repository.import_file(path, Keyring.load(cloud.keyring_dir), uploader="otad-fleet")
    else:
        info = repository.info(artifact)
    version = info.manifest.get("version")
    if not isinstance(version, str) or not version:
        raise RolloutError(f"artifact {info.artifact_id} has no version in its manifest")
    return info.artifact_id, version, info.size


def create_rollout(
    cloud_dir: Path,
    artifact: str,
    *,
    devices: str | None = None,
    group: str | None = None,
    waves: str = "1,10,50,100%",
    max_failure_rate: str = "5%",
    wave_timeout: str = "30m",
    max_in_flight: int | None = None,
) -> plan.Rollout:
    """Validate everything, then store the rollout; the service starts it."""
    from otad.cloud import rollout_db as db
    from otad.cloud import rollout_plan as plan
    from otad.cloud.pki import CloudDir
    from otad.cloud.rollout import new_rollout_id

    cloud = CloudDir(cloud_dir)
    steps = plan.parse_waves(waves)
    rate = plan.parse_rate(max_failure_rate)
    timeout = plan.parse_duration(wave_timeout)
    store = open_db(cloud_dir)
    try:
        if group is not None:
            ids = tuple(store.run(lambda c: db.group_members(c, group)))
            if not ids:
                raise RolloutError(f"group {group!r} is empty or does not exist")
        else:
            ids = plan.parse_device_list(devices or "")
        known = set(cloud.device_ids())
        unknown = [d for d in ids if d not in known]
        if unknown:
            raise RolloutError(
                f"no identity in {cloud_dir} for: {', '.join(unknown[:5])}"
                + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
                + " (otad cloud add-device)"
            )
        artifact_id, version, size = resolve_artifact(cloud, artifact)
        rollout, records = plan.new_rollout(
            rollout_id=new_rollout_id(),
            artifact_id=artifact_id,
            version=version,
            bundle_size=size,
            devices=ids,
            waves=steps,
            max_failure_rate=rate,
            wave_timeout=timeout,
            now=time.time(),
            max_in_flight=max_in_flight,
        )
        store.run(lambda c: db.create_rollout(c, rollout, records))
    finally:
        store.close()
    return rollout


def request_action(cloud_dir: Path, rollout_id: str, action: str, wait: float) -> str | None:
    """Queue the action; the service's answer ("ok" / "error: ...") or None if it is not running."""
    from otad.cloud import rollout_db as db

    store = open_db(cloud_dir)
    try:
        seq = store.run(lambda c: db.add_request(c, rollout_id, action, time.time()))
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            request = store.run(lambda c: db.request_status(c, seq))
            if request.done_at is not None:
                return request.result
            time.sleep(0.1)
    finally:
        store.close()
    return None


def load_status(cloud_dir: Path, rollout_id: str | None) -> tuple[plan.Rollout, dict[str, Any]]:
    from otad.cloud import rollout_db as db

    store = open_db(cloud_dir)
    try:

        def load(conn: Any) -> tuple[plan.Rollout, dict[str, plan.DeviceRecord]]:
            if rollout_id is None:
                rollouts = db.load_rollouts(conn)
                if not rollouts:
                    raise RolloutError("no rollouts yet (otad fleet rollout)")
                rollout = rollouts[-1]
            else:
                rollout = db.load_rollout(conn, rollout_id)
            return rollout, db.load_devices(conn, rollout.id)

        return store.run(load)
    finally:
        store.close()


# --- commands ------------------------------------------------------------------------------------


def cmd_rollout(args: argparse.Namespace) -> int:
    rollout = create_rollout(
        args.dir,
        args.artifact,
        devices=args.devices,
        group=args.group,
        waves=args.waves,
        max_failure_rate=args.max_failure_rate,
        wave_timeout=args.wave_timeout,
        max_in_flight=args.max_in_flight,
    )
    print(
        f"rollout {rollout.id}: version {rollout.version} to {rollout.waves[-1]} devices in "
        f"{len(rollout.waves)} waves ({', '.join(str(w) for w in rollout.waves)}), "
        f"max {rollout.max_failure_rate:.0%} failures per wave"
    )
    print(f"follow it: otad fleet status {args.dir} {rollout.id} --watch")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from otad.cloud import rollout_db as db
    from otad.cloud import rollout_plan as plan
    from otad.cloud import rollout_view as view

    console = Console()
    if args.all:
        store = open_db(args.dir)
        try:
            rollouts = store.run(db.load_rollouts)
        finally:
            store.close()
        if args.json:
            print(json.dumps([r.id for r in rollouts]))
        else:
            console.print(view.render_rollout_list(rollouts, time.time()))
        return 0
    rollout, devices = load_status(args.dir, args.rollout)
    if args.json:
        print(json.dumps(view.summarize(rollout, devices, time.time()), indent=1))
        return 0
    if not args.watch:
        console.print(view.render_rollout(rollout, devices, time.time()))
        return 0
    with Live(
        view.render_rollout(rollout, devices, time.time()), console=console, refresh_per_second=4
    ) as live:
        while rollout.active:
            time.sleep(0.5)
            rollout, devices = load_status(args.dir, rollout.id)
            live.update(view.render_rollout(rollout, devices, time.time()))
    return 0 if rollout.state == plan.RolloutState.COMPLETED else 1


def cmd_action(args: argparse.Namespace) -> int:
    result = request_action(args.dir, args.rollout, args.action, max(0.0, args.wait))
    if result is None:
        print(
            f"{args.action} of {args.rollout} queued; the rollout service (otad cloud serve) "
            "applies it when it runs"
        )
        return 0
    if result != "ok":
        print(f"otad: error: rollout_error: {result.removeprefix('error: ')}", file=sys.stderr)
        return 1
    print(f"rollout {args.rollout}: {args.action} done")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from rich.console import Console

    from otad.cloud import rollout_db as db
    from otad.cloud import rollout_view as view
    from otad.cloud.pki import CloudDir

    cloud = CloudDir(args.dir)
    store = open_db(args.dir)
    try:
        seen = store.run(db.seen_devices)
    finally:
        store.close()
    rows = view.device_rows(cloud.device_ids(), seen, time.time())
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        Console().print(view.render_devices(rows))
    return 0


def cmd_group(args: argparse.Namespace) -> int:
    from otad.cloud import rollout_db as db
    from otad.cloud import rollout_plan as plan

    store = open_db(args.dir)
    try:
        if args.add:
            ids = plan.parse_device_list(args.add)
            added = store.run(lambda c: db.add_to_group(c, args.name, ids))
            print(f"group {args.name}: {added} added")
        if args.remove:
            ids = plan.parse_device_list(args.remove)
            removed = store.run(lambda c: db.remove_from_group(c, args.name, ids))
            print(f"group {args.name}: {removed} removed")
        members = store.run(lambda c: db.group_members(c, args.name))
    finally:
        store.close()
    print(f"group {args.name} ({len(members)}): {', '.join(members) or '-'}")
    return 0


def sim_ids(prefix: str, count: int) -> list[str]:
    width = max(4, len(str(count)))
    return [f"{prefix}{n:0{width}d}" for n in range(1, count + 1)]


def ensure_identities(cloud: CloudDir, ids: list[str]) -> int:
    """Issue a device certificate for every id that has none; returns how many were made."""
    from otad.cloud.pki import add_devices

    known = set(cloud.device_ids())
    missing = [d for d in ids if d not in known]
    add_devices(cloud.root, missing)
    return len(missing)


def make_fleet(
    cloud: CloudDir,
    ids: list[str],
    state: Path,
    *,
    fail_health: float = 0.0,
    fail_boot: float = 0.0,
    seed: int = 0,
    spare: int = 0,
    slot_size: int = 256 * 1024,
    version: str = "1.0",
    compatible: str = "otad-sim",
    broker_port: int | None = None,
    progress_interval: float = 0.5,
    boots_at_once: int | None = None,
) -> Fleet:
    from otad.fleet.device import Identity, SimSettings
    from otad.fleet.simulator import START_PARALLEL, Fleet, plan_faults

    config = cloud.config()
    settings = SimSettings(
        broker_host=config.broker_host,
        broker_port=broker_port or config.broker_port,
        ca=cloud.ca_cert,
        keyring=cloud.keyring_dir,
        compatible=compatible,
        topic_template=config.topic_template,
        slot_size=slot_size,
        version=version,
        progress_interval=progress_interval,
    )
    faults = plan_faults(ids, fail_health=fail_health, fail_boot=fail_boot, seed=seed, spare=spare)

    def identity_of(device_id: str) -> Identity:
        ident = cloud.device(device_id)
        return Identity(ident.cert, ident.key)

    return Fleet(
        state, ids, identity_of, settings, faults, boots_at_once=boots_at_once or START_PARALLEL
    )


async def cmd_simulate(args: argparse.Namespace) -> int:
    from otad.cloud.pki import CloudDir

    if args.devices < 1:
        raise RolloutError("simulate: --devices must be at least 1")
    cloud = CloudDir(args.dir)
    ids = sim_ids(args.prefix, args.devices)
    made = await asyncio.to_thread(ensure_identities, cloud, ids)
    if made:
        print(f"issued {made} device certificates")
    fleet = make_fleet(
        cloud,
        ids,
        args.state or args.dir / "sim",
        fail_health=args.fail_health,
        fail_boot=args.fail_boot,
        seed=args.seed,
        slot_size=args.slot_size,
        version=args.version,
        compatible=args.compatible,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"simulating {len(ids)} devices ({ids[0]} .. {ids[-1]}); "
        f"{len(fleet.faults.fail_health)} fail health, {len(fleet.faults.fail_boot)} fail boot; "
        "Ctrl-C stops"
    )
    await fleet.run(stop)
    return 0

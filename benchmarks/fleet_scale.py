"""How long a fleet of N simulated devices takes to converge on a new version.

Everything goes through the full protocol: each device is a real agent with its own TLS MQTT
connection and certificate, it downloads the bundle over HTTPS with its own pre-signed URL,
verifies it, writes a (tiny, sparse) file slot, "reboots" through the sim bootloader, checks
health and reports; the replica stores every report durably; the rollout service drives one
wave of 100%, paced to ``--max-in-flight`` devices at once, and records every outcome.

Processes: mosquitto | the cloud (replica + rollout service, + store unless
``--separate-store``) | K device processes (``--per-process`` agents each, ids round robin) |
this orchestrator. CPU time comes from /proc/<pid>/stat (utime + stime); the result gives each
process's share of one core over the convergence window and CPU milliseconds per device for
connecting and for the update. Device dirs live on tmpfs (``--state-root``); the cloud dir and
the replica's database in the work dir. With ``--workdir`` the files stay, with per-second
traces: ``devices-K.loop.jsonl`` / ``cloud-loop.jsonl`` (CPU share and worst event-loop lag per
second) and the device processes' logs (``OTAD_BENCH_DEVICE_LOG=info`` for every agent step).

    .venv/bin/python benchmarks/fleet_scale.py --devices 1000
    .venv/bin/python benchmarks/fleet_scale.py --devices 1000 10000 --separate-store --json out.json

Limits at 10,000: mosquitto needs a file descriptor per connection (it inherits our
RLIMIT_NOFILE, raised to the hard limit here; its ``max_connections`` default is unlimited), and
each device process holds one socket per agent (plus one per download), so agents are spread
over processes of ``--per-process`` devices. See docs/operations.md for figures and limits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
COMPATIBLE = "otad-bench"
# How long a device process waits for all its agents to hold a broker connection.
CONNECT_WAIT = 600.0
# Warnings in the device logs that show the system under more load than it can take.
PREFIX = "otad-fleet-bench-"
TROUBLE = ("download_retrying", "broker_disconnected", "job_failed", "sim_device")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its waited-for children) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime is field 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- roles run in child processes ----------------------------------------------------------------


async def watch_loop(out: Path, stop: asyncio.Event, period: float = 1.0) -> None:
    """Write, once a ``period``, this process's CPU seconds and the event loop's worst lag.

    A loop that is late by seconds (blocked by synchronous work, or starved of CPU) shows up
    here while the averages of the whole run hide it. One JSON line per period.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    with out.open("w") as f:
        while not stop.is_set():
            cpu0, t0, worst = time.process_time(), loop.time(), 0.0
            while loop.time() - t0 < period and not stop.is_set():
                before = loop.time()
                await asyncio.sleep(0.05)
                worst = max(worst, loop.time() - before - 0.05)
            f.write(
                json.dumps(
                    {
                        "t": round(t0 - start, 1),
                        "cpu": round((time.process_time() - cpu0) / (loop.time() - t0), 2),
                        "lag": round(worst, 3),
                    }
                )
                + "\n"
            )
            f.flush()


async def role_cloud(cloud_path: Path, separate_store: bool) -> None:
    from otad import logs
    from otad.cloud.pki import CloudDir
    from otad.cloud.server import CloudServer

    logs.configure(level="warning")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with CloudServer(CloudDir(cloud_path), serve_store=not separate_store):
        watch = asyncio.create_task(watch_loop(cloud_path.parent / "cloud-loop.jsonl", stop))
        print("ready", flush=True)
        await stop.wait()
        await watch


async def role_store(cloud_path: Path) -> None:
    from otad import logs
    from otad.bundle import Keyring
    from otad.cloud.pki import CloudDir
    from otad.cloud.store import ArtifactStore

    logs.configure(level="warning")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    cloud = CloudDir(cloud_path)
    store = ArtifactStore(
        cloud.config(), keyring=Keyring.load(cloud.keyring_dir), ssl_context=cloud.server_context()
    )
    async with store:
        print("ready", flush=True)
        await stop.wait()


async def role_devices(
    cloud_path: Path, state: Path, log_path: Path, ids: list[str], boots_at_once: int
) -> None:
    from otad import logs
    from otad.cli.fleet import make_fleet
    from otad.cloud.pki import CloudDir

    log_file = log_path.open("w")
    logs.configure(level=os.environ.get("OTAD_BENCH_DEVICE_LOG", "warning"), stream=log_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Slower progress reports: at 10,000 devices they would be most of the broker's traffic.
    fleet = make_fleet(
        CloudDir(cloud_path),
        ids,
        state,
        slot_size=64 * 1024,
        compatible=COMPATIBLE,
        progress_interval=5.0,
        boots_at_once=boots_at_once,
    )
    watch = asyncio.create_task(watch_loop(log_path.with_suffix(".loop.jsonl"), stop))

    async def come_up() -> None:
        await fleet.start()
        broken = sum(d.error is not None for d in fleet.devices)
        connected = await fleet.wait_connected(CONNECT_WAIT)
        print(f"ready {len(ids)} {broken} {connected}", flush=True)

    # A SIGTERM while the fleet is still coming up ends the run too.
    up = asyncio.create_task(come_up())
    await stop.wait()
    up.cancel()
    await asyncio.gather(up, watch, return_exceptions=True)
    await fleet.stop()
    log_file.close()


# --- the orchestrator ----------------------------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_ready(proc: subprocess.Popen[str], what: str, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if sel.select(timeout=1.0):
            line = proc.stdout.readline()
            if line.startswith("ready"):
                return line.strip()
            if not line:
                break
        if proc.poll() is not None:
            break
    raise RuntimeError(f"{what} did not become ready (exit {proc.poll()})")


def stop_all(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def trouble_counts(logs: list[Path]) -> dict[str, int]:
    """How often each TROUBLE event appears in the device processes' logs."""
    counts = dict.fromkeys(TROUBLE, 0)
    for path in logs:
        if not path.exists():
            continue
        with path.open(errors="replace") as f:
            for line in f:
                for event in TROUBLE:
                    if event in line:
                        counts[event] += 1
    return {k: v for k, v in counts.items() if v}


def run_one(
    n: int,
    per_process: int,
    root: Path,
    state_root: Path,
    separate_store: bool,
    max_wait: float,
    boots_at_once: int,
    max_in_flight: int | None,
    idle: float,
) -> dict[str, Any]:
    from otad.bundle import build_bundle, load_private_key
    from otad.cli.fleet import create_rollout
    from otad.cloud import rollout_db as db
    from otad.cloud.broker import BrokerProcess
    from otad.cloud.pki import init_cloud

    ids = [f"b{i:05d}" for i in range(n)]
    t0 = time.monotonic()
    cloud = init_cloud(root / "cloud", ids, broker_port=free_port(), store_port=free_port())
    setup_pki = time.monotonic() - t0
    image = root / "image.img"
    image.write_bytes(random.Random(1).randbytes(16 * 1024))
    bundle = root / "v2.bundle"
    build_bundle(
        image, bundle, key=load_private_key(cloud.signing_key), version="2.0", compatible=COMPATIBLE
    )
    broker = BrokerProcess(cloud, log_path=root / "mosquitto.log")
    broker.start()
    procs: list[subprocess.Popen[str]] = []
    try:
        store_proc = None
        if separate_store:
            store_proc = spawn("--role", "store", "--cloud", str(cloud.root))
            procs.append(store_proc)
            wait_ready(store_proc, "store", 60)
        cloud_proc = spawn(
            "--role", "cloud", "--cloud", str(cloud.root), *(["--separate-store"] * separate_store)
        )
        procs.append(cloud_proc)
        wait_ready(cloud_proc, "cloud", 60)
        device_procs_from = len(procs)

        def cpu() -> dict[str, float]:
            assert broker.pid is not None
            return {
                "broker": cpu_seconds(broker.pid),
                "cloud": cpu_seconds(cloud_proc.pid),
                "store": cpu_seconds(store_proc.pid) if store_proc else 0.0,
                "devices": sum(cpu_seconds(p.pid) for p in procs[device_procs_from:]),
            }

        t1 = time.monotonic()
        cpu_start = cpu()
        # Round robin: a paced rollout tells devices in id order, and consecutive ids in one
        # process would leave the other processes (and cores) idle while it works.
        count = math.ceil(n / per_process)
        groups = [ids[k::count] for k in range(count)]
        states = [state_root / f"devices-{k}" for k in range(len(groups))]
        logs = [root / f"devices-{k}.log" for k in range(len(groups))]
        for k, (state, log, group) in enumerate(zip(states, logs, groups, strict=True)):
            procs.append(
                spawn(
                    "--role",
                    "devices",
                    "--cloud",
                    str(cloud.root),
                    "--state",
                    str(state),
                    "--log",
                    str(log),
                    "--ids",
                    f"{k}:{len(group)}:{count}",
                    "--boots-at-once",
                    str(boots_at_once),
                )
            )
        broken = connected = 0
        for proc in procs[device_procs_from:]:
            _, _, not_started, up = wait_ready(proc, "devices", 60 + CONNECT_WAIT).split()
            broken += int(not_started)
            connected += int(up)
        connect_time = time.monotonic() - t1
        # The fleet idles (connected, nothing desired) for a while: what it costs per device and
        # second is paid during the rollout by every device that waits for its turn.
        idle0, t_idle = cpu(), time.monotonic()
        time.sleep(idle)
        idle1, idle_s = cpu(), time.monotonic() - t_idle
        cpu0 = cpu()
        t2 = time.monotonic()
        rollout = create_rollout(
            cloud.root,
            str(bundle),
            devices=",".join(ids),
            waves="100%",
            max_failure_rate="100%",
            wave_timeout="30m",
            max_in_flight=max_in_flight,
        )
        store = db.RolloutDB(cloud.config().db_path)
        deadline = t2 + max_wait
        samples = []
        last_cpu, last_t = cpu0, t2
        while time.monotonic() < deadline:
            r = store.run(lambda c: db.load_rollout(c, rollout.id))
            if not r.active:
                break
            counts = store.run(
                lambda c: dict(
                    c.execute(
                        "SELECT state, count(*) FROM rollout_devices WHERE rollout_id=? "
                        "GROUP BY state",
                        (rollout.id,),
                    ).fetchall()
                )
            )
            now, now_cpu = time.monotonic(), cpu()
            shares = {k: round((now_cpu[k] - last_cpu[k]) / (now - last_t), 2) for k in now_cpu}
            last_cpu, last_t = now_cpu, now
            samples.append((round(now - t2, 1), counts, shares))
            time.sleep(1.0)
        converge = time.monotonic() - t2
        cpu1 = cpu()
        devices = store.run(lambda c: db.load_devices(c, rollout.id))
        store.close()
        outcome: dict[str, int] = {}
        for record in devices.values():
            outcome[record.state.value] = outcome.get(record.state.value, 0) + 1
        return {
            "devices": n,
            "device_processes": len(groups),
            "state_root": str(state_root),
            "pki_setup_s": round(setup_pki, 1),
            "connect_s": round(connect_time, 1),
            "devices_not_started": broken,
            "devices_connected": connected,
            "converge_s": round(converge, 1),
            "rollout_state": r.state.value,
            "outcome": outcome,
            "separate_store": separate_store,
            "boots_at_once": boots_at_once,
            "max_in_flight": max_in_flight,
            # share of one core over the convergence window
            **{f"{k}_cpu_share": round((cpu1[k] - cpu0[k]) / converge, 3) for k in cpu0},
            # CPU milliseconds per device: connecting (start + TLS + first report) and updating
            **{f"{k}_connect_cpu_ms": round((cpu0[k] - cpu_start[k]) / n * 1000, 1) for k in cpu0},
            **{f"{k}_update_cpu_ms": round((cpu1[k] - cpu0[k]) / n * 1000, 1) for k in cpu0},
            # CPU microseconds per connected, idle device and second
            **{
                f"{k}_idle_cpu_us_per_s": round((idle1[k] - idle0[k]) / n / idle_s * 1e6, 1)
                for k in ("broker", "devices")
                if idle_s > 0
            },
            "load_average": [round(x, 1) for x in os.getloadavg()],
            "trouble": trouble_counts(logs),
            "progress": samples[:: max(1, len(samples) // 12)],
        }
    finally:
        stop_all(procs)
        broker.stop()


def default_state_root() -> Path | None:
    """tmpfs when there is one: the devices' flash is not what this benchmark measures."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1000])
    parser.add_argument("--per-process", type=int, default=2500)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--max-wait", type=float, default=1800, help="seconds to wait for convergence"
    )
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: temp dir)")
    parser.add_argument(
        "--state-root",
        type=Path,
        default=default_state_root(),
        help="where the simulated devices' dirs go (default /dev/shm: tmpfs); the cloud dir "
        "and the replica's database stay in the work dir",
    )
    parser.add_argument(
        "--separate-store",
        action="store_true",
        help="serve artifacts from their own process (the replica keeps its event loop)",
    )
    parser.add_argument(
        "--boots-at-once",
        type=int,
        default=32,
        help="devices of one device process between power-on and a broker connection at once",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=500,
        help="the rollout's --max-in-flight (0: the whole wave at once). Each download holds "
        "~5 MiB of buffers in its device process: 10,000 at once do not fit in memory here",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="measure the connected, idle fleet this long before the rollout",
    )
    parser.add_argument("--role", choices=["cloud", "store", "devices"])
    parser.add_argument("--cloud", type=Path)
    parser.add_argument("--state", type=Path)
    parser.add_argument("--log", type=Path)
    parser.add_argument("--ids")
    args = parser.parse_args()
    raise_fd_limit()
    if args.role == "cloud":
        asyncio.run(role_cloud(args.cloud, args.separate_store))
        return 0
    if args.role == "store":
        asyncio.run(role_store(args.cloud))
        return 0
    if args.role == "devices":
        first, count, step = (int(x) for x in args.ids.split(":"))
        ids = [f"b{first + i * step:05d}" for i in range(count)]
        asyncio.run(role_devices(args.cloud, args.state, args.log, ids, args.boots_at_once))
        return 0
    results = []
    for n in args.devices:
        per_process = min(args.per_process, max(250, math.ceil(n / 2)))
        with contextlib.ExitStack() as stack:
            if args.workdir is not None:
                work = args.workdir / f"n{n}"
                work.mkdir(parents=True, exist_ok=False)
            else:
                work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=PREFIX)))
            state_root = work / "sim"
            if args.state_root is not None:
                state_root = Path(
                    stack.enter_context(
                        tempfile.TemporaryDirectory(prefix=PREFIX, dir=args.state_root)
                    )
                )
            result = run_one(
                n,
                per_process,
                work,
                state_root,
                args.separate_store,
                args.max_wait,
                args.boots_at_once,
                args.max_in_flight or None,
                args.idle,
            )
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "progress"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

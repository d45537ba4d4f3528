"""How long a fleet of N simulated devices takes to converge on a new version.

Everything goes through the full protocol: each device is a real agent with its own TLS MQTT
connection and certificate, it downloads the bundle over HTTPS with its own pre-signed URL,
verifies it, writes a (tiny, sparse) file slot, "reboots" through the sim bootloader, checks
health and reports; the replica stores every report durably; the rollout service drives one
wave of 100% and records every outcome.

Processes: mosquitto | the cloud (replica + store + rollout service) | K device processes
(agents share processes, ``--per-process`` each) | this orchestrator. The broker's and the cloud
process's CPU time come from /proc/<pid>/stat (utime + stime) over the convergence window.

    .venv/bin/python benchmarks/fleet_scale.py --devices 1000
    .venv/bin/python benchmarks/fleet_scale.py --devices 1000 10000 --json out.json

Limits at 10,000: mosquitto needs a file descriptor per connection (it inherits our
RLIMIT_NOFILE, raised to the hard limit here; its ``max_connections`` default is unlimited), and
each device process holds one socket per agent (plus one per download), so agents are spread
over processes of ``--per-process`` devices.
"""

from __future__ import annotations

import argparse
import asyncio
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


async def role_cloud(cloud_path: Path, separate_store: bool) -> None:
    from otad import logs
    from otad.cloud.pki import CloudDir
    from otad.cloud.server import CloudServer

    logs.configure(level="warning")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with CloudServer(CloudDir(cloud_path), serve_store=not separate_store):
        print("ready", flush=True)
        await stop.wait()


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


async def role_devices(cloud_path: Path, state: Path, ids: list[str]) -> None:
    from otad import logs
    from otad.cli.fleet import make_fleet
    from otad.cloud.pki import CloudDir

    log_file = (state.parent / f"{state.name}.log").open("w")
    logs.configure(level="warning", stream=log_file)
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
    )
    await fleet.start(parallel=64)
    broken = sum(d.error is not None for d in fleet.devices)
    print(f"ready {len(ids)} {broken}", flush=True)
    await stop.wait()
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


def run_one(
    n: int, per_process: int, root: Path, separate_store: bool, max_wait: float
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
        t1 = time.monotonic()
        groups = [ids[i : i + per_process] for i in range(0, n, per_process)]
        for k, group in enumerate(groups):
            procs.append(
                spawn(
                    "--role",
                    "devices",
                    "--cloud",
                    str(cloud.root),
                    "--state",
                    str(root / f"devices-{k}"),
                    "--ids",
                    f"{group[0]}:{len(group)}",
                )
            )
        broken = 0
        for proc in procs[device_procs_from:]:
            broken += int(wait_ready(proc, "devices", 60 + n / 20).split()[2])
        connect_time = time.monotonic() - t1
        assert broker.pid is not None

        def cpu() -> dict[str, float]:
            assert broker.pid is not None
            return {
                "broker": cpu_seconds(broker.pid),
                "cloud": cpu_seconds(cloud_proc.pid),
                "store": cpu_seconds(store_proc.pid) if store_proc else 0.0,
                "devices": sum(cpu_seconds(p.pid) for p in procs[device_procs_from:]),
            }

        cpu0 = cpu()
        t2 = time.monotonic()
        rollout = create_rollout(
            cloud.root,
            str(bundle),
            devices=",".join(ids),
            waves="100%",
            max_failure_rate="100%",
            wave_timeout="30m",
        )
        store = db.RolloutDB(cloud.config().db_path)
        deadline = t2 + max_wait
        samples = []
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
            samples.append((round(time.monotonic() - t2, 1), counts))
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
            "pki_setup_s": round(setup_pki, 1),
            "connect_s": round(connect_time, 1),
            "devices_not_started": broken,
            "converge_s": round(converge, 1),
            "rollout_state": r.state.value,
            "outcome": outcome,
            "separate_store": separate_store,
            **{f"{k}_cpu_share": round((cpu1[k] - cpu0[k]) / converge, 3) for k in cpu0},
            "progress": samples[:: max(1, len(samples) // 12)],
        }
    finally:
        stop_all(procs)
        broker.stop()


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
        "--separate-store",
        action="store_true",
        help="serve artifacts from their own process (the replica keeps its event loop)",
    )
    parser.add_argument("--role", choices=["cloud", "store", "devices"])
    parser.add_argument("--cloud", type=Path)
    parser.add_argument("--state", type=Path)
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
        first, count = args.ids.split(":")
        start = int(first[1:])
        ids = [f"b{i:05d}" for i in range(start, start + int(count))]
        asyncio.run(role_devices(args.cloud, args.state, ids))
        return 0
    results = []
    for n in args.devices:
        per_process = min(args.per_process, max(250, math.ceil(n / 2)))
        if args.workdir is not None:
            work = args.workdir / f"n{n}"
            work.mkdir(parents=True, exist_ok=False)
            result = run_one(n, per_process, work, args.separate_store, args.max_wait)
        else:
            with tempfile.TemporaryDirectory(prefix="otad-fleet-bench-") as tmp:
                result = run_one(n, per_process, Path(tmp), args.separate_store, args.max_wait)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "progress"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

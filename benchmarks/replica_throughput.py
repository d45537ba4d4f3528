"""Durable shadow updates per second through the real broker, next to a bare echo loop.

Setup (all on loopback, in a temporary directory): ``init_cloud`` makes a cloud dir with
``--devices`` device identities; the system mosquitto runs with its generated config (TLS,
client certificates, ACL). Each rep runs, for each mode:

* ``replicax1``: ``otad shadow serve`` as its own process with a fresh SQLite database: parse,
  merge, fsync'd group commit with outbox, then publish accepted + documents (+ delta).
* ``replicax2``: two such processes on one database, splitting the shared subscription (the
  deployment answer to a replica that is CPU-bound in one Python process).
* ``echo``: a bare aiomqtt loop in its own process, the same identity and topics: receive an
  update, ``await client.publish`` it back on ``.../update/accepted``. No parsing, no storage.

Load: one ``mosquitto_pub -l`` per device (QoS 1, the device's own certificate) sends
``--per-device`` reported updates as fast as the broker takes them; one ``mosquitto_sub`` with
the fleet identity counts ``state/+/update/accepted`` (QoS 1) and exits at the expected count.
The rate is updates / (last accepted - first publish). The load tools are C programs so the
Python under test gets most of the 2 cores. For the replica, every stored version is checked
after the run: the count of accepted messages must equal the sum of the stored versions.

    .venv/bin/python benchmarks/replica_throughput.py --devices 20 --per-device 1000 --reps 3

Each line reports the CPU per update of the process(es) under test (for the replica split into
its event-loop thread and its other threads, i.e. the SQLite writer), of the broker and of the
load generator, and how busy the machine was: the machine is shared, so the rate follows the
CPU it leaves, while the CPU per update does not. ``OTAD_BENCH_PROFILE=1`` writes cProfile data
of both replica threads next to the logs (``*.prof.main``, ``*.prof.writer``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from otad.cloud.broker import BrokerProcess
from otad.cloud.pki import CloudDir, Identity, init_cloud

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tls_args(cloud: CloudDir, ident: Identity) -> list[str]:
    return ["--cafile", str(cloud.ca_cert), "--cert", str(ident.cert), "--key", str(ident.key)]


def update_lines(device: str, count: int) -> str:
    lines = []
    for i in range(count):
        doc = {
            "state": {
                "reported": {
                    "software": {
                        "version": "1.0",
                        "slot": "A",
                        "state": "downloading",
                        "progress": i % 101,
                        "jobId": "j-bench",
                    },
                    "seq": i,
                }
            },
            "clientToken": f"{device}-{i}",
        }
        lines.append(json.dumps(doc, separators=(",", ":")))
    return "\n".join(lines) + "\n"


# --- the bare echo loop (runs as its own process) ----------------------------------------------


async def echo_worker(cloud_dir: str) -> None:
    import aiomqtt

    cloud = CloudDir(cloud_dir)
    config = cloud.config()
    client = aiomqtt.Client(
        config.broker_host,
        config.broker_port,
        tls_context=cloud.client_context(cloud.service("replica")),
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=30,
    )
    async with client:
        await client.subscribe("state/+/update", qos=1)
        print("ready", flush=True)
        async for message in client.messages:
            await client.publish(f"{message.topic}/accepted", message.payload, qos=1)


# --- profiling (OTAD_BENCH_PROFILE=1) -----------------------------------------------------------


def profile_worker(out: str, otad_args: list[str]) -> None:
    """Run ``otad <otad_args>`` with cProfile on the event loop thread AND the SQLite writer
    thread (``python -m cProfile`` sees only the main thread, where the replica spends the
    smaller part of its time). Writes ``<out>.main`` and ``<out>.writer``; read them with
    ``python -m pstats``."""
    import cProfile

    from otad.cli import main as otad_main
    from otad.cloud import db

    writer_run = db.SqliteStore._writer

    def profiled_writer(store: db.SqliteStore, ready: asyncio.Future[None]) -> None:
        profile = cProfile.Profile()
        profile.enable()
        try:
            writer_run(store, ready)
        finally:
            profile.disable()
            profile.dump_stats(f"{out}.writer")

    db.SqliteStore._writer = profiled_writer  # type: ignore[method-assign]
    sys.argv = ["otad", *otad_args]
    profile = cProfile.Profile()
    profile.enable()
    try:
        otad_main()
    finally:
        profile.disable()
        profile.dump_stats(f"{out}.main")


# --- the harness -------------------------------------------------------------------------------


def start_worker(mode: str, cloud: CloudDir, db: Path, log: Path) -> subprocess.Popen[bytes]:
    if mode == "echo":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--echo-worker", str(cloud.root)]
        marker = b"ready"
    else:
        cmd = [sys.executable, "-m", "otad", "shadow", "serve", str(cloud.root), "--db", str(db)]
        if os.environ.get("OTAD_BENCH_PROFILE"):  # cProfile both replica threads (developer aid)
            cmd[1:3] = [
                str(Path(__file__).resolve()),
                "--profile-worker",
                str(log.with_suffix(".prof")),
                "--",
            ]
        marker = b"replica_serving"
    out = log.open("wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, cwd=REPO)
    # Wait for the ready line (echo: stdout) or log event (replica: stderr), 20 s at most.
    deadline = time.monotonic() + 20
    if mode == "echo":
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if marker not in line:
            raise SystemExit(f"echo worker did not start: {line!r}")
    else:
        while marker not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"replica did not start:\n{log.read_text()}")
            time.sleep(0.05)
    return proc


def _stat_cpu(path: str) -> float:
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (from /proc/<pid>/stat)."""
    return _stat_cpu(f"/proc/{pid}/stat")


def thread_cpu(pid: int) -> tuple[float, float]:
    """(main thread, all other threads) CPU seconds of a running process.

    For a replica the other threads are the SQLite writer (and asyncio's short-lived helpers):
    the split shows which side of the GIL the time goes to.
    """
    main = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            seconds = _stat_cpu(str(task / "stat"))
            if int(task.name) == pid:
                main += seconds
            else:
                other += seconds
    return main, other


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children (the load generator tools)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_idle() -> tuple[float, float]:
    """(idle, total) CPU seconds of the whole machine so far (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return (fields[3] + fields[4]) / tick, sum(fields[:8]) / tick


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_once(
    mode: str,
    cloud: CloudDir,
    devices: list[str],
    per_device: int,
    work: Path,
    rep: int,
    broker_pid: int,
) -> dict[str, float]:
    """``mode`` is "echo" or "replicaxK" (K replica processes sharing one database)."""
    config = cloud.config()
    host, port = config.broker_host, str(config.broker_port)
    db = work / f"{mode}-{rep}.db"
    kind, processes = ("echo", 1) if mode == "echo" else ("replica", int(mode.split("x")[1]))
    workers = [
        start_worker(kind, cloud, db, work / f"{mode}-{rep}-{i}.log") for i in range(processes)
    ]
    total = len(devices) * per_device
    try:
        sub = subprocess.Popen(
            [
                "mosquitto_sub",
                "-h",
                host,
                "-p",
                port,
                *tls_args(cloud, cloud.service("fleet")),
                "-q",
                "1",
                "-t",
                "state/+/update/accepted",
                "-C",
                str(total),
                "-F",
                "%t",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # the subscription is in place (no ready signal from mosquitto_sub)
        startup_threads = [thread_cpu(w.pid) for w in workers]
        broker_cpu = cpu_seconds(broker_pid)
        load_cpu = children_cpu()
        idle0, total0 = machine_idle()
        if sub.poll() is not None:
            raise SystemExit(f"mosquitto_sub failed: {sub.stderr.read() if sub.stderr else ''}")
        t0 = time.monotonic()
        pubs = []
        for device in devices:
            pubs.append(
                subprocess.Popen(
                    [
                        "mosquitto_pub",
                        "-h",
                        host,
                        "-p",
                        port,
                        *tls_args(cloud, cloud.device(device)),
                        "-q",
                        "1",
                        "-t",
                        f"state/{device}/update",
                        "-l",
                    ],
                    stdin=(work / f"{device}.lines").open("rb"),
                    stderr=subprocess.PIPE,
                )
            )
        try:
            sub.wait(timeout=max(60, total / 500))
        except subprocess.TimeoutExpired:
            sub.kill()
            raise SystemExit(f"{mode}: not every accepted arrived within the time limit") from None
        t1 = time.monotonic()
        threads = [thread_cpu(w.pid) for w in workers]
        main_cpu = sum(t[0] - s[0] for t, s in zip(threads, startup_threads, strict=True))
        other_cpu = sum(t[1] - s[1] for t, s in zip(threads, startup_threads, strict=True))
        broker_cpu = cpu_seconds(broker_pid) - broker_cpu
        idle1, total1 = machine_idle()
        for pub in pubs:
            pub.wait(30)
        load_cpu = children_cpu() - load_cpu  # mosquitto_sub and every mosquitto_pub
    finally:
        for worker in workers:
            stop_worker(worker)
    # CPU per update of the process(es) under test: less sensitive to a busy machine than rates.
    result = {
        "rate": total / (t1 - t0),
        "seconds": t1 - t0,
        "cpu_us": (main_cpu + other_cpu) / total * 1e6,
        "main_us": main_cpu / total * 1e6,
        "writer_us": other_cpu / total * 1e6,
        "broker_cpu_us": broker_cpu / total * 1e6,
        "load_cpu_us": load_cpu / total * 1e6,
        "idle": (idle1 - idle0) / max(total1 - total0, 1e-9),
        # Cores the benchmark's own processes got: with no idle CPU left, the rest went to
        # other work on the machine, and rate = cores / CPU per update.
        "cores": (main_cpu + other_cpu + broker_cpu + load_cpu) / (t1 - t0),
        "loadavg": os.getloadavg()[0],
    }
    if kind == "replica":
        with sqlite3.connect(db) as conn:
            stored = conn.execute("SELECT COALESCE(SUM(version), 0) FROM shadows").fetchone()[0]
            outbox = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        if stored != total:
            raise SystemExit(f"replica stored {stored} versions, expected {total}")
        result["outbox_left"] = outbox
    return result


CPU_KEYS = {
    "cpu_us": "under test",
    "main_us": "main thread",
    "writer_us": "other threads",
    "broker_cpu_us": "broker",
    "load_cpu_us": "load generator",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--per-device", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--modes",
        default="echo,replicax1,replicax2",
        help="echo and/or replicaxK: K replica processes splitting a shared subscription",
    )
    parser.add_argument("--echo-worker", help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.profile_worker:
        profile_worker(args.profile_worker, [a for a in rest if a != "--"])
        return
    if args.echo_worker:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(echo_worker(args.echo_worker))
        return

    work = Path(tempfile.mkdtemp(prefix="otad-replica-bench-"))
    devices = [f"bench{i}" for i in range(args.devices)]
    cloud = init_cloud(work / "cloud", devices, broker_port=free_port(), store_port=free_port())
    for device in devices:
        (work / f"{device}.lines").write_text(update_lines(device, args.per_device))
    broker = BrokerProcess(cloud, log_path=work / "mosquitto.log")  # the generated config
    broker.start()
    results: dict[str, list[dict[str, float]]] = {}
    try:
        for rep in range(args.reps):
            for mode in args.modes.split(","):
                assert broker.pid is not None
                r = run_once(mode, cloud, devices, args.per_device, work, rep, broker.pid)
                results.setdefault(mode, []).append(r)
                print(
                    f"rep {rep} {mode:10s} {r['rate']:7.0f} updates/s ({r['seconds']:.2f} s)  "
                    f"CPU us/update: under test {r['cpu_us']:.0f} (main {r['main_us']:.0f}, "
                    f"threads {r['writer_us']:.0f}), broker {r['broker_cpu_us']:.0f}, "
                    f"load generator {r['load_cpu_us']:.0f}; cores used {r['cores']:.2f}, "
                    f"machine idle {r['idle']:.0%}, load average {r['loadavg']:.1f}",
                    flush=True,
                )
    finally:
        broker.stop()
    total = args.devices * args.per_device
    print(
        f"\n{args.devices} devices x {args.per_device} updates = {total} per run, "
        f"{args.reps} reps, cpus={os.cpu_count()}"
    )
    summary = {}
    for mode, runs in results.items():
        rates = sorted(r["rate"] for r in runs)
        summary[mode] = statistics.median(rates)
        cpu = {k: statistics.median(r[k] for r in runs) for k in CPU_KEYS}
        print(
            f"{mode:10s} updates/s min/median/max: {rates[0]:.0f} / "
            f"{statistics.median(rates):.0f} / {rates[-1]:.0f}   CPU us/update medians: "
            + ", ".join(f"{name} {cpu[k]:.0f}" for k, name in CPU_KEYS.items())
        )
    for mode in summary:
        if mode != "echo" and "echo" in summary:
            print(f"{mode} / echo (medians): {summary[mode] / summary['echo']:.2f}x")
    print(f"work dir (logs, databases): {work}")


if __name__ == "__main__":
    main()

"""Download throughput of the artifact store over TLS next to nginx serving the same file.

One run, same machine, same certificate (ECDSA P-256 from a fresh cloud dir), same file, same
client: ``curl --cacert ... -o /dev/null`` in its own process. The store is measured as devices
use it: mTLS with the device certificate and a pre-signed URL. nginx (nginx-light, one worker,
TLS on loopback, no client certificate, ``sendfile on`` - which TLS cannot use without kernel
TLS) is the reference. The file is incompressible random data, hot in the page cache, and the
very same inode for both servers.

Steadiness on a shared 2-core machine, where other work changes wall time by 2x between runs:

- reps are interleaved ABBA (store, nginx, nginx, store, ...) after an untimed warm-up of both;
- min / median / max per server, the ratio of the medians (the goal: store >= 0.8x nginx) and
  the paired ratio of each store rep to the nginx rep next to it;
- CPU seconds per GiB of each server (all its threads) and of curl: CPU per byte hardly moves
  with the machine's load, so it shows the efficiency gap on its own, and equal client CPU
  shows both servers sent the same kind of TLS stream.

::

    .venv/bin/python benchmarks/store_throughput.py [--size 1G] [--reps 7] [--chunk 1M] [--json]

nginx comes from the nginx-light Debian package (``apt-get install nginx-light``); the benchmark
says so and stops if it is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otad.bundle import Keyring
from otad.cloud import pki
from otad.cloud.store import ArtifactStore

MIB = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def free_port() -> int:
    """A free loopback port below the ephemeral range (busy machines hand those out fast)."""
    import random
    import socket

    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def write_payload(path: Path, size: int) -> str:
    """Random bytes (TLS cost does not depend on content); returns the SHA-256."""
    digest = hashlib.sha256()
    block = os.urandom(4 * MIB)
    with path.open("wb") as out:
        left = size
        while left:
            piece = block[: min(left, len(block))]
            out.write(piece)
            digest.update(piece)
            left -= len(piece)
    return digest.hexdigest()


def nginx_conf(
    prefix: Path, port: int, cloud: pki.CloudDir, root: Path, output_buffers: str | None
) -> str:
    # nginx reads a file into output_buffers (default 2 x 32k) and writes TLS records from them.
    buffers = f"output_buffers {output_buffers};" if output_buffers else ""
    return f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    sendfile on;
    {buffers}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cloud.server.cert};
        ssl_certificate_key {cloud.server.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {root};
    }}
}}
"""


@dataclass
class Sample:
    """One download: wall seconds, server CPU seconds and client (curl) CPU seconds."""

    server: str
    seconds: float
    server_cpu: float
    client_cpu: float


def curl(url: str, cloud: pki.CloudDir, client_cert: bool, cpu: int | None = None) -> float:
    """Wall seconds of one full download to /dev/null (checked: HTTP 200, a body).

    curl runs in its own process so the server under test never shares an event loop or the
    GIL with the client; its CPU time shows in RUSAGE_CHILDREN once it is reaped.
    """
    cmd = ["curl", "-sS", "--fail", "--cacert", str(cloud.ca_cert), "-o", "/dev/null"]
    if client_cert:
        device = cloud.device("bench")
        cmd += ["--cert", str(device.cert), "--key", str(device.key)]
    cmd += ["-w", "%{size_download} %{http_code}", url]
    start = time.perf_counter()
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"curl failed on {url.split('?')[0]}: {err.strip()}")
    size, code = out.split()
    if code != "200":
        raise RuntimeError(f"curl got HTTP {code} from {url.split('?')[0]}")
    if not int(size):
        raise RuntimeError(f"curl got an empty body from {url.split('?')[0]}")
    return elapsed


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stats(values: list[float], digits: int = 0) -> str:
    """min / median / max, aligned."""
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{low:8.{digits}f} / {mid:8.{digits}f} / {high:8.{digits}f}"


def process_cpu(pids: list[int]) -> float:
    """User + system CPU seconds of the given processes, all threads (/proc/<pid>/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def nginx_workers(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [int(pid) for pid in children]


async def measure(
    store: ArtifactStore,
    cloud: pki.CloudDir,
    artifact_id: str,
    nginx_url: str,
    nginx_pid: int,
    reps: int,
    client_cpu: int | None,
) -> list[Sample]:
    """Start the store in this loop, then download from both servers, interleaved.

    Rep i runs store then nginx when i is even, nginx then store when odd (ABBA), so a load
    change on the shared machine that lasts a rep or two hits both servers alike, and neither
    always runs right after the other's page-cache or frequency effects. The store runs in this
    process: its CPU is this process's (every thread) minus nothing - the driver only waits.
    """
    await store.start()
    try:
        store_url = store.signer.presign(artifact_id, "bench", 3600)
        workers = nginx_workers(nginx_pid)
        urls = {"store": (store_url, True, [os.getpid()]), "nginx": (nginx_url, False, workers)}
        # Warm-up, untimed: page cache, TLS code paths, both servers.
        for name in ("store", "nginx"):
            await asyncio.to_thread(curl, urls[name][0], cloud, urls[name][1], client_cpu)
        samples: list[Sample] = []
        for rep in range(reps):
            order = ("store", "nginx") if rep % 2 == 0 else ("nginx", "store")
            for name in order:
                url, cert, pids = urls[name]
                server_before, client_before = process_cpu(pids), children_cpu()
                seconds = await asyncio.to_thread(curl, url, cloud, cert, client_cpu)
                samples.append(
                    Sample(
                        name,
                        seconds,
                        process_cpu(pids) - server_before,
                        children_cpu() - client_before,
                    )
                )
        return samples
    finally:
        await store.stop()


def report(samples: list[Sample], size: int, reps: int, chunk: int, pinned: bool) -> dict[str, Any]:
    gib = size / (1 << 30)
    by: dict[str, list[Sample]] = {
        name: [s for s in samples if s.server == name] for name in ("store", "nginx")
    }
    rates = {name: [size / MIB / s.seconds for s in group] for name, group in by.items()}
    server_cpu = {name: [s.server_cpu / gib for s in group] for name, group in by.items()}
    client_cpu = {name: [s.client_cpu / gib for s in group] for name, group in by.items()}
    # Each store rep against the nginx rep next to it: drift between reps cancels out.
    paired = [a / b for a, b in zip(rates["store"], rates["nginx"], strict=True)]
    ratio = statistics.median(rates["store"]) / statistics.median(rates["nginx"])
    load = os.getloadavg()
    print(
        f"file {size / MIB:.0f} MiB, {reps} reps per server (ABBA interleaved), store chunk "
        f"{chunk // 1024} KiB, curl over TLS 1.3 on loopback; load avg {load[0]:.2f} {load[1]:.2f}"
    )
    if pinned:
        print("pinned: both servers on CPU 0, curl on CPU 1")
    print(f"{'':22} {'min':>8} / {'median':>8} / {'max':>8}")
    for name in ("store", "nginx"):
        print(f"{name + ' MiB/s':22} {stats(rates[name])}")
    for name in ("store", "nginx"):
        print(f"{name + ' server CPU s/GiB':22} {stats(server_cpu[name], 2)}")
    for name in ("store", "nginx"):
        print(f"{'curl CPU s/GiB (' + name + ')':22} {stats(client_cpu[name], 2)}")
    print(f"{'paired store/nginx':22} {stats(paired, 2)}")
    verdict = "meets" if ratio >= 0.8 else "BELOW"
    print(f"ratio of medians store/nginx: {ratio:.2f}x ({verdict} the goal >= 0.80x)")
    # Bytes per CPU-second does not depend on how much CPU the shared machine left each server.
    efficiency = statistics.median(server_cpu["nginx"]) / statistics.median(server_cpu["store"])
    print(
        f"CPU efficiency store/nginx (nginx s/GiB / store s/GiB, medians): {efficiency:.2f}x; "
        f"store {1024 / statistics.median(server_cpu['store']):.0f} MiB per CPU-second, "
        f"nginx {1024 / statistics.median(server_cpu['nginx']):.0f}"
    )
    return {
        "size": size,
        "reps": reps,
        "chunk": chunk,
        "rates": rates,
        "server_cpu_per_gib": server_cpu,
        "client_cpu_per_gib": client_cpu,
        "paired": paired,
        "ratio": ratio,
        "cpu_efficiency": efficiency,
        "loadavg": load,
        "pinned": pinned,
    }


def run(args: argparse.Namespace) -> int:
    nginx_bin = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if nginx_bin is None:
        print("nginx not found: install the nginx-light package", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    chunk = parse_size(args.chunk)
    pin = ["taskset", "-c", "0"] if args.pin else []
    if args.pin:
        # Before any thread exists: the store's loop and reader threads all inherit CPU 0.
        os.sched_setaffinity(0, {0})
    with tempfile.TemporaryDirectory(prefix="otad-store-bench-", dir=args.dir) as tmp:
        base = Path(tmp)
        base.chmod(0o755)  # nginx workers run as an unprivileged user and must reach www/
        cloud = pki.init_cloud(base / "cloud", ["bench"])
        config = cloud.config()
        # The artifact goes straight into the repository: this measures serving, not uploads.
        payload = base / "payload.bin"
        artifact_id = write_payload(payload, size)
        repo_tmp = config.artifacts_dir / ".incoming" / "bench.part"
        repo_tmp.parent.mkdir(parents=True, exist_ok=True)
        os.replace(payload, repo_tmp)
        store = ArtifactStore(
            config,
            keyring=Keyring.load(cloud.keyring_dir),
            ssl_context=cloud.server_context(),
            host="127.0.0.1",
            port=0,
            chunk_size=chunk,
        )
        info = store.repository.publish(
            repo_tmp, artifact_id, {"id": artifact_id, "size": size, "manifest": {}}
        )
        www = base / "www"
        www.mkdir()
        os.link(info.path, www / "artifact.bin")  # the very same file (and page cache pages)
        www.chmod(0o755)
        config.artifacts_dir.chmod(0o755)
        info.path.chmod(0o644)

        port = free_port()
        (base / "nginx.conf").write_text(nginx_conf(base, port, cloud, www, args.nginx_buffers))
        nginx = subprocess.Popen(
            [*pin, nginx_bin, "-p", str(base), "-c", str(base / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                if (base / "nginx.pid").exists():
                    break
                time.sleep(0.05)
            nginx_url = f"https://127.0.0.1:{port}/artifact.bin"
            samples = asyncio.run(
                measure(
                    store,
                    cloud,
                    artifact_id,
                    nginx_url,
                    nginx.pid,
                    args.reps,
                    1 if args.pin else None,
                )
            )
        finally:
            nginx.terminate()
            nginx.wait(10)
    print(f"nginx output_buffers: {args.nginx_buffers or 'default (2 32k)'}")
    figures = report(samples, size, args.reps, chunk, args.pin)
    if args.json:
        print(json.dumps(figures))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="file size (default 1G)")
    parser.add_argument("--reps", type=int, default=7, help="downloads per server (default 7)")
    parser.add_argument("--chunk", default="1M", help="store read/write chunk (default 1M)")
    parser.add_argument("--dir", default=None, help="where to put the temporary files")
    parser.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    parser.add_argument(
        "--nginx-buffers",
        default=None,
        help='nginx output_buffers, e.g. "2 1m" (default: nginx\'s own, 2 32k)',
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="servers on CPU 0, curl on CPU 1 (same placement for both servers; fewer migrations)",
    )
    args = parser.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

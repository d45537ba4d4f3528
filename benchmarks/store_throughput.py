"""Download throughput of the artifact store over TLS next to nginx serving the same file.

One run, same machine, same certificate (ECDSA P-256 from a fresh cloud dir), same file, same
client: ``curl --cacert ... -o /dev/null`` (a separate process, so the server's event loop has
its own core as far as the machine allows). Reps alternate store / nginx so a noisy neighbour
hits both. The store is measured as devices use it: mTLS with the device certificate and a
pre-signed URL. nginx (nginx-light, one worker, TLS on loopback, no client certificate) is the
reference. The file is incompressible random data and hot in the page cache.

Prints MiB/s min / median / max per server and the ratio of medians (goal: store >= 0.8x nginx),
and each server's CPU seconds per GiB served (wall time swings with the load of the shared
machine; CPU per byte much less, so it shows the efficiency gap on its own)::

    .venv/bin/python benchmarks/store_throughput.py [--size 1G] [--reps 5] [--chunk 1M]

nginx comes from the nginx-light Debian package (``apt-get install nginx-light``); the benchmark
says so and stops if it is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def nginx_conf(prefix: Path, port: int, cloud: pki.CloudDir, root: Path) -> str:
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
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cloud.server.cert};
        ssl_certificate_key {cloud.server.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {root};
    }}
}}
"""


def curl(url: str, cloud: pki.CloudDir, client_cert: bool) -> float:
    """Seconds for one full download to /dev/null (checked: HTTP 200 and the full size)."""
    cmd = ["curl", "-sS", "--fail", "--cacert", str(cloud.ca_cert), "-o", "/dev/null"]
    if client_cert:
        device = cloud.device("bench")
        cmd += ["--cert", str(device.cert), "--key", str(device.key)]
    cmd += ["-w", "%{size_download} %{http_code}", url]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"curl failed on {url.split('?')[0]}: {out.stderr.strip()}")
    elapsed = time.perf_counter() - start
    size, code = out.stdout.split()
    if code != "200":
        raise RuntimeError(f"curl got HTTP {code} from {url.split('?')[0]}")
    return elapsed if int(size) else float("nan")


def summary(rates: list[float]) -> str:
    return f"{min(rates):8.0f} / {statistics.median(rates):8.0f} / {max(rates):8.0f}"


def process_cpu(pids: list[int]) -> float:
    """User + system CPU seconds of the given processes (from /proc/<pid>/stat)."""
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
    size: int,
    reps: int,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Start the store in this loop, then alternate curl downloads from both servers.

    Returns MiB/s per download and the server's CPU seconds per GiB served (load on the
    shared machine changes wall time a lot, CPU per byte much less).
    """
    await store.start()
    try:
        store_url = store.signer.presign(artifact_id, "bench", 3600)
        # Warm-up: page cache, TLS code paths, both servers.
        await asyncio.to_thread(curl, store_url, cloud, True)
        await asyncio.to_thread(curl, nginx_url, cloud, False)
        workers = nginx_workers(nginx_pid)
        rates: dict[str, list[float]] = {"store": [], "nginx": []}
        cpu: dict[str, list[float]] = {"store": [], "nginx": []}
        for _ in range(reps):
            for name, url, cert in (("store", store_url, True), ("nginx", nginx_url, False)):
                pids = [os.getpid()] if name == "store" else workers
                before = process_cpu(pids)
                seconds = await asyncio.to_thread(curl, url, cloud, cert)
                cpu[name].append((process_cpu(pids) - before) / (size / (1 << 30)))
                rates[name].append(size / MIB / seconds)
        return rates, cpu
    finally:
        await store.stop()


def run(args: argparse.Namespace) -> int:
    nginx_bin = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if nginx_bin is None:
        print("nginx not found: install the nginx-light package", file=sys.stderr)
        return 2
    size = parse_size(args.size)
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
            chunk_size=parse_size(args.chunk),
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
        (base / "nginx.conf").write_text(nginx_conf(base, port, cloud, www))
        nginx = subprocess.Popen(
            [nginx_bin, "-p", str(base), "-c", str(base / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                if (base / "nginx.pid").exists():
                    break
                time.sleep(0.05)
            nginx_url = f"https://127.0.0.1:{port}/artifact.bin"
            rates, cpu = asyncio.run(
                measure(store, cloud, artifact_id, nginx_url, nginx.pid, size, args.reps)
            )
        finally:
            nginx.terminate()
            nginx.wait(10)
    ratio = statistics.median(rates["store"]) / statistics.median(rates["nginx"])
    print(f"file {size / MIB:.0f} MiB, {args.reps} reps, curl over TLS on loopback, MiB/s")
    print(f"{'server':<8} {'min':>8} / {'median':>8} / {'max':>8}")
    print(f"{'store':<8} {summary(rates['store'])}")
    print(f"{'nginx':<8} {summary(rates['nginx'])}")
    print(f"ratio store/nginx (medians): {ratio:.2f}x (goal >= 0.80x)")
    cpu_store, cpu_nginx = statistics.median(cpu["store"]), statistics.median(cpu["nginx"])
    print(
        f"server CPU per GiB (medians): store {cpu_store:.2f} s, nginx {cpu_nginx:.2f} s "
        f"(nginx/store efficiency {cpu_nginx / cpu_store:.2f}x)"
    )
    if args.json:
        print(
            json.dumps(
                {"size": size, "reps": args.reps, "rates": rates, "ratio": ratio, "cpu": cpu}
            )
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="file size (default 1G)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--chunk", default="1M", help="store read/write chunk (default 1M)")
    parser.add_argument("--dir", default=None, help="where to put the temporary files")
    parser.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    args = parser.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

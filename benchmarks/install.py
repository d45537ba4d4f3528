"""Install throughput and memory of the agent's code path, next to curl | zstd -d | dd.

    python benchmarks/install.py [--size 1G] [--reps 3] [--workdir DIR]

Builds an ext4-like image of ``--size`` (an ext4 file system header from mkfs.ext4, then real
files from /usr until about 80 % full, the rest empty: it compresses like a root file system),
makes a zstd bundle of it, serves it with the real artifact store over HTTPS, and then, in the
same run and against the same server:

* otad: a child process runs the agent's job path (``UpdateRunner.run_job``: download, verify,
  decompress, write the slot file, fsync, re-read and hash, switch the sim bootloader) and
  reports its own peak RSS (``VmHWM``, the kernel's high-water mark since exec);
* pipeline: ``curl -s -r <payload offset>- URL | zstd -d | dd of=SLOT bs=1M conv=fsync,notrunc``
  (Range skips the bundle's signed preamble, so zstd gets the plain payload);
* verified pipeline: the same tools doing the checks the agent does (but the signature): the
  payload through ``tee`` into ``openssl dgst -sha256`` (the fastest SHA-256 here; coreutils'
  ``sha256sum`` is slower), then the slot read back from the medium (``dd iflag=direct``) into
  another; both digests are compared with the manifest's. It is reported beside the goal's
  ratio, to show what the agent's verification costs.

Both write into preallocated, already written slot files (a first write into a fresh file is
several times slower on this kind of disk), and each timed run starts with its slot out of the
page cache, as a device's inactive slot is (see ``evict``). Odd reps run the pipeline before
the agent, even reps after it. MiB/s counts image bytes. Ends with the lines
``ratio: <otad MiB/s / pipeline MiB/s>`` and ``rss: <peak MiB of the installing process>``.

Per rep it also prints the installer's CPU seconds per thread (event loop = network and TLS,
otad-slot-writer = decompression and writes, otad-bundle-sha = payload hash,
otad-slot-readback = the re-read of the slot behind the writes), the seconds each thread
waited for a CPU (schedstat: on a shared machine these explain most of the spread between
reps), the server's CPU, and minor page faults. CPU seconds per GiB are the steadier figure.
Debug aids: OTAD_BENCH_LOG=info (the agent's log), OTAD_BENCH_PROFILE=1 (cProfile of the
event loop thread), OTAD_BENCH_TRACEMALLOC=1, OTAD_BENCH_RSS_SERIES=1 (VmRSS over time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SOURCES = ("/usr/lib", "/usr/include", "/usr/share")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def make_image(path: Path, size: int) -> None:
    """mkfs.ext4 for a real superblock and group descriptors, then real file bytes."""
    with path.open("wb") as f:
        f.truncate(size)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0", str(path)],
        check=True,
    )
    fill_until = int(size * 0.8)
    offset = 8 << 20  # leave the metadata mkfs wrote at the start alone
    with path.open("r+b") as out:
        out.seek(offset)
        for root in SOURCES:
            for dirpath, _, files in os.walk(root):
                for name in sorted(files):
                    if offset >= fill_until:
                        return
                    try:
                        with open(os.path.join(dirpath, name), "rb") as src:
                            data = src.read(fill_until - offset)
                    except OSError:
                        continue
                    # 4 KiB aligned like file system blocks
                    data += bytes(-len(data) % 4096)
                    out.write(data)
                    offset += len(data)


def preallocate(path: Path, size: int) -> None:
    """A slot file of ``size`` bytes whose blocks are already written (not fresh extents)."""
    if path.exists() and path.stat().st_size == size:
        return
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={size >> 20}", "status=none"],
        check=True,
    )


def evict(path: Path) -> None:
    """Write ``path`` back and drop it from the page cache: a slot a device has not read lately.

    Each timed run starts with its target slot out of the cache. Otherwise the tools would
    overwrite pages the previous rep left cached (the agent drops what it wrote, dd does not),
    and skip the page allocations a device's inactive slot costs every install."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def peak_rss_kib(field: str = "VmHWM") -> int:
    """This process's peak RSS since exec (VmHWM).

    Not ``ru_maxrss``: that one survives exec, so a child forked from a big parent (this
    benchmark holds the image and the bundle builder) would report the parent's size.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# --- the child: the agent's install path ------------------------------------------------------


class ThreadCpu:
    """Samples /proc/self/task/*/stat: CPU seconds per thread name, threads that ended included.

    A thread's counters vanish with it, so a sampler keeps the last value it saw per thread id;
    the tail a thread spends after the last sample (at most ``interval``) is not counted.
    """

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        self.interval = interval
        self.seen: dict[int, tuple[str, float]] = {}
        self.waited: dict[int, float] = {}  # seconds runnable but not running (schedstat)
        self.rss: list[tuple[float, int]] = []  # (seconds, VmRSS KiB) at each sample
        self._tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> ThreadCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.wait(self.interval):
            self.sample()
            with contextlib.suppress(OSError, ValueError):
                self.rss.append((time.perf_counter() - start, peak_rss_kib(field="VmRSS")))

    def sample(self) -> None:
        import threading

        # the kernel's thread name is the process name; Python's names are by native id
        names = {t.native_id: t.name for t in threading.enumerate()}
        for task in os.listdir("/proc/self/task"):
            try:
                raw = Path(f"/proc/self/task/{task}/stat").read_text()
            except OSError:
                continue
            name = names.get(int(task)) or self.seen.get(int(task), ("?", 0.0))[0]
            name = name.split(" (")[0].rstrip("_0123456789")  # pool workers: one name
            fields = raw[raw.rindex(")") + 2 :].split()
            # fields[11], [12]: utime, stime (fields 14 and 15 of proc(5), counted from 1)
            cpu = (int(fields[11]) + int(fields[12])) / self._tick
            self.seen[int(task)] = (name, cpu)
            with contextlib.suppress(OSError, ValueError, IndexError):
                sched = Path(f"/proc/self/task/{task}/schedstat").read_text().split()
                self.waited[int(task)] = int(sched[1]) / 1e9

    def by_name(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, cpu in self.seen.values():
            out[name] = out.get(name, 0.0) + cpu
        out.pop("bench-sampler", None)
        return out

    def waits_by_name(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for tid, (name, _) in self.seen.items():
            out[name] = out.get(name, 0.0) + self.waited.get(tid, 0.0)
        out.pop("bench-sampler", None)
        return out


def child(args: argparse.Namespace) -> None:
    """Runs in its own process so its peak RSS is the installer's alone."""
    spec = json.loads(args.child)
    from otad import logs

    logs.configure(level=os.environ.get("OTAD_BENCH_LOG", "warning"), stream=sys.stderr)
    from otad.agent.bootloader.sim import SimBootloader
    from otad.agent.config import parse
    from otad.agent.download import Downloader
    from otad.agent.journal import Journal
    from otad.agent.slots import SlotLayout, SlotSpec
    from otad.agent.update import DesiredSoftware, HealthResult, RebootPending, UpdateRunner
    from otad.agent.wiring import limit_malloc_arenas
    from otad.bundle import Keyring

    limit_malloc_arenas()  # what `otad agent run` does at start
    config = parse(spec["config"])
    imports_kib = peak_rss_kib()

    class Quiet:
        def report(self, reported: Any, **_: Any) -> int:
            return 0

        async def flush(self, within: float) -> bool:
            return True

    async def health() -> HealthResult:
        return HealthResult(True)

    async def main() -> float:
        journal = Journal(config.state_dir, boot_id="bench")
        journal.acquire()
        downloader = Downloader(config)
        layout = SlotLayout({s: SlotSpec(s, path=Path(spec["slots"][s])) for s in ("A", "B")})
        runner = UpdateRunner(
            config,
            bootloader=SimBootloader(config.sim_state_path),
            journal=journal,
            booted_slot="A",
            layout=layout,
            downloader=downloader,
            reporter=Quiet(),
            rebooter=lambda: None,
            health=health,
            keyring=Keyring.load(config.keyring),
        )
        desired = DesiredSoftware(version=spec["version"], url=spec["url"], job_id=spec["job"])
        start = time.perf_counter()
        with contextlib.suppress(RebootPending):
            await runner.run_job(desired)
        elapsed = time.perf_counter() - start
        await downloader.close()
        record = journal.load()
        if record is None or record.state.value != "rebooting":
            raise SystemExit(
                f"install did not reach rebooting: {record!r} {record and record.error}"
            )
        return elapsed

    if os.environ.get("OTAD_BENCH_TRACEMALLOC"):
        import tracemalloc

        tracemalloc.start(8)
    before = ThreadCpu()
    before.sample()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with ThreadCpu() as sampler:
        if os.environ.get("OTAD_BENCH_PROFILE"):  # the event loop thread only
            import cProfile
            import pstats

            profile = cProfile.Profile()
            elapsed = profile.runcall(asyncio.run, main())
            pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(18)
        else:
            elapsed = asyncio.run(main())
    threads = sampler.by_name()
    waits = sampler.waits_by_name()
    for name, cpu in before.by_name().items():  # imports and setup ran on the main thread
        threads[name] = round(threads.get(name, 0.0) - cpu, 2)
    for name, wait in before.waits_by_name().items():
        waits[name] = round(waits.get(name, 0.0) - wait, 2)
    if os.environ.get("OTAD_BENCH_TRACEMALLOC"):
        import tracemalloc

        _, peak = tracemalloc.get_traced_memory()
        print(f"tracemalloc: python heap peak {peak / 2**20:.1f} MiB", file=sys.stderr)
        for stat in tracemalloc.take_snapshot().statistics("lineno")[:8]:
            print(f"  {stat}", file=sys.stderr)
    peak_kib = peak_rss_kib()
    print(
        json.dumps(
            {
                "seconds": elapsed,
                "rss_kib": peak_kib,
                "imports_kib": imports_kib,
                "threads": threads,
                "waits": waits,
                "rss_series": [(round(t, 2), kib // 1024) for t, kib in sampler.rss[::4]],
                # minor page faults during the install: fresh big allocations fault per page
                "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
            }
        )
    )


# --- the parent ---------------------------------------------------------------------------------


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    cpu = children_cpu()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--child",
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"otad install child failed with {proc.returncode}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    result["cpu"] = children_cpu() - cpu  # the whole child process, imports included
    return result


def curl_payload(url: str, offset: int, tls: dict[str, str]) -> str:
    """The shell command that fetches the bundle's payload (Range skips the preamble)."""
    return (
        f"curl -s --fail --cacert {tls['ca']} --cert {tls['cert']} --key {tls['key']} "
        f"-r {offset}- '{url}'"
    )


async def run_timed_shell(cmd: str, what: str) -> tuple[float, float]:
    """Run ``cmd`` under bash with pipefail: (seconds, CPU seconds of its processes)."""
    cpu = children_cpu()
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec("/bin/bash", "-o", "pipefail", "-c", cmd)
    code = await proc.wait()
    elapsed = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{what} failed with {code}")
    return elapsed, children_cpu() - cpu


async def run_pipeline(
    url: str, offset: int, slot: Path, tls: dict[str, str]
) -> tuple[float, float]:
    cmd = (
        f"{curl_payload(url, offset, tls)} | zstd -d -q | "
        f"dd of={slot} bs=1M iflag=fullblock conv=fsync,notrunc status=none"
    )
    return await run_timed_shell(cmd, "pipeline")


async def run_verified_pipeline(
    url: str, offset: int, slot: Path, tls: dict[str, str], size: int, work: Path
) -> tuple[float, float, str, str]:
    """(seconds, CPU seconds, payload sha256, image sha256 read back from the medium)."""
    fifo, payload_sum, image_sum = work / "payload.fifo", work / "payload.sum", work / "image.sum"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    cmd = (
        f"openssl dgst -sha256 -r < {fifo} > {payload_sum} & "
        f"{curl_payload(url, offset, tls)} | tee {fifo} | zstd -d -q | "
        f"dd of={slot} bs=1M iflag=fullblock conv=fsync,notrunc status=none && wait $! && "
        f"dd if={slot} bs=1M iflag=direct,count_bytes count={size} status=none "
        f"| openssl dgst -sha256 -r > {image_sum}"
    )
    elapsed, cpu = await run_timed_shell(cmd, "verified pipeline")
    payload_digest, image_digest = (f.read_text().split()[0] for f in (payload_sum, image_sum))
    return elapsed, cpu, payload_digest, image_digest


def sha256_of(path: Path, size: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        left = size
        while left:
            chunk = f.read(min(1 << 20, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


async def bench(args: argparse.Namespace, work: Path) -> None:
    from otad import logs

    logs.configure(level="warning")
    from otad.bundle import Keyring, build_bundle, load_private_key
    from otad.cloud.pki import CloudDir, init_cloud
    from otad.cloud.store import ArtifactStore

    size = parse_size(args.size)
    image = work / "rootfs.ext4"
    bundle = work / "rootfs.otb"
    cloud_dir = (
        CloudDir(work / "cloud")
        if (work / "cloud").exists()
        else init_cloud(work / "cloud", ["bench"])
    )
    if not image.exists() or image.stat().st_size != size:
        print(f"building a {size >> 20} MiB ext4-like image ...", flush=True)
        await asyncio.to_thread(make_image, image, size)
        bundle.unlink(missing_ok=True)
    if not bundle.exists():
        print("building the zstd bundle ...", flush=True)
        manifest = await asyncio.to_thread(
            build_bundle,
            image,
            bundle,
            key=load_private_key(cloud_dir.signing_key),
            version="2.0",
            compatible="bench",
        )
    else:
        from otad.bundle import read_preamble

        with bundle.open("rb") as f:
            manifest = read_preamble(f).manifest()
    print(
        f"image {size >> 20} MiB, bundle {bundle.stat().st_size / 2**20:.1f} MiB "
        f"(zstd {size / manifest.size:.2f}:1)",
        flush=True,
    )
    slots = {"A": work / "slot-a.img", "B": work / "slot-b.img"}
    for slot in slots.values():
        await asyncio.to_thread(preallocate, slot, size)

    config = cloud_dir.config().with_overrides(artifacts_dir=work / "artifacts")
    keyring = Keyring.load(cloud_dir.keyring_dir)
    store = ArtifactStore(
        config,
        keyring=keyring,
        ssl_context=cloud_dir.server_context(),
        host="127.0.0.1",
        port=0,
    )
    info = await asyncio.to_thread(store.repository.import_file, bundle, keyring)
    from otad.bundle import read_preamble

    with bundle.open("rb") as f:
        payload_offset = read_preamble(f).header.preamble_size
    device = cloud_dir.device("bench")
    tls = {"ca": str(cloud_dir.ca_cert), "cert": str(device.cert), "key": str(device.key)}
    otad_rates: list[float] = []
    pipe_rates: list[float] = []
    checked_rates: list[float] = []
    rss: list[float] = []
    otad_cpu: list[float] = []
    pipe_cpus: list[float] = []
    async with store:
        for rep in range(args.reps):
            url = store.signer.presign(info.artifact_id, "bench", 3600)
            state = work / f"state-{rep}"
            state.mkdir(exist_ok=True)
            (state / "journal.json").unlink(missing_ok=True)
            agent_config = {
                "device_id": "bench",
                "compatible": "bench",
                "state_dir": str(state),
                "keyring": str(cloud_dir.keyring_dir),
                "broker": {"host": "127.0.0.1"},
                "store": {"ca": tls["ca"], "cert": tls["cert"], "key": tls["key"]},
                "slots": {"A": {"path": str(slots["A"])}, "B": {"path": str(slots["B"])}},
                "bootloader": {"type": "sim", "sim_state": str(work / "sim.json")},
                # the agent's defaults unless a flag overrides one
                "download": {
                    key: value
                    for key, value in (
                        ("chunk_size", args.chunk),
                        ("block_size", args.block),
                        ("queue_chunks", args.queue),
                    )
                    if value is not None
                },
            }
            (work / "sim.json").unlink(missing_ok=True)
            from otad.agent.bootloader.sim import SimBootloader

            SimBootloader(work / "sim.json").power_on()
            spec = {
                "config": agent_config,
                "slots": {k: str(v) for k, v in slots.items()},
                "url": url,
                "version": "2.0",
                "job": f"bench-{rep}",
            }
            # odd reps run the pipeline first: neither side always follows the other
            order = ("otad", "pipeline") if rep % 2 == 0 else ("pipeline", "otad")
            server_cpu: dict[str, float] = {}  # this process serves the bundle
            for what in order:
                await asyncio.to_thread(evict, slots["B" if what == "otad" else "A"])
                own = self_cpu()
                if what == "otad":
                    result = await run_child(spec)
                else:
                    pipe_seconds, pipe_cpu = await run_pipeline(
                        url, payload_offset, slots["A"], tls
                    )
                server_cpu[what] = self_cpu() - own
            otad_rate = size / 2**20 / result["seconds"]
            await asyncio.to_thread(evict, slots["A"])
            checked_seconds, checked_cpu, payload_sum, image_sum = await run_verified_pipeline(
                url, payload_offset, slots["A"], tls, size, work
            )
            if (payload_sum, image_sum) != (manifest.sha256, manifest.image_sha256):
                raise SystemExit("the verified pipeline's sums differ from the manifest")
            checked_rates.append(size / 2**20 / checked_seconds)
            otad_cpu.append(result["cpu"])
            pipe_cpus.append(pipe_cpu)
            pipe_rate = size / 2**20 / pipe_seconds
            otad_rates.append(otad_rate)
            pipe_rates.append(pipe_rate)
            rss.append(result["rss_kib"] / 1024)
            print(
                f"rep {rep}: otad {otad_rate:7.1f} MiB/s ({result['seconds']:.2f} s, "
                f"peak RSS {result['rss_kib'] / 1024:.1f} MiB, after imports "
                f"{result['imports_kib'] / 1024:.1f} MiB)   pipeline {pipe_rate:7.1f} MiB/s "
                f"({pipe_seconds:.2f} s); CPU s otad {result['cpu']:.2f} / "
                f"pipeline {pipe_cpu:.2f}; "
                f"server {server_cpu['otad']:.2f} / {server_cpu['pipeline']:.2f}",
                flush=True,
            )
            print(
                f"       verified pipeline {checked_rates[-1]:7.1f} MiB/s "
                f"({checked_seconds:.2f} s, CPU s {checked_cpu:.2f})",
                flush=True,
            )
            threads = ", ".join(f"{k} {v:.2f}" for k, v in sorted(result["threads"].items()))
            waits = ", ".join(f"{k} {v:.2f}" for k, v in sorted(result["waits"].items()))
            print(
                f"       otad CPU s by thread: {threads}; waiting for a CPU: {waits}; "
                f"minor faults {result['faults']}",
                flush=True,
            )
            if os.environ.get("OTAD_BENCH_RSS_SERIES"):
                print(f"       RSS MiB over time (s, MiB): {result['rss_series']}", flush=True)
    want = manifest.image_sha256
    got_otad = await asyncio.to_thread(sha256_of, slots["B"], size)
    got_pipe = await asyncio.to_thread(sha256_of, slots["A"], size)
    if got_otad != want or got_pipe != want:
        raise SystemExit("a slot does not hold the image: the benchmark is void")
    o, p = statistics.median(otad_rates), statistics.median(pipe_rates)
    gib = size / 2**30
    print(
        f"otad MiB/s min/median/max:     {min(otad_rates):.1f} / {o:.1f} / {max(otad_rates):.1f}"
        "  (download, verify, write, fsync, re-read + hash)"
    )
    print(
        f"pipeline MiB/s min/median/max: {min(pipe_rates):.1f} / {p:.1f} / {max(pipe_rates):.1f}"
        "  (curl | zstd -d | dd conv=fsync)"
    )
    print(
        f"client CPU s per GiB (min/median): otad {min(otad_cpu) / gib:.2f} / "
        f"{statistics.median(otad_cpu) / gib:.2f} (whole process, start-up included), "
        f"pipeline {min(pipe_cpus) / gib:.2f} / {statistics.median(pipe_cpus) / gib:.2f} "
        "(the server's CPU is not counted)"
    )
    c = statistics.median(checked_rates)
    print(
        f"verified pipeline MiB/s min/median/max: {min(checked_rates):.1f} / {c:.1f} / "
        f"{max(checked_rates):.1f}  (the same + tee | sha256, dd iflag=direct | sha256)"
    )
    print(f"ratio to the verified pipeline: {o / c:.2f}")
    ratios = [a / b for a, b in zip(otad_rates, pipe_rates, strict=True)]
    print(f"ratios per rep (same server, back to back): {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"ratio: {o / p:.2f}")
    print(f"rss: {max(rss):.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="image size (e.g. 256M, 1G, 2G)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--chunk", type=int, help="download.chunk_size (agent default if unset)")
    parser.add_argument("--block", type=int, help="download.block_size (agent default if unset)")
    parser.add_argument("--queue", type=int, help="download.queue_chunks (agent default if unset)")
    parser.add_argument("--workdir", type=Path, help="keep image, bundle and slots here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        asyncio.run(bench(args, args.workdir))
        return
    with tempfile.TemporaryDirectory(prefix="otad-install-bench-", dir="/var/tmp") as tmp:
        asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    main()

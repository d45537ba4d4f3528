"""Issue 8, resource limits: full disks, many failed downloads, a second agent.

- 200 consecutive failed jobs through the real UpdateRunner + Downloader (journal, sim
  bootloader, slot files, keyring) against servers that refuse at once, in four different ways:
  open fds, asyncio tasks, threads and RSS must not grow.
- The target slot on a 1 MiB tmpfs (ENOSPC mid-write) and the data partition (state dir) full
  before a job: a reported failure with an error code, the booted slot untouched.
- A second ``otad agent run`` on the same state directory exits at once with ``agent_locked``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from plugins.agent_env import (
    ListReporter,
    offer_bundle,
    runner_on_file_slots,
    serve_https,
    wait_reported,
)
from plugins.cloud_env import free_port
from rogue import RogueServer

from otad.agent.bootloader.sim import SimBootloader
from otad.agent.config import AgentConfig, parse
from otad.agent.update import DesiredSoftware, DeviceState

MiB = 1024 * 1024
FAILED_JOBS = 200
WARMUP_JOBS = 20


# --- 200 failed downloads --------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def own_threads() -> int:
    """Threads other than the event loop's default executor (a bounded pool that grows lazily
    up to min(32, cpus + 4) workers named asyncio_N: growth inside that bound is no leak)."""
    return sum(1 for t in threading.enumerate() if not t.name.startswith("asyncio_"))


def executor_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("asyncio_"))


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


async def reset_tls(s: RogueServer, r: Any, w: asyncio.StreamWriter) -> None:
    await asyncio.wait_for(r.read(512), 10)
    w.transport.abort()


@pytest.fixture
async def refusing_urls(cloud_dir: Any) -> AsyncIterator[list[str]]:
    """Four servers that refuse at once: nothing listening, a TLS reset, 503, 404."""

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]))

    rogue = await RogueServer(reset_tls, b"", None).start()
    try:
        async with serve_https(cloud_dir, "/{code}", status) as origin:
            yield [
                f"https://127.0.0.1:{free_port()}/b",
                rogue.url,
                f"{origin}/503",
                f"{origin}/404",
            ]
    finally:
        await rogue.close()


def runner_config(cloud_dir: Any, root: Path) -> AgentConfig:
    for name in ("a", "b"):
        with (root / f"slot-{name}.img").open("wb") as f:
            f.truncate(MiB)
    ident = cloud_dir.device("dev1")
    return parse(
        {
            "device_id": "dev1",
            "compatible": "qemu-x86_64",
            "state_dir": str(root / "state"),
            "keyring": str(cloud_dir.keyring_dir),
            "broker": {
                "host": "127.0.0.1",
                "ca": str(cloud_dir.ca_cert),
                "cert": str(ident.cert),
                "key": str(ident.key),
            },
            "slots": {
                "A": {"path": str(root / "slot-a.img")},
                "B": {"path": str(root / "slot-b.img")},
            },
            "bootloader": {"type": "sim", "sim_state": str(root / "sim.json")},
            "download": {"retries": 0, "sock_connect": 2.0, "sock_read": 2.0},
        }
    )


async def test_resource_200_failed_downloads_leak_no_fds_tasks_threads_or_memory(
    cloud_dir: Any, refusing_urls: list[str], tmp_path: Path
) -> None:
    config = runner_config(cloud_dir, tmp_path)
    runner = await runner_on_file_slots(config)
    downloader, journal = runner.downloader, runner.journal
    assert isinstance(runner.reporter, ListReporter)
    reporter = runner.reporter

    async def fail_jobs(first: int, count: int) -> None:
        for n in range(first, first + count):
            url = refusing_urls[n % len(refusing_urls)]
            await runner.run_job(DesiredSoftware(version="2.0", url=url, job_id=f"j{n}"))
            assert runner.record is not None and runner.record.state.value == "failed"

    try:
        await fail_jobs(0, WARMUP_JOBS)  # pools, TLS contexts, the to_thread executor warm up
        gc.collect()
        before = (open_fds(), len(asyncio.all_tasks()), own_threads(), rss_kib())
        await fail_jobs(WARMUP_JOBS, FAILED_JOBS)
        await asyncio.sleep(0.1)  # let aborted transports finish closing
        gc.collect()
        after = (open_fds(), len(asyncio.all_tasks()), own_threads(), rss_kib())
    finally:
        await downloader.close()
        journal.release()

    finals = [r["software"] for r in reporter.reports if r["software"]["state"] == "failed"]
    assert len(finals) == WARMUP_JOBS + FAILED_JOBS
    codes = {f["error"]["code"] for f in finals}
    assert codes == {"download_retries_exhausted", "download_not_found"}, codes
    fds, tasks, threads, rss = (a - b for a, b in zip(after, before, strict=True))
    print(f"200 failed jobs: fds/tasks/threads/RSS KiB before {before} after {after}")
    assert fds <= 0, f"open fds grew by {fds} over {FAILED_JOBS} failed jobs"
    assert tasks <= 0, f"asyncio tasks grew by {tasks}"
    assert threads <= 0, f"threads grew by {threads}"
    assert executor_threads() <= min(32, (os.cpu_count() or 1) + 4)
    assert rss < 8 * 1024, f"RSS grew by {rss} KiB over {FAILED_JOBS} failed jobs"
    assert not SimBootloader(config.sim_state_path).state().slot("B").bootable


# --- full disks ----------------------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (this suite runs as root, like the platform tests' ENOSPC case)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]
    if subprocess.run(mount, check=False).returncode:
        pytest.fail("mounting a tmpfs is required for the full-disk tests")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_resource_target_slot_full_fails_the_job_with_no_space(
    cloud: Any, cloud_dir: Any, make_device: Any, tiny_tmpfs: Path, tmp_path: Path
) -> None:
    slot_b = tiny_tmpfs / "slot-b.img"
    with slot_b.open("wb") as f:
        f.truncate(4 * MiB)  # sparse: the slot looks big enough, the medium runs out at 1 MiB
    dev = make_device("dev1", config={"slots": {"B": {"path": str(slot_b)}}})
    await dev.start()
    await offer_bundle(cloud, cloud_dir, tmp_path, image_size=3 * MiB, job="full-slot")
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed")
    assert sw["jobId"] == "full-slot" and sw["error"]["code"] == "no_space", sw
    assert sw["version"] == "1.0" and sw["slot"] == "A"
    boot = dev.sim.state()
    assert not boot.slot("B").bootable and boot.next_boot() == "A"
    assert dev.slot_bytes("A") == dev.factory["A"] and dev.reboot_requests == 0


async def test_resource_full_data_partition_before_a_job_is_reported_and_touches_nothing(
    cloud: Any, cloud_dir: Any, make_device: Any, tiny_tmpfs: Path, tmp_path: Path
) -> None:
    state_dir = tiny_tmpfs / "state"
    dev = make_device("dev1", config={"state_dir": str(state_dir)})
    state_dir.mkdir()
    DeviceState(state_dir / "device.json", {"A": "1.0"}).save()
    await dev.start()
    await wait_reported(cloud, "dev1", lambda s: s["state"] == "idle")
    filler = tiny_tmpfs / "filler"
    with filler.open("wb") as f:  # fill the partition to the last block
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    await offer_bundle(cloud, cloud_dir, tmp_path, job="full-data")
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed", within=10)
    assert sw["jobId"] == "full-data" and sw["error"]["code"] in {"journal_error", "no_space"}, sw
    assert sw["version"] == "1.0" and sw["slot"] == "A"
    boot = dev.sim.state()
    assert boot.next_boot() == "A" and dev.reboot_requests == 0
    assert dev.slot_bytes("A") == dev.factory["A"] and dev.slot_bytes("B") == dev.factory["B"]

    # space again: the next job runs normally
    filler.unlink()
    await offer_bundle(cloud, cloud_dir, tmp_path, job="after-full", image_size=MiB)
    await dev.wait_reboot_requested()


# --- a second agent ------------------------------------------------------------------------------


async def test_resource_second_agent_on_the_same_data_dir_exits_with_agent_locked(
    cloud: Any, make_device: Any
) -> None:
    dev = make_device("dev1", config={"slots": {"booted": "A"}})
    await dev.start()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "otad",
        "agent",
        "run",
        "--config",
        str(dev.config_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = (out + err).decode()
    assert proc.returncode == 1, text
    assert "agent_locked" in text and f"pid {os.getpid()}" in text, text
    assert str(dev.state_dir) in text
    # the running agent is unaffected
    assert dev.agent is not None and dev.agent.runner is not None
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "idle")
    assert sw["slot"] == "A"

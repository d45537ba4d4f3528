"""A job cancelled, or the agent stopped, while a blocking step runs in a thread.

The slow medium each test needs is played by delaying one call (a write, a flush, a journal
write) in the thread that makes it; everything else is real: file slots, the journal, the sim
bootloader, the verifier, and for the resume cases a TLS server scripted per request."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from plugins.agent_env import runner_on_file_slots
from plugins.cloud_env import make_bundle
from test_agent_disk_pipe import disk_pipe
from test_agent_download_protocol import Exchange, ranged_from, scripted_server, whole

from otad.agent.bootloader.sim import SimBootloader
from otad.agent.config import parse
from otad.agent.slots import SlotWriter
from otad.agent.update import DesiredSoftware, UpdateRunner
from otad.bundle import Keyring

MiB = 1024 * 1024


def slowed(real: Callable[..., Any], when: Callable[..., bool], delay: float) -> Callable[..., Any]:
    """``real``, taking ``delay`` longer whenever ``when(*args)`` holds (a slow medium)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            time.sleep(delay)
        return real(*args, **kwargs)

    return call


def in_thread(name: str) -> bool:
    return threading.current_thread().name == name


def fds_on(path: Path) -> list[int]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(int(fd))
        except OSError:
            continue
    return found


@pytest.fixture
async def runner(cloud_dir: Any, tmp_path: Path) -> AsyncIterator[UpdateRunner]:
    for name in ("a", "b"):
        with (tmp_path / f"slot-{name}.img").open("wb") as f:
            f.truncate(8 * MiB)
    ident = cloud_dir.device("dev1")
    config = parse(
        {
            "device_id": "dev1",
            "compatible": "qemu-x86_64",
            "state_dir": str(tmp_path / "state"),
            "keyring": str(cloud_dir.keyring_dir),
            "broker": {"host": "127.0.0.1", "ca": str(cloud_dir.ca_cert)},
            "store": {"ca": str(cloud_dir.ca_cert), "cert": str(ident.cert), "key": str(ident.key)},
            "slots": {
                "A": {"path": str(tmp_path / "slot-a.img")},
                "B": {"path": str(tmp_path / "slot-b.img")},
            },
            "bootloader": {"type": "sim", "sim_state": str(tmp_path / "sim.json")},
            "download": {"retries": 2, "backoff_initial": 0.01, "read_back_step": MiB},
        }
    )
    made = await runner_on_file_slots(config)
    try:
        yield made
    finally:
        await made.downloader.close()
        made.journal.release()


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# --- the disk pipe ---------------------------------------------------------------------------


async def test_disk_pipe_abort_cancelled_again_still_waits_for_the_write_in_progress(
    cloud_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new desired state cancels the job, then the agent stops and cancels it again while
    the pipe's abort waits for a slow write: the slot must not be closed under that write (its
    fd number, reused by the next open file, would receive the rest of the image)."""
    bundle = make_bundle(cloud_dir, tmp_path / "b.otb", image_size=4 * MiB).read_bytes()
    slot = tmp_path / "slot"
    slot.write_bytes(bytes(8 * MiB))
    monkeypatch.setattr(
        os, "pwrite", slowed(os.pwrite, lambda *a: in_thread("otad-slot-writer"), 0.3)
    )
    closed_on: list[str] = []
    real_close = SlotWriter.close

    def close(writer: SlotWriter) -> None:
        closed_on.append(threading.current_thread().name)
        real_close(writer)

    monkeypatch.setattr(SlotWriter, "close", close)

    pipe = disk_pipe(Keyring.load(cloud_dir.keyring_dir), slot, depth=4)

    async def job() -> None:
        try:
            await pipe.put(bundle[: 2 * MiB])
            await asyncio.sleep(30)
        except BaseException:
            await pipe.abort()
            raise

    task = asyncio.create_task(job())
    await asyncio.sleep(0.15)  # the thread is inside a slow write
    task.cancel()
    await asyncio.sleep(0.05)
    task.cancel()  # the agent stops meanwhile
    await asyncio.wait([task], timeout=10)
    assert task.cancelled()
    writers = [t for t in threading.enumerate() if t.name == "otad-slot-writer"]
    assert not any(t.is_alive() for t in writers), "abort returned while the pipe still writes"
    assert pipe.writer is None and fds_on(slot) == []
    # closing the slot joins its read-back thread: never on the event loop
    assert closed_on and "MainThread" not in closed_on, closed_on


# --- a job on file slots -----------------------------------------------------------------------


async def test_job_cancelled_while_the_slot_opens_leaves_it_closed(
    runner: UpdateRunner, cloud_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slot opens in a thread (a PARTLABEL lookup through udev can take a moment); a job
    cancelled meanwhile used to leave that open file with nobody to close it (on a block
    device an O_EXCL open, refusing every later job)."""
    bundle = make_bundle(cloud_dir, tmp_path / "b.otb", image_size=MiB)
    slot_b = runner.layout.path("B")
    opening = threading.Event()
    real_path = runner.layout.path

    def slow_path(slot: str) -> Path:
        if slot == "B" and threading.current_thread() is not threading.main_thread():
            opening.set()
            time.sleep(0.3)
        return real_path(slot)

    opened = threading.Event()
    real_init = SlotWriter.__init__

    def init(writer: SlotWriter, *args: Any, **kwargs: Any) -> None:
        real_init(writer, *args, **kwargs)
        opened.set()

    monkeypatch.setattr(runner.layout, "path", slow_path)
    monkeypatch.setattr(SlotWriter, "__init__", init)
    desired = DesiredSoftware(version="2.0", url=bundle.as_uri(), job_id="j1")
    job = asyncio.create_task(runner.run_job(desired))
    await until(opening.is_set)
    job.cancel()  # a new desired state
    await asyncio.wait([job], timeout=10)
    await until(opened.is_set)  # the thread got the slot open, whenever the job ended
    assert runner.record is not None and runner.record.error is not None
    assert runner.record.error["code"] == "job_cancelled"
    assert fds_on(slot_b) == []
    assert not SimBootloader(runner.config.sim_state_path).state().slot("B").bootable


async def test_agent_stopped_while_the_slot_is_verified_closes_it_after_the_re_read(
    runner: UpdateRunner, cloud_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent stops during the final re-read: the slot is closed after that re-read ended,
    not under it (closing cancels the read-back a re-read may still be finishing)."""
    bundle = make_bundle(cloud_dir, tmp_path / "b.otb", image_size=2 * MiB)
    events: list[str] = []
    real_finish, real_close = SlotWriter.finish, SlotWriter.close

    def finish(writer: SlotWriter, *args: Any) -> Any:
        events.append("finish")
        time.sleep(0.3)  # a slow medium's last read-back step
        try:
            return real_finish(writer, *args)
        finally:
            events.append("finished")

    def close(writer: SlotWriter) -> None:
        events.append("close")
        real_close(writer)

    monkeypatch.setattr(SlotWriter, "finish", finish)
    monkeypatch.setattr(SlotWriter, "close", close)
    desired = DesiredSoftware(version="2.0", url=bundle.as_uri(), job_id="j1")
    job = asyncio.create_task(runner.run_job(desired))
    await until(lambda: "finish" in events)
    runner.stopping = True  # what the daemon does before it cancels a job to stop
    job.cancel()
    await asyncio.wait([job], timeout=10)
    assert events.index("finished") < events.index("close"), events
    record = await asyncio.to_thread(runner.journal.load)
    assert record is not None and record.state.value == "installing"  # resumed at next start


# --- a job downloading from a scripted server ---------------------------------------------------


def resume_entry(runner: UpdateRunner) -> dict[str, Any] | None:
    record = runner.journal.load()
    entry = record.runtime.get("resume") if record is not None else None
    return entry if isinstance(entry, dict) else None


async def test_job_cancelled_while_a_checkpoint_is_journaled_stays_cancelled(
    runner: UpdateRunner, cloud_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint's journal write was still running when the cancelled job journaled its
    end; landing after it, it brought the job back (``downloading`` with a resume point), and
    the next start resumed a job already reported failed."""
    bundle = make_bundle(
        cloud_dir, tmp_path / "b.otb", image_size=4 * MiB, frame_size=256 * 1024
    ).read_bytes()
    journaling = threading.Event()

    def checkpoint(*args: Any, **kwargs: Any) -> bool:
        if "resume" in kwargs.get("runtime", {}):
            journaling.set()
            return True
        return False

    monkeypatch.setattr(runner.journal, "update", slowed(runner.journal.update, checkpoint, 0.3))

    async def answer(ex: Exchange) -> None:
        ex.send(whole(bundle, 'ETag: "e1"'))
        for at in range(0, len(bundle), 256 * 1024):  # a link the disk keeps up with
            ex.send(bundle[at : at + 256 * 1024])
            await ex.writer.drain()
            await asyncio.sleep(0.02)

    async with scripted_server(cloud_dir, answer) as server:
        desired = DesiredSoftware(version="2.0", url=server.url, job_id="j1")
        job = asyncio.create_task(runner.run_job(desired))
        await until(journaling.is_set)
        job.cancel()  # a new desired state
        await asyncio.wait([job], timeout=10)
    await asyncio.sleep(0.5)  # a write left running would land by now
    record = await asyncio.to_thread(runner.journal.load)
    assert record is not None and record.state.value == "failed", record
    assert record.error is not None and record.error["code"] == "job_cancelled"


async def test_download_started_over_on_another_bundle_forgets_the_old_checkpoint(
    runner: UpdateRunner, cloud_dir: Any, tmp_path: Path
) -> None:
    """Cut after a checkpoint of the first bundle; the resume is answered with another bundle
    from byte 0 (``If-Range`` did not match). Before its first byte reaches the slot the old
    checkpoint must leave the journal: a restart then would resume the old bundle on top of
    the new one's first bytes."""
    first, second = (
        make_bundle(
            cloud_dir, tmp_path / f"{n}.otb", image_size=4 * MiB, seed=n, frame_size=256 * 1024
        ).read_bytes()
        for n in (1, 2)
    )
    hold = asyncio.Event()

    async def answer(ex: Exchange) -> None:
        if ex.index == 0:
            # in pieces: a checkpoint is journaled as chunks arrive, once the read-back thread
            # has synced past a frame end (on a loaded machine that can lag the writes)
            ex.send(whole(first, 'ETag: "e1"'))
            for at in range(0, len(first) - 1, 64 * 1024):
                ex.send(first[at : min(at + 64 * 1024, len(first) - 1)])
                await ex.writer.drain()
                if resume_entry(runner) is not None:
                    break
                await asyncio.sleep(0.01)
            await until(lambda: resume_entry(runner) is not None)
            ex.reset()
        else:
            assert ex.header("If-Range") == '"e1"' and ranged_from(ex) > 0
            ex.send(whole(second, 'ETag: "e2"') + second[:4096])
            await ex.writer.drain()
            await hold.wait()

    async with scripted_server(cloud_dir, answer) as server:
        desired = DesiredSoftware(version="2.0", url=server.url, job_id="j1")
        job = asyncio.create_task(runner.run_job(desired))
        try:
            await until(lambda: len(server.exchanges) == 2)
            await until(lambda: resume_entry(runner) is None, within=5.0)
        finally:
            job.cancel()
            hold.set()
            await asyncio.wait([job], timeout=10)

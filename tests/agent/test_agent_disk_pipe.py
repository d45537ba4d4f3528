"""The disk pipe after a restarted download: what it exposes to the event loop is never the
previous entity's once a reset was asked for (on the pipe, and in a device's job)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from plugins.cloud_env import make_bundle
from test_agent_download_protocol import Exchange, scripted_server, whole

from otad.agent.crashpoints import CrashPoints
from otad.agent.pipeline import DiskPipe
from otad.agent.slots import SlotWriter
from otad.bundle import Keyring, StreamVerifier, read_preamble


def disk_pipe(keyring: Keyring, slot: Path, depth: int = 2) -> DiskPipe:
    """A pipe that verifies into the file ``slot``, as a job's does (no read-back steps)."""

    def writer() -> SlotWriter:
        return SlotWriter(slot, booted=None, read_back_step=0, hash_writes=False)

    return DiskPipe(
        lambda: StreamVerifier(keyring, hash_image=False),
        writer,
        writer(),
        depth,
        CrashPoints(frozenset()),
        lambda manifest: None,
    )


async def test_disk_pipe_is_not_current_until_the_thread_started_over(
    cloud_dir: Any, tmp_path: Path
) -> None:
    first = make_bundle(cloud_dir, tmp_path / "a.otb", image_size=512 * 1024, seed=1).read_bytes()
    second = make_bundle(cloud_dir, tmp_path / "b.otb", image_size=1024 * 1024, seed=2).read_bytes()
    keyring = Keyring.load(cloud_dir.keyring_dir)
    slot = tmp_path / "slot"
    slot.write_bytes(bytes(2 * 1024 * 1024))

    pipe = disk_pipe(keyring, slot)
    try:
        await pipe.put(first[: len(first) // 2])
        for _ in range(200):  # bounded: the thread parses the header within moments
            if pipe.verifier.total_size is not None:
                break
            await asyncio.sleep(0.01)
        assert pipe.current and pipe.verifier.total_size == len(first)
        pipe.reset()
        # the old entity's verifier is still there until the thread reaches the reset: its
        # size must not be taken for the new download's
        assert not pipe.current
        await pipe.put(second)
        for _ in range(200):
            if pipe.current:
                break
            await asyncio.sleep(0.01)
        assert pipe.current and pipe.verifier.total_size in (None, len(second))
        manifest = await pipe.finish()
        assert pipe.verifier.total_size == len(second)
        assert manifest.image_size == 1024 * 1024
    finally:
        await pipe.abort()


async def test_agent_download_restarted_onto_a_larger_bundle_takes_its_size(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    """Cut after the first bundle's header set the download's limit; the resume is answered
    with a larger bundle from byte 0. The pump once applied the old bundle's size (its
    verifier was still there on the same loop step): the new one failed as oversize."""
    small = make_bundle(cloud_dir, tmp_path / "a.otb", image_size=1024 * 1024, seed=1)
    large = make_bundle(cloud_dir, tmp_path / "b.otb", image_size=3 * 1024 * 1024, seed=2)
    first, second = small.read_bytes(), large.read_bytes()

    async def answer(ex: Exchange) -> None:
        if ex.index == 0:  # all but the end, received before the cut: the header was parsed
            ex.send(whole(first, 'ETag: "a"') + first[:-1000])
            await ex.writer.drain()
            await asyncio.sleep(0.5)
            ex.reset()
        else:  # Range ignored: another bundle, whole
            ex.send(whole(second, 'ETag: "b"') + second)

    dev = make_device("dev1")
    async with scripted_server(cloud_dir, answer) as server:
        await dev.start()
        await cloud.set_desired(
            "dev1", {"software": {"version": "2.0", "url": server.url, "jobId": "j1"}}
        )
        await dev.wait_reboot_requested()
    assert len(server.exchanges) == 2
    with large.open("rb") as f:
        manifest = read_preamble(f).manifest()
    assert dev.slot_sha("B", manifest.image_size) == manifest.image_sha256


async def test_disk_pipe_finishes_the_verifier_off_the_event_loop(
    cloud_dir: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    """The verifier's last checks wait for its hashing thread (up to 8 MiB behind on a slow
    CPU): the pipe's thread runs them, the event loop (MQTT keepalive) never waits on them."""
    bundle = make_bundle(cloud_dir, tmp_path / "b.otb", image_size=1024 * 1024).read_bytes()
    keyring = Keyring.load(cloud_dir.keyring_dir)
    slot = tmp_path / "slot"
    slot.write_bytes(bytes(2 * 1024 * 1024))
    finished_on: list[str] = []
    real_finish = StreamVerifier.finish

    def finish(verifier: StreamVerifier) -> Any:
        finished_on.append(threading.current_thread().name)
        return real_finish(verifier)

    monkeypatch.setattr(StreamVerifier, "finish", finish)

    pipe = disk_pipe(keyring, slot)
    try:
        await pipe.put(bundle)
        manifest = await pipe.finish()
    finally:
        await pipe.abort()
    assert manifest.image_size == 1024 * 1024
    assert finished_on == ["otad-slot-writer"]

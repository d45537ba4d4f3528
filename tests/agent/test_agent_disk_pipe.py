"""The disk pipe after a restarted download: what it exposes to the event loop is never the
previous entity's once a reset was asked for."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from plugins.cloud_env import make_bundle

from otad.agent.crashpoints import CrashPoints
from otad.agent.pipeline import DiskPipe
from otad.agent.slots import SlotWriter
from otad.bundle import Keyring, StreamVerifier


async def test_disk_pipe_is_not_current_until_the_thread_started_over(
    cloud_dir: Any, tmp_path: Path
) -> None:
    first = make_bundle(cloud_dir, tmp_path / "a.otb", image_size=512 * 1024, seed=1).read_bytes()
    second = make_bundle(cloud_dir, tmp_path / "b.otb", image_size=1024 * 1024, seed=2).read_bytes()
    keyring = Keyring.load(cloud_dir.keyring_dir)
    slot = tmp_path / "slot"
    slot.write_bytes(bytes(2 * 1024 * 1024))

    def writer() -> SlotWriter:
        return SlotWriter(slot, booted=None, read_back_step=0)

    pipe = DiskPipe(
        lambda: StreamVerifier(keyring, hash_image=False),
        writer,
        writer(),
        2,
        CrashPoints(frozenset()),
        lambda manifest: None,
    )
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

"""Re-verifying the written slot after a restart reads it from the medium once, not twice."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest

from otad.errors import SlotVerifyFailed


def bytes_read_by_this_thread() -> int:
    for line in Path("/proc/thread-self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/thread-self/io")


async def test_agent_reverify_after_restart_reads_the_slot_once(make_device: Any) -> None:
    dev = make_device("dev1")
    agent = await dev.start()
    runner = agent.runner
    assert runner is not None and runner.target == "B"
    size = 3 * 1024 * 1024
    image = random.Random(5).randbytes(size)
    with dev.slot_paths["B"].open("r+b") as f:
        f.write(image)
    sha = hashlib.sha256(image).hexdigest()

    before = bytes_read_by_this_thread()
    runner._check_slot(None, sha, size)  # what a restart in `installing` runs, in this thread
    read = bytes_read_by_this_thread() - before
    assert size <= read < size * 3 // 2

    with pytest.raises(SlotVerifyFailed):
        runner._check_slot(None, hashlib.sha256(b"other").hexdigest(), size)

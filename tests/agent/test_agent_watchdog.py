"""The systemd watchdog: fed while work progresses (slowly or not), withheld when it hangs.

Each test runs the agent with ``WATCHDOG_USEC=1000000`` (a ping every 0.5 s) and settings that
make the stall limit 2 s, and reads the real sd_notify datagrams from a socket."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from plugins.agent_env import offer_bundle, wait_reported
from structlog.testing import capture_logs

from otad.agent.journal import Journal
from otad.agent.machine import Event
from otad.agent.notify import Notifier

# stall limit = max(4 * 0.5 s, 2 * sock_read + health.total_timeout) = 2 s
FAST = {"download": {"sock_read": 0.5, "sock_connect": 0.5}, "health": {"total_timeout": 0.5}}


class Pings:
    """WATCHDOG=1 datagrams as they arrive, with their times."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.times: list[float] = []

    async def collect(self) -> None:
        while True:
            try:
                if self.sock.recv(4096) == b"WATCHDOG=1":
                    self.times.append(time.monotonic())
            except BlockingIOError:
                await asyncio.sleep(0.02)

    def largest_gap(self, until: float) -> float:
        """The longest time without a ping, up to ``until``."""
        times = [*self.times, until]
        return max(b - a for a, b in itertools.pairwise(times))


@pytest.fixture
async def pings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Pings]:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.setblocking(False)
        found = Pings(sock)
        task = asyncio.create_task(found.collect())
        try:
            yield found
        finally:
            task.cancel()


def delayed_preadv(delay: Callable[[], float]) -> Callable[..., int]:
    """os.preadv, ``delay()`` seconds slower off the main thread (a slow or hung medium)."""
    real = os.preadv

    def preadv(*args: Any) -> int:
        if threading.current_thread() is not threading.main_thread():
            time.sleep(delay())
        return real(*args)

    return preadv


async def test_watchdog_is_fed_while_the_download_retries(
    cloud: Any, make_device: Any, pings: Pings, tmp_path: Path
) -> None:
    """A store that accepts and never answers: each try times out and the next one waits its
    backoff. The whole bounded sequence takes longer than the stall limit, but it is work, not
    a hang: the watchdog is fed until the job fails with download_retries_exhausted (before,
    systemd would have killed the agent and the retries started over after each restart)."""
    config = {"download": {**FAST["download"], "retries": 4, "backoff_initial": 0.5,
                           "backoff_max": 1.0}, "health": FAST["health"]}  # fmt: skip
    dev = make_device("dev1", config=config)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with capture_logs() as logs:
            await dev.start(notifier=Notifier(str(tmp_path / "notify")))
            started = time.monotonic()
            entry = {"version": "2.0", "jobId": "j1", "url": f"https://127.0.0.1:{port}/b.otb"}
            await cloud.set_desired("dev1", {"software": entry})
            sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed", within=60)
            ended = time.monotonic()
            await dev.stop()
    finally:
        server.close()
    took = ended - started
    assert sw["error"]["code"] == "download_retries_exhausted", sw
    assert took > 3.0, took  # longer than the stall limit
    assert not [e for e in logs if e["event"] == "watchdog_starved"]
    assert pings.largest_gap(until=ended) < 1.5, pings.times


async def test_watchdog_is_fed_while_a_slow_medium_is_re_read(
    cloud: Any, cloud_dir: Any, make_device: Any, pings: Pings, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The final re-read of the slot on a slow medium (12 reads of 0.3 s here, 3.6 s in all,
    a 2 GiB slot at a few MiB/s on a device) makes progress at each read: the watchdog stays
    fed and the job goes on to the reboot."""
    dev = make_device("dev1", config={**FAST, "download": {**FAST["download"],
                                                           "read_back_step": 1 << 30}})  # fmt: skip
    await dev.start(notifier=Notifier(str(tmp_path / "notify")))
    monkeypatch.setattr(os, "preadv", delayed_preadv(lambda: 0.3))
    with capture_logs() as logs:
        await offer_bundle(cloud, cloud_dir, tmp_path, image_size=3 * 1024 * 1024)
        await dev.wait_reboot_requested(within=60)
        ended = time.monotonic()
        await dev.stop()
    events = [e["event"] for e in logs]
    assert "slot_verified" in events and "watchdog_starved" not in events, events
    assert pings.largest_gap(until=ended) < 1.5, pings.times


async def test_watchdog_is_withheld_while_a_re_read_hangs(
    cloud: Any, cloud_dir: Any, make_device: Any, pings: Pings, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """One read of the slot that does not come back for 4 s (a hung medium): no progress, so
    the watchdog pings stop (systemd restarts the agent, whose recovery verifies again)."""
    dev = make_device("dev1", config={**FAST, "download": {**FAST["download"],
                                                           "read_back_step": 1 << 30}})  # fmt: skip
    await dev.start(notifier=Notifier(str(tmp_path / "notify")))
    hangs = iter([4.0])
    monkeypatch.setattr(os, "preadv", delayed_preadv(lambda: next(hangs, 0.0)))
    with capture_logs() as logs:
        await offer_bundle(cloud, cloud_dir, tmp_path, image_size=1024 * 1024)
        await dev.wait_reboot_requested(within=60)
        ended = time.monotonic()
        await dev.stop()
    assert "watchdog_starved" in [e["event"] for e in logs]
    assert pings.largest_gap(until=ended) > 2.0, pings.times


async def test_watchdog_is_withheld_while_a_recovery_re_read_hangs(
    cloud: Any, make_device: Any, pings: Pings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent restarts in ``installing`` and re-verifies the slot, a recovery step that
    runs outside a job. A read that does not come back stops the pings there too (before,
    only a job's stall counted, so a hung medium at start-up went unnoticed)."""
    dev = make_device("dev1", config={**FAST, "slots": {"booted": "A"}})
    with Journal(dev.state_dir, boot_id=dev.boot_id) as journal:
        record = journal.begin("j1", target_slot="B", version="2.0", bundle_url="https://s/b")
        runtime = {"image_sha256": "0" * 64, "image_size": 1024 * 1024}
        journal.advance(record, Event.PAYLOAD_VERIFIED, runtime=runtime)
    hangs = iter([4.0])
    monkeypatch.setattr(os, "preadv", delayed_preadv(lambda: next(hangs, 0.0)))
    with capture_logs() as logs:
        await dev.start(notifier=Notifier(str(tmp_path / "notify")))
        sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed", within=30)
        ended = time.monotonic()
        await dev.stop()
    assert "watchdog_starved" in [e["event"] for e in logs]
    assert pings.largest_gap(until=ended) > 2.0, pings.times
    assert sw["jobId"] == "j1" and sw["error"]["code"] == "slot_verify_failed", sw

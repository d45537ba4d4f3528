"""The simulator's own machinery: its thread pool and knowing when its agents are connected.
Real broker (TLS + ACL), real agents; no cloud process is needed for these."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from plugins.cloud_env import cloud_with_broker

from otad.cli.fleet import make_fleet
from otad.cloud.broker import BrokerProcess
from otad.cloud.pki import CloudDir
from otad.fleet.simulator import MAX_THREADS, MIN_THREADS, pool_size

IDS = [f"sim-{n}" for n in range(1, 4)]


@pytest.fixture
def cloud_and_broker(tmp_path: Path) -> Iterator[tuple[CloudDir, BrokerProcess]]:
    with cloud_with_broker(tmp_path, IDS) as both:
        yield both


@pytest.mark.parametrize(
    ("devices", "threads"),
    [(1, MIN_THREADS), (64, MIN_THREADS), (100, 13), (2500, MAX_THREADS), (10**6, MAX_THREADS)],
)
def test_simulator_pool_size_grows_with_the_fleet_within_bounds(devices: int, threads: int) -> None:
    assert pool_size(devices) == threads


async def test_simulator_wait_connected_counts_agents_on_the_broker(
    cloud_and_broker: tuple[CloudDir, BrokerProcess], tmp_path: Path
) -> None:
    cloud, broker = cloud_and_broker
    fleet = make_fleet(cloud, IDS, tmp_path / "devices", slot_size=64 * 1024)
    assert await fleet.wait_connected(0.0) == 0  # nothing started: nothing connected
    await fleet.start()
    try:
        assert await fleet.wait_connected(30.0) == len(IDS)
        assert all(d.connected for d in fleet.devices)
        # The agents' blocking steps ran in the fleet's own pool, not asyncio's default one.
        assert any(t.name.startswith("otad-sim") for t in threading.enumerate())
        # Without a broker the agents lose their connections, and the wait ends at its bound.
        await asyncio.to_thread(broker.stop)
        loop = asyncio.get_running_loop()
        # each agent notices on its next read of the closed connection: not necessarily before
        # the broker process is gone, so wait for that (a wait that finds all connected returns)
        noticed_by = loop.time() + 10.0
        while any(d.connected for d in fleet.devices):
            assert loop.time() < noticed_by, "agents still connected 10 s after the broker stopped"
            await asyncio.sleep(0.05)
        started = loop.time()
        assert await fleet.wait_connected(2.0) < len(IDS)
        assert 2.0 <= loop.time() - started < 10.0
    finally:
        await fleet.stop()
    assert not any(d.connected for d in fleet.devices)

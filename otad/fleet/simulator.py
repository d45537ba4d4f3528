"""Many simulated devices in one process: ``otad fleet simulate`` and the demo.

Devices are started a few at a time, and reboot through the same gate (each opens a TLS
connection: a thousand handshakes at once would only make the broker and this process fight over
the CPU, see :mod:`otad.fleet.device`) and run until ``stop``. Which devices fail is decided up
front from a seed, so a run can be repeated.

The agents share the event loop's default thread pool, which each agent uses for its blocking
steps: journal and slot writes, and the MQTT connect (aiomqtt runs paho's blocking connect and
TLS handshake in it). asyncio sizes that pool for one program (CPUs + 4 threads); hundreds of
agents queued behind six threads, each held for a whole handshake round trip with a busy broker,
stall every reboot of the fleet. :meth:`Fleet.start` gives the loop a pool sized for the fleet.
"""

from __future__ import annotations

import asyncio
import gc
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from otad.fleet.device import Identity, SimSettings, SimulatedDevice

__layer__ = "root"

log = structlog.get_logger(__name__)

# Devices between power-on and a held broker connection at once, per fleet (process).
START_PARALLEL = 32
# Threads of the shared pool: one per this many devices, within the bounds below. Threads mostly
# wait (for the broker's TLS answer, for the disk), so more threads than CPUs is the point.
DEVICES_PER_THREAD = 8
MIN_THREADS = 8
MAX_THREADS = 256


def pool_size(devices: int) -> int:
    """Threads of the default executor for ``devices`` agents in one process."""
    return max(MIN_THREADS, min(MAX_THREADS, -(-devices // DEVICES_PER_THREAD)))


@dataclass(frozen=True)
class FaultPlan:
    fail_health: frozenset[str] = frozenset()
    fail_boot: frozenset[str] = frozenset()


def plan_faults(
    device_ids: Sequence[str],
    *,
    fail_health: float = 0.0,
    fail_boot: float = 0.0,
    seed: int = 0,
    spare: int = 0,
) -> FaultPlan:
    """Pick devices to fail (shares of the fleet, rounded); the first ``spare`` never fail.

    Sparing the first devices keeps a canary wave healthy in the demo, so the output shows a
    rollout that moves on, and then shows what a bad device does.
    """
    for name, share in (("fail-health", fail_health), ("fail-boot", fail_boot)):
        if not 0 <= share <= 1:
            raise ValueError(f"{name} must be between 0 and 1, got {share}")
    candidates = list(device_ids[spare:])
    rng = random.Random(seed)
    rng.shuffle(candidates)
    n_health = round(fail_health * len(device_ids))
    n_boot = round(fail_boot * len(device_ids))
    if n_health + n_boot > len(candidates):
        raise ValueError("more failing devices asked for than there are devices")
    health = frozenset(candidates[:n_health])
    boot = frozenset(candidates[n_health : n_health + n_boot])
    return FaultPlan(health, boot)


class Fleet:
    """N simulated devices under ``root`` (one directory each)."""

    def __init__(
        self,
        root: Path,
        device_ids: Sequence[str],
        identity_of: Callable[[str], Identity],
        settings: SimSettings,
        faults: FaultPlan = FaultPlan(),
        *,
        boots_at_once: int = START_PARALLEL,
    ) -> None:
        # Shared by every device of the fleet, at start and at each reboot (see fleet.device).
        self.boot_gate = asyncio.Semaphore(boots_at_once)
        self.devices = [
            SimulatedDevice(
                root / device_id,
                device_id,
                identity_of(device_id),
                settings,
                fail_health=device_id in faults.fail_health,
                fail_boot=device_id in faults.fail_boot,
                boot_gate=self.boot_gate,
            )
            for device_id in device_ids
        ]
        self.faults = faults
        self._pool: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Power every device on (``boots_at_once`` at a time); returns when all are up."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                pool_size(len(self.devices)), thread_name_prefix="otad-sim"
            )
            asyncio.get_running_loop().set_default_executor(self._pool)
        await asyncio.gather(*(d.start() for d in self.devices))
        # Thousands of agents are millions of long-lived objects: every full collection of the
        # cyclic GC would walk them all again (pauses of seconds at 10,000 devices). Exempt
        # what exists now; what the agents make from here on is collected as usual.
        gc.freeze()
        broken = [d.device_id for d in self.devices if d.error is not None]
        log.info("sim_fleet_started", devices=len(self.devices), broken=len(broken))

    async def wait_connected(self, within: float, poll: float = 0.2) -> int:
        """Wait until every device holds a broker connection, at most ``within`` seconds.

        A started agent is ready before it has connected (it recovers its journal first): a
        rollout measured from "started" would also time the connection storm. Returns how many
        devices are connected at the end.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            count = sum(d.connected for d in self.devices)
            if count == len(self.devices) or loop.time() >= deadline:
                return count
            await asyncio.sleep(min(poll, max(0.0, deadline - loop.time())))

    async def stop(self) -> None:
        await asyncio.gather(*(d.stop() for d in self.devices))
        gc.unfreeze()
        log.info("sim_fleet_stopped", devices=len(self.devices))

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

"""One simulated device: a real :class:`otad.agent.daemon.Agent` on file-backed slots.

Everything but the hardware is real: the agent's own MQTT connection with the device's own
certificate, HTTPS downloads, bundle verification, slot writes, the journal. The hardware is
modelled: the slots are small sparse files, the bootloader is the sim bootloader, and a reboot
is a power cycle (stop the agent, :meth:`SimBootloader.power_on`, start a new agent on the slot
that came up, with a new boot id).

Devices of one fleet share a *boot gate*: at most so many of them are between power-on and a
held broker connection at once. They share one CPU, unlike real devices: a thousand TLS
handshakes started together would each take longer than the agent's connect timeout, be
abandoned and started again, and the fleet would never come up (seen at 10,000 devices).

Faults, to show pausing and rollbacks: ``fail_health`` makes the post-reboot health check fail
(the agent marks the new slot bad and goes back); ``fail_boot`` makes the updated slot never boot
(the sim bootloader falls back, as after a kernel panic and a watchdog reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog

from otad.agent.bootloader.sim import SimBootloader
from otad.agent.config import (
    AgentConfig,
    BootloaderConfig,
    BrokerConfig,
    DownloadConfig,
    HealthConfig,
    SlotConfig,
    SlotsConfig,
    StoreConfig,
)
from otad.agent.daemon import Agent
from otad.agent.download import make_ssl_context
from otad.agent.mqtt import broker_tls_context
from otad.agent.update import DeviceState, HealthResult

__layer__ = "root"

log = structlog.get_logger(__name__)

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


@dataclass(frozen=True)
class SimSettings:
    """What every simulated device of a fleet shares."""

    broker_host: str
    broker_port: int
    ca: Path
    keyring: Path
    compatible: str = "otad-sim"
    topic_template: str = "state/{device_id}"
    slot_size: int = 256 * 1024
    version: str = "1.0"
    reboot_delay: float = 0.3  # seconds the device is "off" during a reboot
    durable: bool = False  # fsync the sim bootloader file (off: thousands of devices)
    progress_interval: float = 0.5
    # MQTT keepalive (s). A real device's 30 s makes 10,000 idle simulated devices send 333
    # pings a second, handled by one process and one broker; nothing here needs to notice a
    # dead simulated connection quickly.
    keepalive: int = 120


def _where(task: asyncio.Task[None]) -> str:
    """Where a task is suspended (innermost frames), for a report on an agent that hangs."""
    frames = task.get_stack(limit=None)[-4:]
    return " <- ".join(
        f"{f.f_code.co_name}@{Path(f.f_code.co_filename).name}:{f.f_lineno}"
        for f in reversed(frames)
    )


class SimulatedDevice:
    """``await start()`` boots it; ``await stop()`` powers it off."""

    def __init__(
        self,
        root: Path,
        device_id: str,
        identity: Identity,
        settings: SimSettings,
        *,
        fail_health: bool = False,
        fail_boot: bool = False,
        boot_gate: asyncio.Semaphore | None = None,
    ) -> None:
        self.root = root
        self.boot_gate = boot_gate
        self.device_id = device_id
        self.settings = settings
        self.fail_health = fail_health
        self.fail_boot = fail_boot
        self.reboots = 0
        self._agent: Agent | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._cycling: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self.config = self._prepare(identity)
        # made at the first boot and shared by every later one: a simulated reboot starts a
        # new Agent, and building both contexts cost ~4 ms of CPU per update
        self._broker_tls: ssl.SSLContext | None = None
        self._store_tls: ssl.SSLContext | None = None
        self.sim = SimBootloader(
            root / "sim.json", attempts=3, initial="A", durable=settings.durable
        )

    def _prepare(self, identity: Identity) -> AgentConfig:
        s = self.settings
        self.root.mkdir(parents=True, exist_ok=True)
        slots = {}
        for name in ("A", "B"):
            path = self.root / f"slot-{name.lower()}.img"
            if not path.exists():
                # Sparse: a thousand devices cost no disk until they are written.
                with path.open("wb") as f:
                    f.truncate(s.slot_size)
            slots[name] = SlotConfig(name, path=path)
        state_dir = self.root / "state"
        if not (state_dir / "device.json").exists():
            DeviceState(state_dir / "device.json", {"A": s.version}).save()
        return AgentConfig(
            device_id=self.device_id,
            compatible=s.compatible,
            broker=BrokerConfig(
                host=s.broker_host,
                port=s.broker_port,
                ca=s.ca,
                cert=identity.cert,
                key=identity.key,
                keepalive=s.keepalive,
                topic_template=s.topic_template,
                # Patient: an answer late because the replica is busy is not lost, and a
                # re-sent report is more work for that busy replica.
                report_timeout=15.0,
                reconnect_initial=0.2,
                reconnect_max=5.0,
            ),
            slots=SlotsConfig(a=slots["A"], b=slots["B"]),
            store=StoreConfig(ca=s.ca),
            bootloader=BootloaderConfig(type="sim", sim_state=self.root / "sim.json"),
            health=HealthConfig(check_systemd=False, health_d=self.root / "health.d"),
            # Patient, like a real device: thousands of simulated devices downloading at once
            # from one store on a shared machine see slow answers, not broken ones.
            download=DownloadConfig(
                retries=8, backoff_initial=0.5, backoff_max=15.0, sock_connect=30.0, sock_read=60.0
            ),
            state_dir=state_dir,
            keyring=s.keyring,
            reboot_command=("true",),
            progress_interval=s.progress_interval,
        )

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def connected(self) -> bool:
        """Its agent runs and holds a broker connection (it would see a new desired state)."""
        agent = self._agent
        return (
            self.running
            and agent is not None
            and agent.session is not None
            and agent.session.connected.is_set()
        )

    async def start(self) -> None:
        """Power on: the sim bootloader picks a slot, an agent starts on it.

        Returns once the agent holds its broker connection, failed, or START_TIMEOUT passed
        (then it goes on trying in the background, like a real device would).
        """
        if self.running:
            return
        if self.boot_gate is None:
            await self._boot()
            return
        async with self.boot_gate:
            await self._boot()

    async def _boot(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        booted = await asyncio.to_thread(self.sim.power_on)
        if self._store_tls is None:
            self._broker_tls = broker_tls_context(self.config)
            self._store_tls = make_ssl_context(self.config.store_ca, self.config.store_cert)
        agent = Agent(
            self.config,
            bootloader=self.sim,
            rebooter=self._reboot_requested,
            booted_slot=booted,
            boot_id=uuid.uuid4().hex,
            health=self._health,
            broker_tls=self._broker_tls,
            store_tls=self._store_tls,
        )
        self._agent = agent
        self._stop = asyncio.Event()
        task = asyncio.create_task(agent.run(self._stop), name=f"agent:{self.device_id}")
        self._task = task
        ready = asyncio.create_task(agent.ready.wait())
        done, _ = await asyncio.wait(
            [ready, task], timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if ready not in done:
            ready.cancel()
            if task in done:
                self.error = task.exception()
                log.error("sim_device_failed", device=self.device_id, error=str(self.error))
            else:
                log.error("sim_device_slow_start", device=self.device_id)
            return
        session = agent.session
        if session is None:  # ready is set after the session exists; keep mypy and us honest
            return
        connected = asyncio.create_task(session.connected.wait())
        done, _ = await asyncio.wait(
            [connected, task],
            timeout=max(0.0, deadline - loop.time()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if connected not in done:
            connected.cancel()
            if task not in done:
                log.warning("sim_device_slow_connect", device=self.device_id)

    async def stop(self) -> None:
        """Power off (the agent stops cleanly, like on a shutdown)."""
        if self._cycling is not None and self._cycling is not asyncio.current_task():
            self._cycling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cycling
        await self._halt()

    async def _halt(self) -> None:
        task, stop = self._task, self._stop
        self._task = self._stop = None
        if task is None or stop is None:
            return
        stop.set()
        # asyncio.wait does not cancel on timeout (wait_for would, then wait without bound for
        # the cancellation to finish): a stuck agent must never hang the whole fleet.
        done, _ = await asyncio.wait([task], timeout=STOP_TIMEOUT)
        if not done:
            log.error("sim_device_stop_timeout", device=self.device_id, where=_where(task))
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=STOP_TIMEOUT)
            if not done:
                # Like a power cut that the process never saw: keep going without it.
                log.error("sim_device_abandoned", device=self.device_id)
                self.error = TimeoutError(f"sim: agent of {self.device_id} did not stop")
                return
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # the agent's own failure: keep it for the report
            self.error = exc
            log.error("sim_device_failed", device=self.device_id, error=str(exc))

    def _reboot_requested(self) -> None:
        # Called by the agent's update runner, inside the agent task: the power cycle runs
        # in its own task, so it can stop that agent and wait for it.
        self.reboots += 1
        self._cycling = asyncio.create_task(self._power_cycle(), name=f"reboot:{self.device_id}")

    async def _power_cycle(self) -> None:
        await self._halt()
        await asyncio.sleep(self.settings.reboot_delay)
        if self.fail_boot:
            # The new slot panics on every boot; the bootloader falls back to the old one.
            target = "B" if self.sim.booted() == "A" else "A"
            if self.sim.state().order[0] == target:
                await asyncio.to_thread(self.sim.fail_boot, target)
        log.info("sim_device_power_cycled", device=self.device_id)
        await self.start()

    async def _health(self) -> HealthResult:
        if self.fail_health:
            return HealthResult(False, "simulated: required unit app.service failed")
        return HealthResult(True)

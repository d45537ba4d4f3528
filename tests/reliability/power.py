"""A power-cut model for the agent's own code, and a device whose life is a series of boots.

:class:`Power` stands between the agent's disk-writing modules and :mod:`os`: it counts every
mutating call (write, pwrite, fsync, rename, ...) and at a chosen count "cuts the power": a
write may land partly (a torn write), nothing after the cut reaches the disk, and
:class:`PowerCut` (a BaseException, so no ``except Exception`` in the agent can treat it as an
ordinary failure) unwinds the agent like the end of the process. The sim bootloader's
``power_on`` then plays the firmware, and a new :class:`UpdateRunner` starts with what reached
the files: the same sequence a device goes through after a real power cut, minus the page cache
(data written but not fsync'd survives here; the agent must not depend on either outcome).

:class:`CampaignDevice` runs one device's life: boot, recover, resume or start the job, and on a
reboot or a cut, power on again; after every boot it checks the invariants of the design.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from otad.agent import slots as slots_module
from otad.agent.bootloader import durable as durable_module
from otad.agent.bootloader.sim import FOREVER, SimBootloader
from otad.agent.config import parse
from otad.agent.download import Downloader
from otad.agent.journal import Journal
from otad.agent.machine import State
from otad.agent.update import (
    DesiredSoftware,
    DeviceState,
    HealthResult,
    RebootPending,
    UpdateRunner,
)
from otad.agent.wiring import make_layout
from otad.bundle import Keyring
from otad.errors import BootloaderError

#: The modules through which the agent changes durable state: journal, device state and sim
#: env all go through ``durable``; the slots through ``slots``. (The journal's lock file is
#: not state: the kernel drops the lock with the process.)
DISK_MODULES: tuple[ModuleType, ...] = (durable_module, slots_module)
MUTATING = frozenset(
    {
        "write",
        "pwrite",
        "fsync",
        "fdatasync",
        "replace",
        "rename",
        "ftruncate",
        "truncate",
        "unlink",
        "remove",
    }
)
FINAL = {State.SUCCEEDED, State.FAILED, State.ROLLED_BACK}


class PowerCut(BaseException):
    """The power went off in the middle of the agent's work."""


class Power:
    """Counts the agent's mutating disk operations and cuts the power at an armed count."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.ops = 0
        self.cut_at: int | None = None
        self.off = False
        self.torn = 0
        self._lock = threading.Lock()

    def arm(self, at: int | None) -> None:
        """Cut at the ``at``-th mutating operation of the next boot (None: no cut)."""
        with self._lock:
            self.ops, self.cut_at, self.off = 0, at, False

    def restore(self) -> None:
        with self._lock:
            self.off, self.cut_at = False, None

    def wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def operation(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                if self.off:
                    raise PowerCut(f"{name} after the cut")
                self.ops += 1
                cut = self.cut_at is not None and self.ops == self.cut_at
                if cut:
                    self.off = True
            if not cut:
                return real(*args, **kwargs)
            if name in ("write", "pwrite") and self.rng.random() < 0.5:
                self._tear(name, real, args)
            raise PowerCut(name)

        return operation

    def _tear(self, name: str, real: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Let a random prefix of the buffer reach the disk: a torn write."""
        data = memoryview(args[1])
        keep = self.rng.randrange(0, len(data) + 1) if len(data) else 0
        if keep:
            real(args[0], data[:keep], *args[2:])
            self.torn += 1


class _OsThroughPower:
    """Looks like :mod:`os` to the agent's modules, with the mutating calls wrapped."""

    def __init__(self, power: Power) -> None:
        self._power = power

    def __getattr__(self, name: str) -> Any:
        attr = getattr(os, name)
        return self._power.wrap(name, attr) if name in MUTATING else attr


def install(power: Power, monkeypatch: Any) -> None:
    proxy = _OsThroughPower(power)
    for module in DISK_MODULES:
        monkeypatch.setattr(module, "os", proxy)


class Invariant(AssertionError):
    """A design invariant was broken; the message names the seed to replay it."""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Scenario:
    seed: int
    health_ok: bool = True
    target_boots: bool = True
    #: per boot, the op count at which to cut (None: no cut in that boot)
    cuts: list[int | None] = field(default_factory=list)


@dataclass
class Outcome:
    state: State
    boots: int
    cuts: int
    reported: str
    booted: str
    error: dict[str, str] | None


class _Recorder:
    """Keeps what the agent reports; a broker that always accepts."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def report(self, reported: Mapping[str, Any], *, client_token: str | None = None) -> int:
        self.reports.append(dict(reported["software"]))
        return len(self.reports)

    async def flush(self, within: float) -> bool:
        return True


class CampaignDevice:
    """A device with file slots and the sim bootloader, updated from a local bundle."""

    MAX_BOOTS = 14

    def __init__(
        self,
        root: Path,
        *,
        factory: bytes,
        bundle: Path,
        image_sha256: str,
        image_size: int,
        keyring_dir: Path,
        compatible: str,
        power: Power,
        downloader: Downloader,
    ) -> None:
        self.root = root
        self.power = power
        self.factory_sha = sha(factory)
        self.image_sha = image_sha256
        self.image_size = image_size
        self.slot_paths = {"A": root / "slot-a", "B": root / "slot-b"}
        for path in self.slot_paths.values():
            path.write_bytes(factory)
        state_dir = root / "state"
        state_dir.mkdir()
        self.config = parse(
            {
                "device_id": "campaign",
                "compatible": compatible,
                "state_dir": str(state_dir),
                "keyring": str(keyring_dir),
                "reboot_command": ["true"],
                "broker": {"host": "127.0.0.1"},
                "slots": {s: {"path": str(p)} for s, p in self.slot_paths.items()},
                "bootloader": {"type": "sim", "sim_state": str(root / "sim.json")},
                "health": {"check_systemd": False, "broker": "ignore"},
            }
        )
        self.layout = make_layout(self.config)
        self.keyring = Keyring.load(keyring_dir)
        self.sim = SimBootloader(root / "sim.json", attempts=1, initial="A")
        DeviceState(state_dir / "device.json", {"A": "1.0", "B": "1.0"}).save()
        self.desired = DesiredSoftware(
            version="2.0", url=f"file://{bundle}", job_id="job-2.0", sha256=None, size=None
        )
        self.recorder = _Recorder()
        # one per campaign: building a client TLS context per boot would dominate the run
        self.downloader = downloader

    # --- what a slot holds --------------------------------------------------------------------

    def slot_is_good(self, slot: str) -> bool:
        data = self.slot_paths[slot].read_bytes()
        return sha(data) == self.factory_sha or sha(data[: self.image_size]) == self.image_sha

    def slot_has_image(self, slot: str) -> bool:
        return sha(self.slot_paths[slot].read_bytes()[: self.image_size]) == self.image_sha

    def check_bootable_slots_are_good(self, seed: int, when: str) -> None:
        state = self.sim.state()
        for slot in ("A", "B"):
            if state.slot(slot).bootable and not self.slot_is_good(slot):
                raise Invariant(
                    f"seed {seed}: {when}: slot {slot} is bootable but holds neither the factory "
                    f"image nor the verified update ({state.to_dict()})"
                )

    # --- one life -----------------------------------------------------------------------------

    async def live(self, scenario: Scenario) -> Outcome:
        cuts = 0
        for boot in range(self.MAX_BOOTS):
            if not scenario.target_boots:
                # the new kernel panics: any slot that holds the update fails to come up
                for slot in ("A", "B"):
                    if self.slot_has_image(slot):
                        self.sim.fail_boot(slot, FOREVER)
                    else:
                        self.sim.heal(slot)
            try:
                booted = self.sim.power_on()
            except BootloaderError as exc:
                raise Invariant(f"seed {scenario.seed}: boot {boot}: {exc}") from exc
            if not self.slot_is_good(booted):
                raise Invariant(
                    f"seed {scenario.seed}: boot {boot}: booted slot {booted} is not good"
                )
            before = sha(self.slot_paths[booted].read_bytes())
            self.power.arm(scenario.cuts[boot] if boot < len(scenario.cuts) else None)
            ended = await self._session(booted, scenario)
            cut = self.power.off
            self.power.restore()
            cuts += cut
            if sha(self.slot_paths[booted].read_bytes()) != before:
                raise Invariant(f"seed {scenario.seed}: boot {boot}: the booted slot was written")
            self.check_bootable_slots_are_good(scenario.seed, f"after boot {boot}")
            if ended == "done":
                record = Journal(self.config.state_dir).load()
                assert record is not None
                last = self.recorder.reports[-1]
                return Outcome(
                    record.state, boot + 1, cuts, str(last["state"]), booted, last.get("error")
                )
        raise Invariant(f"seed {scenario.seed}: no convergence after {self.MAX_BOOTS} boots")

    async def _session(self, booted: str, scenario: Scenario) -> str:
        journal = Journal(self.config.state_dir, boot_id=uuid.uuid4().hex)

        async def health() -> HealthResult:
            ok = scenario.health_ok or not self.slot_has_image(booted)
            return HealthResult(ok, "" if ok else "campaign: the new system is unhealthy")

        try:
            await asyncio.to_thread(journal.acquire)
            runner = UpdateRunner(
                self.config,
                bootloader=self.sim,
                journal=journal,
                booted_slot=booted,
                layout=self.layout,
                downloader=self.downloader,
                reporter=self.recorder,
                rebooter=lambda: None,
                health=health,
                keyring=self.keyring,
            )
            action = await runner.recover()
            await runner.resume(action)
            record = runner.record
            if record is None or record.job_id != self.desired.job_id:
                await runner.run_job(self.desired)
                record = runner.record
            if record is None or record.state not in FINAL:
                raise Invariant(
                    f"seed {scenario.seed}: the agent stopped in "
                    f"{record.state if record else None} without a reboot"
                )
            return "done"
        except RebootPending:
            return "reboot"
        except PowerCut:
            return "cut"
        finally:
            with contextlib.suppress(PowerCut, OSError):
                journal.release()

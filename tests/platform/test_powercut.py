"""A power-cut campaign over the platform parts alone: journal + slots + sim bootloader +
the recovery decision, driven by a minimal runner that follows the persist-then-act order.

Each iteration runs one update (health passes or fails, the new slot boots or panics) and cuts
the power after a random number of operations (a bootloader write, a journal store, a slot
chunk), once or twice; after each cut the sim powers on and a new "agent" recovers. It checks
what the exhaustive table test cannot: that the decisions *converge*, and that every power-on
finds a good slot. The agent's own runner gets the same campaign with the network in tests/agent.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from otad.agent.bootloader import other_slot
from otad.agent.bootloader.sim import SimBootloader
from otad.agent.journal import Journal
from otad.agent.machine import Event, JobRecord, State, Step, decide_recovery
from otad.agent.slots import SlotLayout, SlotWriter

SEED = 20261127
ITERATIONS = 200  # per bootloader flavour
IMAGE = bytes(range(256)) * 64  # 16 KiB written in 4 KiB chunks
OLD = b"\x5a" * len(IMAGE)


class PowerCut(Exception):
    pass


class Reboot(Exception):
    pass


@dataclass
class Device:
    root: Path
    health_ok: bool
    cuts: list[int]
    attempts: int = 3
    ops: int = 0
    boots: int = 0
    layout: SlotLayout = field(init=False)
    sim: SimBootloader = field(init=False)

    def __post_init__(self) -> None:
        for name in ("a.img", "b.img"):
            (self.root / name).write_bytes(OLD)
        self.layout = SlotLayout.from_config(
            {"A": str(self.root / "a.img"), "B": str(self.root / "b.img")}
        )
        self.sim = SimBootloader(self.root / "sim.json", attempts=self.attempts, durable=False)

    def op(self) -> None:
        """One side effect; the power may go right after the previous one."""
        if self.cuts and self.ops == self.cuts[0]:
            self.cuts.pop(0)
            raise PowerCut()
        self.ops += 1


def agent_run(dev: Device, booted: str, want_job: bool) -> str:
    """One agent process from start to exit: "done", or raises Reboot / PowerCut."""
    journal = Journal(dev.root / "state", boot_id=f"boot-{dev.boots}")
    with journal:
        record = journal.load()
        action = decide_recovery(
            record, booted, dev.sim.state(), bool(record and journal.rebooted(record))
        )
        if action.mark_bad:
            dev.op()
            dev.sim.mark_bad(action.mark_bad)
        if action.event and record is not None:
            dev.op()
            record = journal.advance(
                record, action.event, **({"error": action.error} if action.error else {})
            )
        if action.confirm:
            dev.op()
            dev.sim.mark_good(action.confirm)
        if record is None or action.step == Step.NONE:
            if not want_job or record is not None:
                return "done"
            target = other_slot(booted)
            dev.op()
            record = journal.begin("j1", target_slot=target, version="2", bundle_url="u")
            return download(dev, journal, record, booted)
        return STEPS[action.step](dev, journal, record, booted)


def download(dev: Device, journal: Journal, rec: JobRecord, booted: str) -> str:
    dev.op()
    dev.sim.mark_bad(rec.target_slot)
    with SlotWriter(dev.layout.path(rec.target_slot), booted=dev.layout.path(booted)) as w:
        for i in range(0, len(IMAGE), 4096):
            dev.op()
            w.write(IMAGE[i : i + 4096])
        w.flush()
    dev.op()
    rec = journal.advance(rec, Event.PAYLOAD_VERIFIED)
    return reverify(dev, journal, rec, booted)


def reverify(dev: Device, journal: Journal, rec: JobRecord, booted: str) -> str:
    with SlotWriter(
        dev.layout.path(rec.target_slot), booted=dev.layout.path(booted), offset=len(IMAGE)
    ) as w:
        w.finish(hashlib.sha256(IMAGE).hexdigest())
    dev.op()
    rec = journal.advance(rec, Event.SLOT_VERIFIED)
    return switch(dev, journal, rec, booted)


def switch(dev: Device, journal: Journal, rec: JobRecord, booted: str) -> str:
    dev.op()
    dev.sim.try_once(rec.target_slot)
    dev.op()
    journal.advance(rec, Event.REBOOT_REQUESTED)
    raise Reboot()


def verify(dev: Device, journal: Journal, rec: JobRecord, booted: str) -> str:
    if dev.health_ok:
        return commit(dev, journal, rec, booted)
    dev.op()
    rec = journal.advance(
        rec, Event.HEALTH_FAILED, error={"code": "health_check_failed", "message": "x"}
    )
    return rollback(dev, journal, rec, booted)


def commit(dev: Device, journal: Journal, rec: JobRecord, booted: str) -> str:
    dev.op()
    dev.sim.mark_good(rec.target_slot)
    if rec.state != State.SUCCEEDED:
        dev.op()
        rec = journal.advance(rec, Event.HEALTH_PASSED)
    return report(dev, journal, rec, booted)


def rollback(dev: Device, journal: Journal, rec: JobRecord, booted: str) -> str:
    dev.op()
    dev.sim.mark_bad(rec.target_slot)
    dev.op()
    journal.advance(rec, Event.REBOOT_REQUESTED)
    raise Reboot()


def report(dev: Device, journal: Journal, rec: JobRecord, booted: str) -> str:
    dev.op()
    journal.update(rec, reported=True)
    return "done"


STEPS = {
    Step.REPORT: report,
    Step.FINISH: report,
    Step.RESUME_DOWNLOAD: download,
    Step.REVERIFY_SLOT: reverify,
    Step.SWITCH_AND_REBOOT: switch,
    Step.VERIFY: verify,
    Step.COMMIT: commit,
    Step.ROLLBACK: rollback,
}


@pytest.fixture
def fast_dir() -> Iterator[Path]:
    # tmpfs: fsync is free there, so the campaign tests the logic, not the disk
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    d = Path(tempfile.mkdtemp(prefix="otad-powercut-", dir=base))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("attempts", [1, 3], ids=["grub_like_one_try", "uboot_like_three"])
def test_powercut_campaign_always_boots_a_good_slot_and_converges(
    fast_dir: Path, attempts: int
) -> None:
    rng = random.Random(SEED + attempts)
    outcomes: dict[str, int] = {}
    codes: dict[str, int] = {}
    cuts_done = 0
    rescues = 0
    for it in range(ITERATIONS):
        root = fast_dir / str(it)
        root.mkdir()
        health_ok = rng.random() < 0.6
        panics = rng.random() < 0.2
        cuts = sorted(rng.sample(range(0, 20), rng.choice([1, 2])))
        dev = Device(root, health_ok, list(cuts), attempts)
        if panics:
            dev.sim.fail_boot("B")
        booted = "A"
        job_started = False
        for _ in range(40):  # bounded: an update takes a handful of runs
            try:
                result = agent_run(dev, booted, want_job=not job_started)
                job_started = True
                if result == "done":
                    break
            except (Reboot, PowerCut) as why:
                job_started = job_started or (root / "state" / "journal.json").exists()
                cuts_done += isinstance(why, PowerCut)
            dev.boots += 1
            booted = dev.sim.power_on()  # raises if no slot can boot: the one forbidden end
            rescues += dev.sim.rescued()
        else:
            pytest.fail(f"iteration {it} did not converge (cuts {cuts})")
        with Journal(root / "state", boot_id="final") as j:
            rec = j.load()
        if rec is None:
            outcomes["no_job"] = outcomes.get("no_job", 0) + 1
            assert booted == "A" and (root / "a.img").read_bytes() == OLD
            continue
        assert rec.final and rec.reported, f"iteration {it}: {rec}"
        outcomes[rec.state.value] = outcomes.get(rec.state.value, 0) + 1
        code = (rec.error or {}).get("code", "none")
        codes[code] = codes.get(code, 0) + 1
        assert (root / "a.img").read_bytes() == OLD, "the booted slot was written"
        if rec.state == State.SUCCEEDED:
            assert booted == "B" and health_ok and not panics
            assert (root / "b.img").read_bytes() == IMAGE
            assert dev.sim.state().slot("B").good
        else:
            # a cut while the target was on its one try also falls back: reported as boot_failed
            code = (rec.error or {}).get("code")
            assert booted == "A" and (not health_ok or panics or code == "boot_failed"), rec.error
            assert not dev.sim.state().slot("B").bootable
    assert cuts_done >= ITERATIONS
    assert outcomes.get("succeeded", 0) > 30 and outcomes.get("rolled_back", 0) > 30, outcomes
    print(
        f"powercut campaign ({attempts} tries): {ITERATIONS} updates, {cuts_done} cuts, "
        f"{rescues} last-resort boots, {outcomes}, {codes}"
    )

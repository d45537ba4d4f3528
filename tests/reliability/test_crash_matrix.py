"""The agent killed at every named crash point, then restarted, over the real cloud side.

Each case runs the agent as a process (``otad agent run``) with one ``testing.crash_points``
entry, so the process ends at once (``os._exit``) at that point, over a real Mosquitto, replica
and store, with file slots and the sim bootloader. Then the device is either simply restarted
(the same boot: a crashed process) or power-cycled (the sim firmware runs: a power cut), and
agents run in this process until the job reaches a final state, power-cycling on every reboot
request. Every case asserts:

* the device converges to the expected final state, and reports it;
* the booted slot is never written (slot A, booted throughout the first boot, keeps its bytes);
* at the crash, a slot the bootloader would boot holds a verified image (never a partial one);
* exactly one final report of the job reaches the shadow: the replica applies it once (every
  ``update/accepted`` for it carries the same shadow version), however often it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from plugins.agent_env import offer_bundle, run_agent_process, to_toml, wait_reported

from otad.agent.journal import Journal

#: the agent process sees the kernel's boot id; read once, it does not change in a test run
REAL_BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
CRASH_EXIT = 99
PROCESS_DEADLINE = 90.0
FINAL = {"succeeded", "failed", "rolled_back"}
IMAGE = 2 * 1024 * 1024


@dataclass(frozen=True)
class Case:
    point: str
    flow: str  # healthy | unhealthy | incompatible
    #: the boot the crash point lies in: 0 first, 1 the new slot's trial, 2 after a rollback
    boot: int
    expected: str
    #: a power cut in the trial boot before the commit uses up the new slot's one try: the
    #: firmware falls back, which is a rollback the device must report as such
    after_power_cut: str | None = None

    def outcome(self, mode: str) -> str:
        return (
            self.after_power_cut if mode == "power_cut" and self.after_power_cut else self.expected
        )

    def id(self, mode: str) -> str:
        name = self.point.replace(":", "_")
        return f"killed_in_{name}__{self.flow}__{mode}__{self.outcome(mode)}"


CASES = [
    # before the reboot: download, write, verify, switch
    Case("journaled:downloading", "healthy", 0, "succeeded"),
    Case("write:25", "healthy", 0, "succeeded"),
    Case("write:50", "healthy", 0, "succeeded"),
    Case("write:75", "healthy", 0, "succeeded"),
    Case("written", "healthy", 0, "succeeded"),
    Case("journaled:installing", "healthy", 0, "succeeded"),
    Case("verified", "healthy", 0, "succeeded"),
    Case("journaled:rebooting", "healthy", 0, "succeeded"),
    Case("switched", "healthy", 0, "succeeded"),
    # in the trial boot of the new slot
    Case("journaled:verifying", "healthy", 1, "succeeded", "rolled_back"),
    Case("committed", "healthy", 1, "succeeded"),
    Case("journaled:succeeded", "healthy", 1, "succeeded"),
    Case("reported:succeeded", "healthy", 1, "succeeded"),
    Case("journaled:verifying", "unhealthy", 1, "rolled_back"),
    Case("journaled:rolling_back", "unhealthy", 1, "rolled_back"),
    Case("rollback_marked", "unhealthy", 1, "rolled_back"),
    # back on the old slot after the rollback
    Case("journaled:rolled_back", "unhealthy", 2, "rolled_back"),
    Case("reported:rolled_back", "unhealthy", 2, "rolled_back"),
    # bad input
    Case("journaled:failed", "incompatible", 0, "failed"),
    Case("reported:failed", "incompatible", 0, "failed"),
]
PARAMS = [
    pytest.param(case, mode, id=case.id(mode))
    for case in CASES
    for mode in ("restart", "power_cut")
]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def final_reports(cloud: Any, device: str, job: str) -> AsyncIterator[list[tuple[str, int]]]:
    """Collect (final state, shadow version) of every accepted report of ``job``."""
    seen: list[tuple[str, int]] = []
    ready = asyncio.Event()

    async def listen() -> None:
        async with cloud.mqtt("fleet", identifier=f"matrix-{os.getpid()}") as client:
            await client.subscribe(f"state/{device}/update/accepted", qos=1)
            ready.set()
            async for message in client.messages:
                doc = json.loads(bytes(message.payload))
                sw = ((doc.get("state") or {}).get("reported") or {}).get("software") or {}
                if sw.get("jobId") == job and sw.get("state") in FINAL:
                    seen.append((sw["state"], doc.get("version")))

    task = asyncio.create_task(listen())
    await asyncio.wait_for(ready.wait(), 20)
    try:
        yield seen
        await asyncio.sleep(0.5)  # let the last acknowledgements arrive
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def crash_config(dev: Any, tmp_path: Path, point: str | None) -> Path:
    doc = {k: v for k, v in dev.document.items() if k != "testing"}
    doc["slots"] = {**doc["slots"], "booted": dev.sim.booted()}
    if point is not None:
        doc["testing"] = {"crash_points": [point], "exit_code": CRASH_EXIT}
    path = tmp_path / f"otad-{point or 'plain'}-{dev.sim.booted()}.toml".replace(":", "_")
    path.write_text(to_toml(doc))
    return path


def bootable_slots_hold_images(dev: Any, images: set[str], size: int) -> None:
    state = dev.sim.state()
    for slot in ("A", "B"):
        if state.slot(slot).bootable:
            whole, prefix = dev.slot_sha(slot), dev.slot_sha(slot, size)
            assert whole in images or prefix in images, (
                f"slot {slot} is bootable but holds a partial or unknown image: {state.to_dict()}"
            )


async def journal_says_reported(dev: Any, job: str, within: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        record = Journal(dev.state_dir).load()
        if record is not None and record.job_id == job and record.final and record.reported:
            return
        assert asyncio.get_running_loop().time() < deadline, f"final report not journaled: {record}"
        await asyncio.sleep(0.05)


async def converge(dev: Any, cloud: Any, job: str, *, rounds: int = 6) -> dict[str, Any]:
    """Run agents in this process, power-cycling on reboot requests, until ``job`` is final."""
    for _ in range(rounds):
        await dev.start()
        waiter = asyncio.create_task(dev.wait_reboot_requested(within=45))
        final = asyncio.create_task(
            wait_reported(
                cloud,
                dev.device_id,
                lambda s: s.get("jobId") == job and s.get("state") in FINAL,
                within=45,
            )
        )
        done, pending = await asyncio.wait({waiter, final}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if final in done and not (waiter in done and waiter.exception() is None):
            reported = final.result()
            # the shadow may show the final state from before the crash: let this run finish
            # (its own final report accepted and journaled) so that a second send would be seen
            await journal_says_reported(dev, job)
            await dev.stop()
            return reported
        await dev.power_cycle()
    raise AssertionError(f"job {job} not final after {rounds} boots")


@pytest.mark.slow
@pytest.mark.parametrize(("case", "mode"), PARAMS)
async def test_crash_matrix(
    case: Case, mode: str, cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    dev = make_device("dev1")
    if case.flow == "unhealthy":
        script = dev.health_d / "10-app"
        script.write_text("#!/bin/sh\necho 'app did not start' >&2\nexit 1\n")
        script.chmod(0o755)
    factory_a = dev.slot_bytes("A")
    job = f"j-{case.point.replace(':', '-')}"
    bundle_options = {"compatible": "another-board"} if case.flow == "incompatible" else {}

    async with final_reports(cloud, "dev1", job) as finals:
        image, _ = await offer_bundle(
            cloud,
            cloud_dir,
            tmp_path,
            job=job,
            image_size=IMAGE,
            publish=False,
            **bundle_options,
        )
        images = {sha256(image), sha256(factory_a), sha256(dev.factory["B"])}
        if case.boot:
            # the boots before the crash point's run in this process, up to their reboots
            await dev.start()
            await offer_bundle(
                cloud, cloud_dir, tmp_path, job=job, image_size=IMAGE, **bundle_options
            )
            for boot in range(case.boot):
                if boot:
                    await dev.start()
                await dev.wait_reboot_requested(within=60)
                await dev.power_cycle()
        dev.boot_id = REAL_BOOT_ID
        process = await run_agent_process(crash_config(dev, tmp_path, case.point))
        try:
            if not case.boot:
                await wait_reported(cloud, "dev1", lambda s: s.get("state") is not None)
                await offer_bundle(
                    cloud, cloud_dir, tmp_path, job=job, image_size=IMAGE, **bundle_options
                )
            code = await asyncio.wait_for(process.wait(), PROCESS_DEADLINE)
        finally:
            await stop(process)
        assert code == CRASH_EXIT, f"the agent did not stop at {case.point} (exit {code})"
        assert dev.slot_bytes("A") == factory_a, "slot A (booted) was written"
        bootable_slots_hold_images(dev, images, len(image))

        if mode == "power_cut":
            await dev.power_cycle()
            bootable_slots_hold_images(dev, images, len(image))
        reported = await converge(dev, cloud, job)

    expected = case.outcome(mode)
    assert reported["state"] == expected, reported
    assert {state for state, _ in finals} == {expected}, f"final reports disagree: {finals}"
    assert len({version for _, version in finals}) == 1, f"applied more than once: {finals}"
    booted = dev.sim.booted()
    if expected == "succeeded":
        assert reported["slot"] == booted == "B" and reported["version"] == "2.0"
        assert dev.slot_sha("B", len(image)) == sha256(image)
    else:
        assert reported["slot"] == booted == "A" and reported["version"] == "1.0"
        assert reported["error"] and reported["error"]["code"]
    assert dev.slot_bytes("A") == factory_a, "slot A was written"
    assert not (dev.sim.state().slot("B").bootable and dev.slot_sha("B", len(image)) not in images)

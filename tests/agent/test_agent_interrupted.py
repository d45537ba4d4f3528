"""A job interrupted by the agent stopping resumes; a supervisor cancelled while it cancels a
job ends; a slot switch that fails ends the job as failed on the old slot."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from plugins.agent_env import fix_keyring, offer_bundle, store_proxy, wait_reported, weak_keyring
from structlog.testing import capture_logs

from otad.agent.bootloader.sim import SimBootloader
from otad.agent.daemon import Agent
from otad.agent.journal import Journal
from otad.agent.machine import State
from otad.errors import BootloaderError, JournalCorrupt


async def test_agent_stop_mid_download_resumes_the_job_on_the_next_start(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    proxy = await store_proxy(cloud).start()
    dev = make_device("dev1")
    try:
        await dev.start()
        image, entry = await offer_bundle(cloud, cloud_dir, tmp_path, proxy=proxy, publish=False)
        proxy.rate = (tmp_path / "j1.otb").stat().st_size / 10
        with capture_logs() as logs:
            await cloud.set_desired("dev1", {"software": entry})
            await wait_reported(cloud, "dev1", lambda s: s["state"] == "downloading")
            await dev.stop()
            record = Journal(dev.state_dir, boot_id=dev.boot_id).load()
            assert record is not None and record.job_id == "j1"
            assert record.state == State.DOWNLOADING and record.error is None
            proxy.rate = None
            await dev.start()
            await dev.wait_reboot_requested()
    finally:
        await proxy.close()
    assert not [e for e in logs if e["event"] in ("job_failed", "desired_rejected")]
    assert [e for e in logs if e["event"] == "job_interrupted"]
    assert dev.slot_sha("B", len(image)) == hashlib.sha256(image).hexdigest()
    assert await dev.reboot() == "B"
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "succeeded")
    assert sw["jobId"] == "j1" and sw["version"] == "2.0" and sw.get("error") is None


async def test_agent_cancel_job_passes_its_own_cancellation_on(
    make_device: Any,
) -> None:
    # The supervisor waits in _cancel_job for a job whose clean-up takes a while (a journal
    # write, a final report); the agent stops meanwhile. The supervisor must end, or stop hangs.
    dev = make_device("dev1")
    agent = Agent(dev.config, bootloader=dev.sim, booted_slot="A")
    release = asyncio.Event()

    async def slow_to_cancel() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(release.wait())

    agent._job = asyncio.create_task(slow_to_cancel())
    await asyncio.sleep(0)
    supervisor = asyncio.create_task(agent._cancel_job("a new desired state"))
    await asyncio.sleep(0.05)
    supervisor.cancel()
    await asyncio.wait([supervisor], timeout=5)
    assert supervisor.done() and supervisor.cancelled()
    release.set()
    await asyncio.wait([agent._job], timeout=5)
    assert agent._job.cancelled()


class SwitchFails(SimBootloader):
    """The sim, with an env write that fails half-way through try_once (the first copy landed,
    the second did not): the target may already be first in the boot order."""

    def try_once(self, slot: str) -> None:
        super().try_once(slot)
        raise BootloaderError("sim: the second env copy could not be written (injected)")


async def test_agent_switch_error_fails_the_job_and_keeps_the_old_slot(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    dev = make_device("dev1")
    await dev.start(bootloader=SwitchFails(dev.root / "sim.json", attempts=3))
    with capture_logs() as logs:
        await offer_bundle(cloud, cloud_dir, tmp_path)
        sw = await wait_reported(
            cloud, "dev1", lambda s: s["state"] == "failed" and s.get("jobId") == "j1"
        )
    assert sw["error"]["code"] == "bootloader_error"
    assert not [e for e in logs if e["event"] == "job_not_started"]
    assert dev.agent is not None and dev.agent.runner is not None
    record = dev.agent.runner.record
    assert record is not None and record.state == State.FAILED
    assert record.error is not None and record.error["code"] == "bootloader_error"
    assert dev.reboot_requests == 0
    assert dev.sim.state().slot("B").bad  # never booted half-switched
    assert await dev.reboot() == "A"
    assert dev.agent.runner is not None and dev.agent.runner.record is not None
    assert dev.agent.runner.record.state == State.FAILED


async def test_agent_download_resumed_with_an_unusable_keyring_fails_and_releases_the_slot(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    # Stopped mid-download, started again with a keyring that no longer loads: the resumed
    # job fails with keyring_invalid and leaves the target closed (on a block device a slot
    # left open, O_EXCL, would refuse every later job) and not bootable.
    proxy = await store_proxy(cloud).start()
    dev = make_device("dev1")
    good_config = dev.config
    keyring, weak = weak_keyring(tmp_path)
    try:
        await dev.start()
        _, entry = await offer_bundle(cloud, cloud_dir, tmp_path, proxy=proxy, publish=False)
        proxy.rate = (tmp_path / "j1.otb").stat().st_size / 10
        await cloud.set_desired("dev1", {"software": entry})
        await wait_reported(cloud, "dev1", lambda s: s["state"] == "downloading")
        await dev.stop()
        proxy.rate = None
        dev.config = dataclasses.replace(good_config, keyring=keyring)
        await dev.start()
        sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed")
    finally:
        await proxy.close()
    assert sw["jobId"] == "j1" and sw["error"]["code"] == "keyring_invalid", sw
    assert str(weak) in sw["error"]["message"]
    slot_b = str(dev.slot_paths["B"])
    fds = await asyncio.to_thread(os.listdir, "/proc/self/fd")
    assert not [fd for fd in fds if _link(f"/proc/self/fd/{fd}") == slot_b]
    boot = dev.sim.state()
    assert not boot.slot("B").bootable and boot.next_boot() == "A"
    assert dev.slot_bytes("A") == dev.factory["A"] and dev.reboot_requests == 0

    # the keyring fixed: the next job installs, no restart needed
    fix_keyring(keyring, cloud_dir.keyring_dir)
    image, _ = await offer_bundle(cloud, cloud_dir, tmp_path, job="j2", seed=7)
    await dev.wait_reboot_requested()
    assert dev.slot_sha("B", len(image)) == hashlib.sha256(image).hexdigest()


def _link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


@pytest.mark.parametrize(
    "content",
    [b'{"schema": 1, "job_id": "j0", "sta', b"\0" * 512, b'{"schema": 99}'],
    ids=["torn", "zeros", "newer_schema"],
)
async def test_agent_with_an_unreadable_journal_on_a_committed_slot_sets_it_aside(
    content: bytes, cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    """A torn journal, zeros after a power cut, or a newer agent's journal after a rollback:
    the agent used to stop at every start (and so never update again). On a committed slot it
    keeps the file aside, makes the other slot bad, reports the problem and takes new jobs."""
    dev = make_device("dev1")
    (dev.state_dir / "journal.json").write_bytes(content)
    await dev.start()
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "idle")
    assert sw["error"]["code"] == "journal_corrupt" and sw["slot"] == "A", sw
    aside = list(dev.state_dir.glob("journal.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    boot = dev.sim.state()
    assert boot.slot("B").bad and boot.next_boot() == "A"
    await offer_bundle(cloud, cloud_dir, tmp_path, image_size=256 * 1024)
    await dev.wait_reboot_requested()
    assert await dev.reboot() == "B"
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "succeeded")
    assert sw["version"] == "2.0" and sw.get("error") is None


async def test_agent_with_an_unreadable_journal_on_a_slot_on_trial_rolls_back(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    """Slot B boots on trial after job j1 and the journal that would say whether it passed
    its health check is unreadable: B is never confirmed. The agent used to stop at every
    start (a crash loop, nothing on the shadow) until someone rebooted the device; now it
    marks B bad, reboots into the good slot A and reports j1 ``rolled_back`` with the
    reason, once, and does not run j1 again."""
    dev = make_device("dev1")
    await dev.start()
    _, entry = await offer_bundle(cloud, cloud_dir, tmp_path, image_size=256 * 1024)
    await dev.wait_reboot_requested()
    assert await dev.power_cycle() == "B"
    assert not dev.sim.state().slot("B").good
    (dev.state_dir / "journal.json").write_bytes(b"\0" * 512)

    await dev.start()
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "verifying")
    assert sw["jobId"] == "j1" and sw["error"]["code"] == "journal_corrupt", sw
    await dev.wait_reboot_requested()
    boot = dev.sim.state()
    assert boot.slot("B").bad and boot.slot("A").good and boot.next_boot() == "A"
    aside = list(dev.state_dir.glob("journal.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b"\0" * 512

    assert await dev.reboot() == "A"
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "rolled_back")
    assert sw["jobId"] == "j1" and sw["slot"] == "A" and sw["version"] == "1.0", sw
    assert sw["error"]["code"] == "journal_corrupt", sw
    assert "slot B ran on trial" in sw["error"]["message"], sw
    assert dev.slot_bytes("A") == dev.factory["A"]
    # the desired state still names j1: it is not installed again
    await cloud.set_desired("dev1", {"software": entry})
    await asyncio.sleep(1.0)
    assert dev.reboot_requests == 2
    record = Journal(dev.state_dir, boot_id="x").load()
    assert record is not None and record.state == State.ROLLED_BACK and record.reported


async def test_agent_with_an_unreadable_journal_on_trial_and_no_job_known_still_rolls_back(
    cloud: Any, make_device: Any
) -> None:
    """The same, on a device.json that names no job (an older agent wrote it): the rollback
    still happens, reported under the jobId "unknown"."""
    dev = make_device("dev1")
    dev.sim.try_once("B")
    assert dev.sim.power_on() == "B"
    device_json = dev.state_dir / "device.json"
    doc = json.loads(device_json.read_text())
    doc.pop("jobs", None)
    device_json.write_text(json.dumps(doc))
    (dev.state_dir / "journal.json").write_bytes(b"\0" * 512)

    await dev.start()
    await dev.wait_reboot_requested()
    assert dev.sim.state().slot("B").bad
    assert await dev.reboot() == "A"
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "rolled_back")
    assert sw["jobId"] == "unknown" and sw["error"]["code"] == "journal_corrupt", sw


async def test_agent_with_an_unreadable_journal_and_no_good_slot_refuses_to_start(
    cloud: Any, make_device: Any
) -> None:
    """The journal is unreadable, B runs on trial and A is not good either: there is no
    slot to go back to and nothing may confirm B. The agent stops and leaves journal and
    bootloader as they are."""
    dev = make_device("dev1")
    dev.sim.try_once("B")
    assert dev.sim.power_on() == "B"
    dev.sim.mark_bad("A")
    before = dev.sim.state()
    assert not before.slot("B").good and not before.slot("A").good
    (dev.state_dir / "journal.json").write_bytes(b"\0" * 512)
    agent = Agent(
        dev.config, bootloader=dev.sim, rebooter=lambda: None, booted_slot="B", boot_id="b2"
    )
    with pytest.raises(JournalCorrupt):
        await asyncio.wait_for(agent.run(asyncio.Event()), 30)
    assert dev.sim.state() == before
    assert (dev.state_dir / "journal.json").read_bytes() == b"\0" * 512
    assert not list(dev.state_dir.glob("journal.json.corrupt-*"))

"""End to end: real broker (TLS + ACL), the real replica and store, file slots, sim bootloader.

Reboots are played by stopping the agent, running the sim's power-on, and starting a new agent
with the slot the sim booted (``SimDevice.reboot``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

from plugins.agent_env import offer_bundle, wait_reported


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_agent_update_succeeds(cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path):
    dev = make_device("dev1")
    await dev.start()
    await wait_reported(cloud, "dev1", lambda s: s["state"] == "idle" and s["version"] == "1.0")
    image, _ = await offer_bundle(cloud, cloud_dir, tmp_path, security_version=2)

    await dev.wait_reboot_requested()
    await wait_reported(
        cloud, "dev1", lambda s: s["state"] == "rebooting" and s.get("jobId") == "j1"
    )
    boot = dev.sim.state()
    assert boot.slot("B").tries_left == 1 and not boot.slot("B").good
    assert dev.slot_sha("B", len(image)) == sha256(image)
    assert dev.slot_bytes("A") == dev.factory["A"]  # the booted slot was never written

    assert await dev.reboot() == "B"
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "succeeded")
    assert sw["version"] == "2.0" and sw["slot"] == "B" and sw["jobId"] == "j1"
    assert sw.get("error") is None and sw["progress"] == 100 and sw["securityVersion"] == 2
    boot = dev.sim.state()
    assert boot.slot("B").good and boot.next_boot() == "B"
    assert dev.slot_bytes("A") == dev.factory["A"]

    # A restart later changes nothing and reports the same truth.
    await dev.reboot()
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "succeeded")
    assert sw["version"] == "2.0" and dev.agent is not None and dev.agent.jobs_started == 0


async def test_agent_health_failure_rolls_back(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
):
    dev = make_device("dev1")
    await dev.start()
    await offer_bundle(cloud, cloud_dir, tmp_path)
    await dev.wait_reboot_requested()
    script = dev.health_d / "10-app"
    script.write_text("#!/bin/sh\necho 'app did not start' >&2\nexit 3\n")
    script.chmod(0o755)

    assert await dev.reboot() == "B"
    await dev.wait_reboot_requested()  # the rollback reboot
    assert dev.sim.state().slot("B").bad
    assert await dev.reboot() == "A"
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "rolled_back")
    assert sw["version"] == "1.0" and sw["slot"] == "A" and sw["jobId"] == "j1"
    assert sw["error"]["code"] == "health_check_failed"
    assert dev.slot_bytes("A") == dev.factory["A"]
    assert dev.sim.state().next_boot() == "A"

    # The desired state still names j1: it is not installed again.
    requests = dev.reboot_requests
    await dev.reboot()
    await wait_reported(cloud, "dev1", lambda s: s["state"] == "rolled_back")
    assert dev.agent is not None and dev.agent.jobs_started == 0
    assert dev.reboot_requests == requests


async def test_agent_new_slot_never_boots_reports_boot_failed(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
):
    dev = make_device("dev1")
    await dev.start()
    await offer_bundle(cloud, cloud_dir, tmp_path)
    await dev.wait_reboot_requested()
    dev.sim.fail_boot("B")  # a kernel panic, every time

    assert await dev.reboot() == "A"  # the bootloader fell back by itself
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "rolled_back")
    assert sw["error"]["code"] == "boot_failed" and sw["version"] == "1.0" and sw["slot"] == "A"
    assert not dev.sim.state().slot("B").bootable
    assert dev.slot_bytes("A") == dev.factory["A"]


async def test_agent_desired_version_already_running_is_a_no_op(cloud: Any, make_device: Any):
    dev = make_device("dev1")
    await dev.start()
    entry = {"version": "1.0", "url": "https://127.0.0.1:1/never", "jobId": "j-same"}
    await cloud.set_desired("dev1", {"software": entry})
    sw = await wait_reported(cloud, "dev1", lambda s: s.get("jobId") == "j-same")
    assert sw["state"] == "succeeded" and sw["version"] == "1.0"
    assert dev.agent is not None and dev.agent.jobs_started == 0
    assert dev.sim.state().slot("B").good  # untouched


async def test_agent_trial_boot_reports_the_version_it_runs(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
):
    """While the new slot is on trial (its health check runs) the device runs the job's
    version; device.json names a slot's version only once it is committed, so it still says
    what slot B held before."""
    dev = make_device("dev1")
    (dev.state_dir / "device.json").write_text(
        json.dumps({"versions": {"A": "1.0", "B": "0.9"}, "securityVersion": 0})
    )
    await dev.start()
    script = dev.health_d / "10-slow"
    script.write_text("#!/bin/sh\nsleep 4\nexit 0\n")
    script.chmod(0o755)
    await offer_bundle(cloud, cloud_dir, tmp_path, image_size=256 * 1024)
    await dev.wait_reboot_requested()
    assert await dev.reboot() == "B"
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "verifying", within=10)
    assert (sw["slot"], sw["version"]) == ("B", "2.0")
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "succeeded", within=20)
    assert (sw["slot"], sw["version"]) == ("B", "2.0")


async def test_agent_older_job_named_again_after_another_job_is_not_run_again(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
):
    """j1 rolled back, j2 ran after it; the desired state then names j1 again (an operator
    restores the previous entry). A jobId runs at most once: j1 is not installed again."""
    dev = make_device("dev1")
    await dev.start()
    script = dev.health_d / "10-app"
    script.write_text("#!/bin/sh\nexit 3\n")  # 2.0 is unhealthy
    script.chmod(0o755)
    _, j1 = await offer_bundle(cloud, cloud_dir, tmp_path, image_size=256 * 1024)
    await dev.wait_reboot_requested()
    assert await dev.reboot() == "B"  # the health check fails: back to A
    await dev.wait_reboot_requested()
    assert await dev.reboot() == "A"
    await wait_reported(cloud, "dev1", lambda s: s["state"] == "rolled_back")
    missing = j1["url"].replace("/v1/artifacts/", "/v1/artifacts/0")
    j2 = {"version": "3.0", "jobId": "j2", "url": missing}
    await cloud.set_desired("dev1", {"software": j2})
    await wait_reported(cloud, "dev1", lambda s: s["jobId"] == "j2" and s["state"] == "failed")
    agent = dev.agent
    assert agent is not None
    started = agent.jobs_started
    await cloud.set_desired("dev1", {"software": j1})
    sw = await wait_reported(cloud, "dev1", lambda s: s["jobId"] == "j2", within=5)
    await asyncio.sleep(1.0)  # the agent had the document (wait_reported asks for it)
    assert agent.jobs_started == started and dev.reboot_requests == 2
    assert sw["state"] == "failed" and dev.sim.state().next_boot() == "A"

"""A reboot that does not happen: the command fails, or the system stays up after it.

These devices run the real command rebooter (``reboot_command``) instead of the test double.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from plugins.agent_env import offer_bundle, wait_reported

from otad.agent.journal import Journal


@pytest.mark.parametrize(
    ("command", "reboot_timeout"),
    [(["false"], 600.0), (["/nonexistent/reboot"], 600.0), (["true"], 1.0)],
    ids=["command_fails", "command_missing", "system_stays_up"],
)
async def test_agent_reboot_into_target_not_happening_fails_the_job_on_the_old_slot(
    command: list[str],
    reboot_timeout: float,
    cloud: Any,
    cloud_dir: Any,
    make_device: Any,
    tmp_path: Path,
) -> None:
    dev = make_device("dev1", config={"reboot_command": command, "reboot_timeout": reboot_timeout})
    agent = await dev.start(rebooter=None)
    await offer_bundle(cloud, cloud_dir, tmp_path, image_size=256 * 1024)
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed", within=40)
    assert sw["jobId"] == "j1" and sw["error"]["code"] == "reboot_failed"
    assert sw["version"] == "1.0" and sw["slot"] == "A"
    boot = dev.sim.state()
    assert not boot.slot("B").bootable and boot.next_boot() == "A"
    assert dev.slot_bytes("A") == dev.factory["A"]
    assert not agent.rebooting.is_set()
    await dev.stop()
    record = Journal(dev.state_dir).load()
    assert record is not None and record.final and record.error["code"] == "reboot_failed"

    # the job is over: the same desired state does not start it again after a restart
    agent = await dev.start()
    await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed")
    assert agent.jobs_started == 0 and dev.reboot_requests == 0


async def test_agent_rollback_reboot_failing_is_reported_and_retried_after_a_restart(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    dev = make_device("dev1", config={"reboot_command": ["false"]})
    await dev.start()
    await offer_bundle(cloud, cloud_dir, tmp_path, image_size=256 * 1024)
    await dev.wait_reboot_requested()
    script = dev.health_d / "10-app"
    script.write_text("#!/bin/sh\nexit 3\n")
    script.chmod(0o755)

    # on the target, unhealthy, and the rollback's reboot command fails
    await dev.power_cycle()
    agent = await dev.start(rebooter=None)
    sw = await wait_reported(
        cloud, "dev1", lambda s: (s.get("error") or {}).get("code") == "reboot_failed"
    )
    assert sw["state"] == "verifying" and sw["slot"] == "B" and sw["jobId"] == "j1"
    assert agent.runner is not None and agent.runner.stuck is not None
    assert dev.sim.state().slot("B").bad  # the next boot, whenever it comes, is the old slot

    # systemd restarts the agent (the watchdog is withheld); recovery reboots again
    await dev.stop()
    await dev.start()
    await dev.wait_reboot_requested()
    assert await dev.reboot() == "A"
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "rolled_back")
    assert sw["error"]["code"] == "health_check_failed" and sw["slot"] == "A"
    assert dev.slot_bytes("A") == dev.factory["A"]

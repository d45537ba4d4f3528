"""Job identity: a duplicate delta runs one job; a new desired state cancels the running job."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from plugins.agent_env import offer_bundle, store_proxy, wait_reported
from structlog.testing import capture_logs


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_agent_duplicate_delta_runs_one_job(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    proxy = await store_proxy(cloud).start()
    dev = make_device("dev1")
    try:
        await dev.start()
        image, entry = await offer_bundle(cloud, cloud_dir, tmp_path, proxy=proxy, publish=False)
        proxy.rate = (tmp_path / "j1.otb").stat().st_size / 3
        await cloud.set_desired("dev1", {"software": entry})
        await wait_reported(cloud, "dev1", lambda s: s["state"] == "downloading")
        # the same entry again, and other desired keys changing: more deltas, same job
        await cloud.set_desired("dev1", {"software": entry})
        await cloud.set_desired("dev1", {"software": entry, "note": "again"})
        proxy.rate = None
        await dev.wait_reboot_requested()
    finally:
        await proxy.close()
    assert dev.agent is not None and dev.agent.jobs_started == 1
    assert proxy.connections == 1
    assert dev.slot_sha("B", len(image)) == sha256(image)


async def test_agent_new_desired_mid_download_cancels_and_runs_the_new_job(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    proxy = await store_proxy(cloud).start()
    dev = make_device("dev1")
    try:
        await dev.start()
        with capture_logs() as logs:
            _, first = await offer_bundle(cloud, cloud_dir, tmp_path, proxy=proxy, publish=False)
            proxy.rate = (tmp_path / "j1.otb").stat().st_size / 10
            await cloud.set_desired("dev1", {"software": first})
            await wait_reported(cloud, "dev1", lambda s: s["state"] == "downloading")
            image, _ = await offer_bundle(
                cloud, cloud_dir, tmp_path, version="3.0", job="j2", seed=9
            )
            await dev.wait_reboot_requested()
    finally:
        await proxy.close()
    cancelled = [e for e in logs if e["event"] == "job_failed" and e.get("job_id") == "j1"]
    assert cancelled and cancelled[0]["error"] == "job_cancelled"
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "rebooting")
    assert sw["jobId"] == "j2"
    assert dev.slot_sha("B", len(image)) == sha256(image)
    assert dev.slot_bytes("A") == dev.factory["A"]
    assert dev.agent is not None and dev.agent.jobs_started == 2

    assert await dev.reboot() == "B"
    assert dev.agent.runner is not None and dev.agent.runner.record is not None
    assert dev.agent.runner.record.job_id == "j2"


async def test_agent_job_with_a_temporary_credential(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    dev = make_device("dev1", config={"store": {"url": cloud.store_url}})
    await dev.start()
    image, entry = await offer_bundle(cloud, cloud_dir, tmp_path, publish=False)
    artifact = entry["url"].split("/v1/artifacts/")[1].split("?")[0]
    software = {
        "version": "2.0",
        "jobId": "jt",
        "url": f"/v1/artifacts/{artifact}",  # relative to store.url, no pre-signed query
        "auth": "token",
    }
    await cloud.set_desired("dev1", {"software": software})
    await dev.wait_reboot_requested()
    assert dev.slot_sha("B", len(image)) == sha256(image)

"""Network faults end to end: cuts, expired URLs, a broker that is down, an agent killed mid-way."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from plugins.agent_env import (
    FaultProxy,
    offer_bundle,
    run_agent_process,
    stop_agent_process,
    store_proxy,
    wait_for_path,
    wait_reported,
)
from structlog.testing import capture_logs

from otad.agent.journal import Journal


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_agent_download_cut_at_half_resumes_without_refetching(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    proxy = await store_proxy(cloud).start()
    dev = make_device("dev1")
    try:
        await dev.start()
        bundle_size = 0
        with capture_logs() as logs:
            image, entry = await offer_bundle(
                cloud, cloud_dir, tmp_path, proxy=proxy, publish=False
            )
            bundle_size = (tmp_path / "j1.otb").stat().st_size
            proxy.cut_after(bundle_size // 2)
            await cloud.set_desired("dev1", {"software": entry})
            await dev.wait_reboot_requested()
    finally:
        await proxy.close()
    assert proxy.cuts == 1 and proxy.connections == 2
    assert proxy.down_bytes < bundle_size * 1.05 + 64 * 1024  # not a byte twice (+ TLS)
    resumed = [e for e in logs if e["event"] == "download_resumed"]
    assert len(resumed) == 1 and 0 < resumed[0]["offset"] < bundle_size
    query = entry["url"].split("?", 1)[1]
    assert query and not any(query in str(e) for e in logs)  # the credential is never logged
    assert dev.slot_sha("B", len(image)) == sha256(image)
    assert dev.slot_bytes("A") == dev.factory["A"]


async def test_agent_expired_url_is_refreshed_and_resumed(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    proxy = await store_proxy(cloud).start()
    dev = make_device("dev1")
    try:
        await dev.start()
        image, entry = await offer_bundle(
            cloud, cloud_dir, tmp_path, proxy=proxy, publish=False, expires_in=1.5
        )
        bundle_size = (tmp_path / "j1.otb").stat().st_size
        proxy.rate = bundle_size / 6  # slow enough that the URL expires on the way
        proxy.cut_after(bundle_size // 2)  # the resume after the cut meets the expired URL
        await cloud.set_desired("dev1", {"software": entry})
        sw = await wait_reported(
            cloud, "dev1", lambda s: (s.get("error") or {}).get("code") == "download_url_expired"
        )
        assert sw["state"] == "downloading" and sw["jobId"] == "j1"
        proxy.rate = None
        artifact = entry["url"].split("/v1/artifacts/")[1].split("?")[0]
        fresh = {**entry, "url": proxy.url(cloud.presign(artifact, "dev1"))}
        await cloud.set_desired("dev1", {"software": fresh})
        await dev.wait_reboot_requested()
    finally:
        await proxy.close()
    assert proxy.down_bytes < bundle_size * 1.05 + 64 * 1024
    assert dev.slot_sha("B", len(image)) == sha256(image)
    assert dev.agent is not None and dev.agent.jobs_started == 1


async def test_agent_expired_url_never_refreshed_fails_the_job(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    # nobody hands out a fresh URL: the job ends, bounded by download.url_refresh_timeout
    dev = make_device("dev1", config={"download": {"url_refresh_timeout": 2.0}})
    await dev.start()
    _image, entry = await offer_bundle(
        cloud, cloud_dir, tmp_path, publish=False, expires_in=1, image_size=256 * 1024
    )
    await asyncio.sleep(1.5)  # the URL has expired before the device sees it
    await cloud.set_desired("dev1", {"software": entry})
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed", within=30)
    await dev.stop()
    assert sw["jobId"] == "j1" and sw["error"]["code"] == "download_url_expired"
    boot = dev.sim.state()
    assert not boot.slot("B").bootable and boot.next_boot() == "A"
    assert dev.slot_bytes("A") == dev.factory["A"]
    assert dev.reboot_requests == 0


async def test_agent_broker_down_at_start_reconnects(
    cloud: Any, broker: Any, make_device: Any
) -> None:
    from plugins.cloud_env import free_port

    # The device reaches the broker through a proxy that is not there yet: "broker down".
    port = free_port()
    dev = make_device("dev1", config={"broker": {"port": port}})
    agent = await dev.start()  # recovery needs no broker: the agent becomes ready
    await asyncio.sleep(1.5)
    assert agent.session is not None and not agent.session.connected.is_set()
    proxy = await FaultProxy(broker.host, broker.port).start(port)
    try:
        sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "idle", within=30)
    finally:
        await dev.stop()
        await proxy.close()
    assert sw["version"] == "1.0" and agent.session.connects == 1


async def test_agent_killed_mid_download_finishes_the_job_after_restart(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "rebooted"
    dev = make_device(
        "dev1", config={"slots": {"booted": "A"}, "reboot_command": ["touch", str(marker)]}
    )
    proxy = await store_proxy(cloud).start()
    process = await run_agent_process(dev.config_path)
    try:
        await wait_reported(cloud, "dev1", lambda s: s["state"] == "idle")
        image, entry = await offer_bundle(cloud, cloud_dir, tmp_path, proxy=proxy, publish=False)
        proxy.rate = (tmp_path / "j1.otb").stat().st_size / 8
        await cloud.set_desired("dev1", {"software": entry})
        await wait_reported(
            cloud, "dev1", lambda s: s["state"] == "downloading" and s.get("progress", 0) >= 10
        )
        process.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL
        record = Journal(dev.state_dir, boot_id="x").load()
        assert record is not None and record.state.value == "downloading"
        assert not dev.sim.state().slot("B").bootable

        proxy.rate = None
        process = await run_agent_process(dev.config_path)
        await wait_reported(cloud, "dev1", lambda s: s["state"] == "rebooting", within=60)
        assert await wait_for_path(marker)
    finally:
        await stop_agent_process(process)
        await proxy.close()
    assert process.returncode == 0  # SIGTERM: a graceful stop
    assert dev.slot_sha("B", len(image)) == sha256(image)
    assert dev.slot_bytes("A") == dev.factory["A"]
    boot = dev.sim.state()
    assert boot.slot("B").tries_left == 1 and boot.next_boot() == "B"
    state = json.loads((dev.state_dir / "journal.json").read_text())
    assert state["state"] == "rebooting" and state["job_id"] == "j1"


MiB = 1 << 20


async def _kill_after_a_checkpoint(
    cloud: Any,
    cloud_dir: Any,
    make_device: Any,
    tmp_path: Path,
) -> tuple[Any, FaultProxy, bytes, int, dict[str, Any], Path]:
    """An agent process killed mid-download once its journal holds a checkpoint past half
    the image; (device, proxy, image, bundle size, checkpoint, reboot marker)."""
    marker = tmp_path / "rebooted"
    size = 12 * MiB
    dev = make_device(
        "dev1",
        config={
            "slots": {"booted": "A"},
            "reboot_command": ["touch", str(marker)],
            "download": {"read_back_step": MiB},
        },
        slot_size=16 * MiB,
    )
    proxy = await store_proxy(cloud).start()
    process = await run_agent_process(dev.config_path)
    try:
        await wait_reported(cloud, "dev1", lambda s: s["state"] == "idle")
        image, entry = await offer_bundle(
            cloud,
            cloud_dir,
            tmp_path,
            proxy=proxy,
            publish=False,
            image_size=size,
            frame_size=256 << 10,
        )
        bundle_size = (tmp_path / "j1.otb").stat().st_size
        proxy.rate = bundle_size / 8
        await cloud.set_desired("dev1", {"software": entry})
        journal = Journal(dev.state_dir, boot_id="x")
        checkpoint: dict[str, Any] = {}
        for _ in range(300):  # bounded: 30 s
            record = journal.load()
            checkpoint = (record.runtime.get("resume") or {}) if record is not None else {}
            if checkpoint.get("image", 0) >= size // 2:
                break
            await asyncio.sleep(0.1)
        assert checkpoint.get("image", 0) >= size // 2, checkpoint
        process.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL
    except BaseException:
        await stop_agent_process(process)
        await proxy.close()
        raise
    record = journal.load()
    assert record is not None and record.state.value == "downloading"
    assert not dev.sim.state().slot("B").bootable
    return dev, proxy, image, bundle_size, record.runtime["resume"], marker


async def _finish_after_restart(dev: Any, cloud: Any, proxy: FaultProxy, marker: Path) -> int:
    """Restart the agent unthrottled until it reboots; bytes the store sent meanwhile."""
    before = proxy.down_bytes
    proxy.rate = None
    process = await run_agent_process(dev.config_path)
    try:
        await wait_reported(cloud, "dev1", lambda s: s["state"] == "rebooting", within=60)
        assert await wait_for_path(marker)
    finally:
        await stop_agent_process(process)
        await proxy.close()
    assert process.returncode == 0
    return proxy.down_bytes - before


async def test_agent_killed_mid_download_resumes_at_its_checkpoint(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    dev, proxy, image, bundle_size, checkpoint, marker = await _kill_after_a_checkpoint(
        cloud, cloud_dir, make_device, tmp_path
    )
    fetched = await _finish_after_restart(dev, cloud, proxy, marker)
    # only the bytes after the checkpoint were fetched again (+ TLS and HTTP overhead)
    preamble = (dev.state_dir / "download.preamble").read_bytes()
    left = bundle_size - len(preamble) - checkpoint["payload"]
    assert checkpoint["payload"] > 0 and left < bundle_size // 2
    assert left <= fetched < left * 1.05 + 32 * 1024, (left, fetched)
    assert dev.slot_sha("B", len(image)) == sha256(image)
    assert dev.slot_bytes("A") == dev.factory["A"]
    state = json.loads((dev.state_dir / "journal.json").read_text())
    assert state["state"] == "rebooting" and "resume" not in state["runtime"]


def _replace_preamble(dev: Any) -> None:
    (dev.state_dir / "download.preamble").write_bytes(b"not the preamble")


def _edit_checkpoint(**changes: Any) -> Any:
    def edit(dev: Any) -> None:
        path = dev.state_dir / "journal.json"
        doc = json.loads(path.read_text())
        doc["runtime"]["resume"].update(changes)
        path.write_text(json.dumps(doc))

    return edit


@pytest.mark.parametrize(
    "spoil",
    [
        _replace_preamble,
        _edit_checkpoint(payload="12"),  # malformed
        _edit_checkpoint(image=1 << 40),  # beyond the image the kept preamble describes
    ],
    ids=["preamble-replaced", "malformed", "outside-the-bundle"],
)
async def test_agent_restart_with_an_unusable_checkpoint_downloads_from_the_start(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path, spoil: Any
) -> None:
    """A checkpoint that cannot be trusted is a lost shortcut, not a failed job."""
    dev, proxy, image, bundle_size, _, marker = await _kill_after_a_checkpoint(
        cloud, cloud_dir, make_device, tmp_path
    )
    spoil(dev)
    fetched = await _finish_after_restart(dev, cloud, proxy, marker)
    assert fetched >= bundle_size  # the checkpoint was not used: everything again
    assert dev.slot_sha("B", len(image)) == sha256(image)
    assert dev.slot_bytes("A") == dev.factory["A"]


async def test_agent_broker_restart_mid_download_continues_one_job(
    cloud: Any, cloud_dir: Any, broker: Any, make_device: Any, tmp_path: Path
) -> None:
    proxy = await store_proxy(cloud).start()
    dev = make_device("dev1")
    try:
        agent = await dev.start()
        image, entry = await offer_bundle(cloud, cloud_dir, tmp_path, proxy=proxy, publish=False)
        proxy.rate = (tmp_path / "j1.otb").stat().st_size / 4
        await cloud.set_desired("dev1", {"software": entry})
        await wait_reported(cloud, "dev1", lambda s: s["state"] == "downloading")
        broker.restart()
        proxy.rate = None
        await dev.wait_reboot_requested(within=60)
    finally:
        await proxy.close()
    assert agent.session is not None and agent.session.connects >= 2  # reconnected, got again
    assert agent.jobs_started == 1 and proxy.connections == 1  # the download never restarted
    assert dev.slot_sha("B", len(image)) == sha256(image)
    await wait_reported(cloud, "dev1", lambda s: s["state"] == "rebooting", within=30)


async def test_agent_crash_point_mid_write_then_restart_converges(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    from plugins.agent_env import to_toml

    marker = tmp_path / "rebooted"
    dev = make_device(
        "dev1",
        config={
            "slots": {"booted": "A"},
            "reboot_command": ["touch", str(marker)],
            "testing": {"crash_points": ["write:50"], "exit_code": 99},
        },
    )
    process = await run_agent_process(dev.config_path)
    try:
        await wait_reported(cloud, "dev1", lambda s: s["state"] == "idle")
        image, _ = await offer_bundle(cloud, cloud_dir, tmp_path)
        assert await asyncio.wait_for(process.wait(), 60) == 99  # died at the crash point
        assert not dev.sim.state().slot("B").bootable  # half-written: never bootable
        healthy = tmp_path / "otad-no-crash.toml"
        healthy.write_text(to_toml({k: v for k, v in dev.document.items() if k != "testing"}))
        process = await run_agent_process(healthy)
        await wait_reported(cloud, "dev1", lambda s: s["state"] == "rebooting", within=60)
    finally:
        await stop_agent_process(process)
    assert process.returncode == 0  # SIGTERM: a graceful stop
    assert dev.slot_sha("B", len(image)) == sha256(image)
    assert dev.slot_bytes("A") == dev.factory["A"]

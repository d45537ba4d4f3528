"""End-to-end A/B updates on real boots: QEMU (TCG), GRUB, the otad agent under systemd.

Each test boots a private copy of the image built by ``qemu/build-image`` (slot A = 1.0), drives
the device only through its shadow (the replica) and watches the serial console. Deadlines are
sized for a 2-core host running TCG (one boot is 15-40 s); each test prints its wall time.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from otad.errors import ShadowNotFound

from .conftest import QemuImage, note
from .guest import PANIC, Guest
from .proxy import Relay

# A hard deadline per test on top of every wait's own: a hung guest never stalls the session.
pytestmark = [pytest.mark.qemu, pytest.mark.timeout(1500)]

DEVICE = "dev1"
GUEST_STORE_URL = "https://10.0.2.100:8443"
# Deadlines: an idle 2-core host boots in 20-40 s and installs the ~80 MB bundle in 1-2 min;
# with other work on the cores everything under TCG takes 3-5x longer, which these allow.
BOOT_TIMEOUT = 300.0  # power on -> boot marker, or boot marker -> the agent's report
UPDATE_TIMEOUT = 900.0  # desired -> rebooted into the new slot (download, write, verify)


def software(doc: dict[str, Any]) -> dict[str, Any]:
    reported = doc.get("state", {}).get("reported") or {}
    return dict(reported.get("software") or {})


async def wait_reported(
    cloud: Any, guest: Guest, what: str, predicate: Callable[[dict[str, Any]], bool], within: float
) -> dict[str, Any]:
    """Poll the replica's document until reported.software satisfies ``predicate``."""
    deadline = time.monotonic() + within
    last: dict[str, Any] = {}
    while True:
        try:
            last = software(await cloud.get_document(DEVICE))
        except ShadowNotFound:
            last = {}  # the device has not reported yet
        if predicate(last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"replica: reported.software never became {what} within {within:.0f} s; "
                f"last reported: {last}\nconsole tail:\n{guest.tail()}"
            )
        await asyncio.sleep(1.0)


async def boot_on_1_0(cloud: Any, guest: Guest) -> None:
    """Power on; slot A boots 1.0 and the agent reports it idle on the shadow."""
    _, boot = await guest.power_on(BOOT_TIMEOUT)
    assert (boot.slot, boot.version) == ("A", "1.0")
    await wait_reported(
        cloud,
        guest,
        "1.0 on slot A",
        lambda sw: sw.get("version") == "1.0" and sw.get("slot") == "A",
        BOOT_TIMEOUT,
    )


async def offer(cloud: Any, bundle: Any, job: str) -> float:
    """Upload a bundle, pre-sign it for the device, set it as desired; return when (monotonic)."""
    artifact = await cloud.upload(bundle)
    # The guest reaches the store at its guestfwd address, not at the host's loopback port.
    url = cloud.store.signer.presign(artifact, DEVICE, 3600, base_url=GUEST_STORE_URL)
    at = time.monotonic()
    await cloud.set_desired(DEVICE, {"software": {"version": "2.0", "url": url, "jobId": job}})
    return at


async def test_qemu_update_commits_slot_b(cloud: Any, guest: Guest, qemu_image: QemuImage) -> None:
    await boot_on_1_0(cloud, guest)
    mark = guest.mark()
    desired_at = await offer(cloud, qemu_image.bundles["update"], "qemu-update")

    await wait_reported(
        cloud,
        guest,
        "a state of job qemu-update",
        lambda sw: sw.get("jobId") == "qemu-update",
        BOOT_TIMEOUT,
    )
    accepted_s = time.monotonic() - desired_at
    _, boot = await guest.wait_boot(UPDATE_TIMEOUT, since=mark)
    assert (boot.slot, boot.version) == ("B", "2.0"), "the guest rebooted into the wrong slot"
    sw = await wait_reported(
        cloud,
        guest,
        "succeeded 2.0 on slot B",
        lambda sw: sw.get("state") == "succeeded" or sw.get("state") in ("failed", "rolled_back"),
        BOOT_TIMEOUT,
    )
    committed_s = time.monotonic() - desired_at
    assert (sw.get("state"), sw.get("version"), sw.get("slot")) == ("succeeded", "2.0", "B"), sw
    assert sw.get("error") in (None, {}), sw
    note(
        f"qemu update: desired -> job accepted by the device {accepted_s:.1f} s, "
        f"desired -> committed on B {committed_s:.1f} s, bundle "
        f"{qemu_image.bundles['update'].stat().st_size / 1e6:.0f} MB"
    )


async def test_qemu_health_failure_rolls_back(
    cloud: Any, guest: Guest, qemu_image: QemuImage
) -> None:
    await boot_on_1_0(cloud, guest)
    mark = guest.mark()
    await offer(cloud, qemu_image.bundles["broken"], "qemu-broken")

    index, first = await guest.wait_boot(UPDATE_TIMEOUT, since=mark)
    assert (first.slot, first.version) == ("B", "2.0"), "the broken update was never tried"
    _, second = await guest.wait_boot(BOOT_TIMEOUT * 2, since=index + 1)
    assert (second.slot, second.version) == ("A", "1.0"), "no fall back to slot A"
    sw = await wait_reported(
        cloud,
        guest,
        "rolled_back on slot A",
        lambda sw: (
            sw.get("jobId") == "qemu-broken" and sw.get("state") in ("rolled_back", "failed")
        ),
        BOOT_TIMEOUT,
    )
    assert (sw["state"], sw.get("version"), sw.get("slot")) == ("rolled_back", "1.0", "A"), sw
    error = sw.get("error") or {}
    assert error.get("code") and error.get("message"), f"no reason reported: {sw}"
    assert "health" in (error["code"] + error["message"]).lower(), error


async def test_qemu_kernel_panic_falls_back(
    cloud: Any, guest: Guest, qemu_image: QemuImage
) -> None:
    await boot_on_1_0(cloud, guest)
    mark = guest.mark()
    await offer(cloud, qemu_image.bundles["panic"], "qemu-panic")

    await guest.wait_for(PANIC, UPDATE_TIMEOUT, since=mark)
    _, boot = await guest.wait_boot(BOOT_TIMEOUT * 2, since=mark)
    assert (boot.slot, boot.version) == ("A", "1.0"), "no fall back to A after the panic"
    sw = await wait_reported(
        cloud,
        guest,
        "rolled_back after the failed boot",
        lambda sw: sw.get("jobId") == "qemu-panic" and sw.get("state") in ("rolled_back", "failed"),
        BOOT_TIMEOUT,
    )
    assert (sw["state"], sw.get("version"), sw.get("slot")) == ("rolled_back", "1.0", "A"), sw
    error = sw.get("error") or {}
    assert error.get("code") == "boot_failed", sw


async def test_qemu_power_cut_during_write_resumes(
    cloud: Any, guest: Guest, relay: Relay, qemu_image: QemuImage
) -> None:
    bundle = qemu_image.bundles["update"]
    size = bundle.stat().st_size
    await boot_on_1_0(cloud, guest)
    # Slow the store down so the cut lands in the middle of the download + slot write.
    relay.rate = max(size / 40, 256 * 1024)
    mark = guest.mark()
    await offer(cloud, bundle, "qemu-powercut")
    deadline = time.monotonic() + BOOT_TIMEOUT
    # Past half the bundle: the agent has journaled a checkpoint (a frame end flushed to the
    # slot, every download.read_back_step of image) that the next boot resumes from.
    while relay.to_guest < size * 0.5:
        assert time.monotonic() < deadline, f"download did not start: {relay.to_guest} bytes"
        await asyncio.sleep(0.5)
    progress = software(await cloud.get_document(DEVICE))
    cut_at = relay.to_guest
    guest.power_cut()
    assert cut_at < size, "the whole bundle was already relayed: the cut came too late"
    assert guest.count(re.compile(r"OTAD-PROBE"), since=mark) == 0, "rebooted before the cut"

    relay.rate = None
    relayed_before_restart = relay.to_guest
    index, boot = await guest.power_on(BOOT_TIMEOUT)
    assert (boot.slot, boot.version) == ("A", "1.0"), "a partly written slot was booted"
    _, boot = await guest.wait_boot(UPDATE_TIMEOUT, since=index + 1)
    assert (boot.slot, boot.version) == ("B", "2.0")
    sw = await wait_reported(
        cloud,
        guest,
        "succeeded after the power cut",
        lambda sw: (
            sw.get("jobId") == "qemu-powercut"
            and sw.get("state") in ("succeeded", "failed", "rolled_back")
        ),
        BOOT_TIMEOUT,
    )
    assert (sw["state"], sw.get("version"), sw.get("slot")) == ("succeeded", "2.0", "B"), sw
    refetched = relay.to_guest - relayed_before_restart
    note(
        f"qemu power cut after {cut_at / 1e6:.0f} of {size / 1e6:.0f} MB relayed "
        f"(reported before the cut: {progress.get('state')} {progress.get('progress')}%); "
        f"{refetched / 1e6:.0f} MB fetched after the restart"
    )
    # resumed at the checkpoint, not at byte 0 (that would be the whole bundle again)
    assert refetched < size * 0.9, (refetched, size)

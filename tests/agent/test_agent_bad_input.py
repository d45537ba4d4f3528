"""Invariant 4: bad input gets a clear reported error and changes nothing on the device.

Bundles come from a plain HTTPS server of the test (the real store refuses most of them on
upload; the agent must refuse them on its own). The target slot ends not bootable, the booted
slot is byte-for-byte untouched, no reboot is asked for, and the job is never retried.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from plugins.agent_env import fix_keyring, offer_bundle, wait_reported, weak_keyring
from plugins.cloud_env import make_image

from otad.agent.update import DeviceState
from otad.bundle import build_bundle, generate_private_key, load_private_key

MiB = 1024 * 1024


def bundle_bytes(cloud_dir: Any, tmp_path: Path, case: str) -> bytes:
    image = make_image(tmp_path / "img", 5 * MiB if case == "oversize" else 2 * MiB, seed=3)
    key = generate_private_key() if case == "wrong_key" else load_private_key(cloud_dir.signing_key)
    options: dict[str, Any] = {}
    if case == "incompatible":
        options["compatible"] = "another-board"
    if case == "downgrade":
        options["security_version"] = 1
    if case == "expired":
        options["expires"] = datetime.now(UTC) - timedelta(hours=1)
    if case == "wrong_device":
        options["device"] = "dev2"
    out = tmp_path / "b.otb"
    build_bundle(image, out, key=key, version="2.0", **{"compatible": "qemu-x86_64", **options})
    data = bytearray(out.read_bytes())
    if case == "tampered_manifest":
        data[60] ^= 0x01  # inside the signed manifest
    if case == "tampered_payload":
        data[len(data) // 2] ^= 0x40
    if case == "truncated":
        del data[-1000:]
    return bytes(data)


CASES = {
    "tampered_manifest": {"bundle_bad_signature", "bundle_malformed_manifest"},
    "tampered_payload": {"bundle_payload_hash_mismatch", "bundle_decompress_failed"},
    "wrong_key": {"bundle_unknown_key"},
    "incompatible": {"bundle_incompatible"},
    "downgrade": {"bundle_downgrade"},
    "expired": {"bundle_expired"},
    "wrong_device": {"bundle_wrong_device"},
    "oversize": {"bundle_oversize"},
    "truncated": {"bundle_truncated"},
}


async def assert_untouched(dev: Any) -> None:
    boot = dev.sim.state()
    assert not boot.slot("B").bootable and boot.next_boot() == "A"
    assert dev.slot_bytes("A") == dev.factory["A"]
    assert dev.reboot_requests == 0


@pytest.mark.parametrize("case", sorted(CASES))
async def test_agent_bad_bundle_fails_with_its_code(
    case: str, cloud: Any, cloud_dir: Any, make_device: Any, blob_server: Any, tmp_path: Path
) -> None:
    dev = make_device("dev1")
    if case == "downgrade":
        DeviceState(dev.state_dir / "device.json", {"A": "1.0"}, security_version=5).save()
    await dev.start()
    url = blob_server.add("bundle", bundle_bytes(cloud_dir, tmp_path, case))
    await cloud.set_desired("dev1", {"software": {"version": "2.0", "url": url, "jobId": "bad"}})
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed")
    assert sw["jobId"] == "bad" and sw["error"]["code"] in CASES[case], sw
    assert sw["version"] == "1.0" and sw["slot"] == "A"
    await assert_untouched(dev)

    # Restarting with the same desired state does not retry the job.
    fetched = blob_server.requests
    await dev.reboot()
    await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed")
    assert blob_server.requests == fetched and dev.agent.jobs_started == 0


def lying_bundle(cloud_dir: Any, image: bytes) -> bytes:
    """Genuinely signed by the cloud's key, but the manifest's image hash is not the image's."""
    import hashlib

    import zstandard

    from otad.bundle import canonical, key_id_of
    from otad.bundle.header import FORMAT_VERSION, Header
    from otad.bundle.keys import algorithm_of
    from otad.bundle.preamble import signed_message
    from otad.bundle.signatures import SignatureEntry, encode_signatures
    from otad.bundle.signing import sign

    key = load_private_key(cloud_dir.signing_key)
    payload = zstandard.ZstdCompressor(level=3).compress(image)
    manifest = canonical.encode(
        {
            "format_version": FORMAT_VERSION,
            "compatible": "qemu-x86_64",
            "version": "2.0",
            "security_version": 0,
            "created": "2026-01-01T00:00:00Z",
            "size": len(payload),
            "compression": "zstd",
            "sha256": hashlib.sha256(payload).hexdigest(),
            "image_size": len(image),
            "image_sha256": hashlib.sha256(image + b"x").hexdigest(),
            "key_ids": [key_id_of(key)],
        }
    )
    signature = sign(
        key, signed_message(Header(FORMAT_VERSION, 0, len(manifest), 0, len(payload)), manifest)
    )
    block = encode_signatures([SignatureEntry(key_id_of(key), algorithm_of(key), signature)])
    header = Header(FORMAT_VERSION, 0, len(manifest), len(block), len(payload))
    return header.pack() + manifest + block + payload


async def test_agent_signed_manifest_with_a_wrong_image_hash_never_becomes_bootable(
    cloud: Any, cloud_dir: Any, make_device: Any, blob_server: Any, tmp_path: Path
) -> None:
    # The payload hash and the signature are right; only the decompressed image differs from
    # the signed image hash. The agent finds it when it re-reads the slot, before the switch.
    dev = make_device("dev1")
    await dev.start()
    image = make_image(tmp_path / "img", 2 * MiB, seed=4).read_bytes()
    url = blob_server.add("lying", lying_bundle(cloud_dir, image))
    await cloud.set_desired("dev1", {"software": {"version": "2.0", "url": url, "jobId": "lie"}})
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed")
    assert sw["jobId"] == "lie" and sw["error"]["code"] == "slot_verify_failed", sw
    await assert_untouched(dev)


@pytest.mark.parametrize(
    ("entry", "code"),
    [
        ({"version": "2.0", "url": "http://127.0.0.1/b", "jobId": "j"}, "download_insecure_url"),
        ({"version": "2.0", "url": "ftp://127.0.0.1/b", "jobId": "j"}, "download_insecure_url"),
        ({"version": 2, "url": "https://127.0.0.1/b", "jobId": "j"}, "desired_invalid"),
        ({"version": "2.0", "jobId": "j"}, "desired_invalid"),
        ({"version": "2.0", "url": "https://127.0.0.1/b", "jobId": ""}, "desired_invalid"),
        ({"version": "2.0", "url": "https://x/b", "jobId": "j", "size": -1}, "desired_invalid"),
        (
            {"version": "2.0", "url": "https://x/b", "jobId": "j", "sha256": "xyz"},
            "desired_invalid",
        ),
        ("not an object", "desired_invalid"),
    ],
)
async def test_agent_malformed_desired_entry_fails_without_touching_the_device(
    entry: Any, code: str, cloud: Any, make_device: Any
) -> None:
    dev = make_device("dev1")
    await dev.start()
    await cloud.set_desired("dev1", {"software": entry})
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed")
    assert sw["error"]["code"] == code and sw["version"] == "1.0"
    boot = dev.sim.state()
    assert boot.slot("B").good  # not even marked bad: the job never started
    assert dev.slot_bytes("A") == dev.factory["A"] and dev.slot_bytes("B") == dev.factory["B"]
    assert dev.agent is not None and dev.agent.jobs_started == 0


async def test_agent_desired_version_differing_from_bundle_fails_before_writing(
    cloud: Any, cloud_dir: Any, make_device: Any, blob_server: Any, tmp_path: Path
) -> None:
    dev = make_device("dev1")
    await dev.start()
    url = blob_server.add("bundle", bundle_bytes(cloud_dir, tmp_path, "ok"))
    await cloud.set_desired("dev1", {"software": {"version": "9.9", "url": url, "jobId": "mix"}})
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed")
    assert sw["error"]["code"] == "desired_invalid"
    await assert_untouched(dev)
    assert dev.slot_bytes("B") == dev.factory["B"]  # refused before the first byte


async def test_agent_without_a_usable_keyring_fails_each_job_and_changes_nothing(
    cloud: Any, cloud_dir: Any, make_device: Any, blob_server: Any, tmp_path: Path
) -> None:
    keyring, weak = weak_keyring(tmp_path)
    dev = make_device("dev1", config={"keyring": str(keyring)})
    await dev.start()  # runs and reports instead of exiting
    await wait_reported(cloud, "dev1", lambda s: s["state"] == "idle")
    boot_before = dev.sim.state()
    url = blob_server.add("bundle", bundle_bytes(cloud_dir, tmp_path, "expired"))
    for job in ("k1", "k2"):  # each new job is answered, none is retried
        await cloud.set_desired("dev1", {"software": {"version": "2.0", "url": url, "jobId": job}})
        sw = await wait_reported(cloud, "dev1", lambda s, j=job: s.get("jobId") == j)
        assert sw["state"] == "failed" and sw["error"]["code"] == "keyring_invalid", sw
        assert str(weak) in sw["error"]["message"] and "small order" in sw["error"]["message"]
    assert blob_server.requests == 0  # not a byte fetched
    assert dev.sim.state() == boot_before  # the target was not even marked bad
    assert dev.slot_bytes("A") == dev.factory["A"] and dev.slot_bytes("B") == dev.factory["B"]
    assert dev.reboot_requests == 0 and not (dev.state_dir / "journal.json").exists()
    assert dev.agent is not None and dev.agent.jobs_started == 2

    # The keyring is fixed: the next job loads it again and installs, no restart needed.
    fix_keyring(keyring, cloud_dir.keyring_dir)
    await offer_bundle(cloud, cloud_dir, tmp_path, job="k3")
    await dev.wait_reboot_requested()
    assert dev.sim.state().next_boot() == "B"


async def test_agent_rolls_back_an_image_that_cannot_verify_updates(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    # The new image boots and is healthy otherwise, but its keyring is unusable: committing it
    # would leave a device no update can reach. Its health check fails and the old slot returns.
    dev = make_device("dev1")
    await dev.start()
    await offer_bundle(cloud, cloud_dir, tmp_path)
    await dev.wait_reboot_requested()
    good_config = dev.config
    keyring, weak = weak_keyring(tmp_path)
    dev.config = dataclasses.replace(good_config, keyring=keyring)  # the new image's keyring

    assert await dev.reboot() == "B"
    await dev.wait_reboot_requested()  # the rollback reboot
    assert dev.sim.state().slot("B").bad
    dev.config = good_config  # the old image, with its keyring
    assert await dev.reboot() == "A"
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "rolled_back")
    assert sw["version"] == "1.0" and sw["slot"] == "A" and sw["jobId"] == "j1"
    assert sw["error"]["code"] == "health_check_failed", sw
    assert "cannot verify updates" in sw["error"]["message"]
    assert str(weak) in sw["error"]["message"]
    assert dev.slot_bytes("A") == dev.factory["A"] and dev.sim.state().next_boot() == "A"


async def test_agent_keyring_unreadable_only_at_start_does_not_cost_the_update(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    # A read error when the agent starts on the new slot (the keyring itself is fine): the
    # health check loads the keyring again before judging, and the update is committed.
    from otad.agent.daemon import Agent
    from otad.errors import KeyringError

    dev = make_device("dev1")
    await dev.start()
    await offer_bundle(cloud, cloud_dir, tmp_path)
    await dev.wait_reboot_requested()

    async def unreadable(self: Agent) -> KeyringError:
        return KeyringError(f"bundle: cannot read public key {self.config.keyring}: I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(Agent, "_load_keyring", unreadable)
        assert await dev.reboot() == "B"  # the start-time load fails; the health check follows
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "succeeded")
    assert sw["version"] == "2.0" and sw["slot"] == "B" and dev.reboot_requests == 1
    assert dev.sim.state().slot("B").good

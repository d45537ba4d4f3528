"""Issue 8, named attacks against a whole agent (real broker with TLS + ACL, real replica, real
store, the sim device). Each test first proves its channel is live where that matters (a forged
message that *is* acted on), so "nothing happened" means "refused", not "never delivered".

The attacker of the MQTT cases holds the replica's identity or replays what it sent (only the
replica may publish on a device's answer topics: tests/cloud/test_cloud_broker_acl.py shows a
device certificate cannot reach other devices' topics at all).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from plugins.agent_env import offer_bundle, store_proxy, wait_reported
from plugins.cloud_env import make_bundle, mqtt_client
from structlog.testing import capture_logs

from otad.bundle import HEADER_SIZE, Header, key_id_of, load_private_key, parse_header

MiB = 1024 * 1024


async def eventually(check: Callable[[], bool], within: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def quiet(seconds: float = 1.5) -> None:
    """Give a refused message time to have had an effect (there must be none)."""
    await asyncio.sleep(seconds)


def untouched(dev: Any) -> None:
    boot = dev.sim.state()
    assert boot.next_boot() == "A" and dev.reboot_requests == 0
    assert dev.slot_bytes("A") == dev.factory["A"]


async def current_version(cloud: Any, device: str = "dev1") -> int:
    return int((await cloud.get_document(device))["version"])


def forged_software(url: str, job: str) -> dict[str, Any]:
    return {"version": "9.9", "url": url, "jobId": job}


# --- replayed and reordered shadow messages ------------------------------------------------------


async def test_attack_replayed_old_documents_and_deltas_are_ignored(
    cloud: Any, cloud_dir: Any, broker: Any, make_device: Any, blob_server: Any
) -> None:
    dev = make_device("dev1")
    agent = await dev.start()
    await wait_reported(cloud, "dev1", lambda s: s["state"] == "idle")
    for n in range(3):  # a few real shadow versions the device has seen
        await cloud.set_desired("dev1", {"note": n})
    version = await current_version(cloud)
    assert agent.session is not None
    await eventually(lambda: agent.session._doc_version >= version)
    url = blob_server.add("old", b"never fetched")
    async with mqtt_client(cloud_dir, "replica", broker, identifier="replayer") as attacker:
        # A captured old delta and an old full document, both with lower shadow versions.
        old = {"software": forged_software(url, "replayed")}
        await attacker.publish(
            "state/dev1/update/delta", json.dumps({"state": old, "version": 1}), qos=1
        )
        await attacker.publish(
            "state/dev1/get/accepted",
            json.dumps({"state": {"desired": old}, "version": version - 1}),
            qos=1,
        )
        await quiet()
        assert agent.jobs_started == 0 and blob_server.requests == 0
        untouched(dev)

        # Control: the same forged document with a newer version is acted on (so the refusal
        # above was the version check, not a lost message).
        await attacker.publish(
            "state/dev1/get/accepted",
            json.dumps({"state": {"desired": old}, "version": version + 100}),
            qos=1,
        )
        await eventually(lambda: blob_server.requests >= 1)
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed")
    assert sw["jobId"] == "replayed"
    untouched(dev)


async def test_attack_out_of_order_deltas_and_documents_only_the_newest_counts(
    cloud: Any, cloud_dir: Any, broker: Any, make_device: Any, blob_server: Any
) -> None:
    dev = make_device("dev1")
    agent = await dev.start()
    await wait_reported(cloud, "dev1", lambda s: s["state"] == "idle")
    version = await current_version(cloud)
    assert agent.session is not None
    await eventually(lambda: agent.session._doc_version >= version)
    urls = {n: blob_server.add(f"b{n}", b"not a bundle") for n in (7, 8, 9)}
    async with mqtt_client(cloud_dir, "replica", broker, identifier="reorderer") as attacker:
        # Deltas are hints only: whatever they carry, the device fetches the real document
        # (which desires nothing), so out-of-order deltas start no job.
        for n in (9, 7, 8):
            delta = {"state": {"software": forged_software(urls[n], f"d{n}")}, "version": n}
            await attacker.publish("state/dev1/update/delta", json.dumps(delta), qos=1)
        await quiet()
        assert agent.jobs_started == 0 and blob_server.requests == 0

        # Full documents out of order: v+9 is acted on, v+7 and v+8 arriving later are stale.
        for n in (9, 7, 8):
            doc = {
                "state": {"desired": {"software": forged_software(urls[n], f"o{n}")}},
                "version": version + n,
            }
            await attacker.publish("state/dev1/get/accepted", json.dumps(doc), qos=1)
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed")
    await quiet(1.0)
    assert sw["jobId"] == "o9" and agent.jobs_started == 1
    assert blob_server.requests == 1  # never the stale ones
    untouched(dev)


# --- where bundles may come from ---------------------------------------------------------------


@pytest.mark.parametrize(
    "how",
    ["file_scheme", "redirect_to_plain_http", "redirect_to_file_scheme"],
)
async def test_attack_non_https_source_is_refused(
    how: str, cloud: Any, make_device: Any, blob_server: Any
) -> None:
    from aiohttp import web

    plain_hits = 0

    async def plain(request: web.Request) -> web.Response:
        nonlocal plain_hits
        plain_hits += 1
        return web.Response(body=b"x")

    async def redirect(request: web.Request) -> web.Response:
        target = plain_url if how == "redirect_to_plain_http" else "file:///etc/hostname"
        raise web.HTTPFound(target)

    app = web.Application()
    app.router.add_get("/plain", plain)
    plain_runner = web.AppRunner(app)
    await plain_runner.setup()
    await web.TCPSite(plain_runner, "127.0.0.1", 0).start()
    plain_url = f"http://127.0.0.1:{plain_runner.addresses[0][1]}/plain"
    tls_app = web.Application()
    tls_app.router.add_get("/r", redirect)
    tls_runner = web.AppRunner(tls_app)
    await tls_runner.setup()
    site = web.TCPSite(
        tls_runner, "127.0.0.1", 0, ssl_context=blob_server.cloud_dir.server_context()
    )
    await site.start()
    https_url = f"https://127.0.0.1:{tls_runner.addresses[0][1]}/r"
    dev = make_device("dev1")
    try:
        await dev.start()
        url = "file:///etc/hostname" if how == "file_scheme" else https_url
        await cloud.set_desired("dev1", {"software": {"version": "2.0", "url": url, "jobId": how}})
        sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed")
    finally:
        await tls_runner.cleanup()
        await plain_runner.cleanup()
    assert sw["jobId"] == how and sw["error"]["code"] == "download_insecure_url", sw
    assert plain_hits == 0  # not one request left the device in clear text
    untouched(dev)


async def test_attack_another_devices_url_is_refused_and_the_device_waits_for_its_own(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    """dev1 is handed a URL pre-signed for dev2. The store refuses dev1's certificate for it
    (403); the device cannot tell that from an expired URL, so it reports
    download_url_expired and waits for a URL of its own for the same job, writing nothing."""
    dev = make_device("dev1")
    await dev.start()
    image, entry = await offer_bundle(
        cloud, cloud_dir, tmp_path, publish=False, image_size=MiB, job="x"
    )
    artifact = entry["url"].split("/v1/artifacts/")[1].split("?")[0]
    stolen = {**entry, "url": cloud.presign(artifact, "dev2")}
    await cloud.set_desired("dev1", {"software": stolen})
    sw = await wait_reported(
        cloud, "dev1", lambda s: (s.get("error") or {}).get("code") == "download_url_expired"
    )
    assert sw["state"] == "downloading" and sw["jobId"] == "x"
    assert not dev.sim.state().slot("B").bootable and dev.slot_bytes("B") == dev.factory["B"]
    untouched(dev)
    await cloud.set_desired("dev1", {"software": entry})  # its own URL, same job
    await dev.wait_reboot_requested()
    assert dev.slot_bytes("B")[: len(image)] == image


# --- bundles that must not verify --------------------------------------------------------------


async def test_attack_bundle_signed_by_a_revoked_key_is_refused(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    keyring = tmp_path / "keyring"
    shutil.copytree(cloud_dir.keyring_dir, keyring)
    key_id = key_id_of(load_private_key(cloud_dir.signing_key))
    (keyring / "revoked").write_text(f"# compromised signing key\n{key_id}\n")
    dev = make_device("dev1", config={"keyring": str(keyring)})
    await dev.start()
    # The store still trusts the key (revocation reached the devices first): upload works.
    await offer_bundle(cloud, cloud_dir, tmp_path, image_size=MiB, job="revoked")
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed")
    assert sw["jobId"] == "revoked" and sw["error"]["code"] == "bundle_revoked_key", sw
    assert not dev.sim.state().slot("B").bootable
    untouched(dev)


def bundle_parts(data: bytes) -> tuple[Header, bytes, bytes, bytes]:
    header = parse_header(data[:HEADER_SIZE])
    manifest_end = HEADER_SIZE + header.manifest_size
    signatures_end = manifest_end + header.signatures_size
    return (
        header,
        data[HEADER_SIZE:manifest_end],
        data[manifest_end:signatures_end],
        data[signatures_end:],
    )


async def test_attack_mix_and_match_newer_manifest_over_older_image_is_refused(
    cloud: Any, cloud_dir: Any, make_device: Any, blob_server: Any, tmp_path: Path
) -> None:
    """Both parts are genuinely signed; only their combination is forged (same payload size,
    so the framing fits exactly). The device must refuse it before anything becomes bootable."""
    old = make_bundle(
        cloud_dir, tmp_path / "old.otb", version="2.0", image_size=MiB, seed=2, compression="none"
    ).read_bytes()
    new = make_bundle(
        cloud_dir,
        tmp_path / "new.otb",
        version="3.0",
        image_size=MiB,
        seed=3,
        compression="none",
        security_version=1,
    ).read_bytes()
    new_header, new_manifest, new_signatures, _ = bundle_parts(new)
    old_header, _, _, old_payload = bundle_parts(old)
    assert old_header.payload_size == new_header.payload_size
    mixed = new[:HEADER_SIZE] + new_manifest + new_signatures + old_payload
    dev = make_device("dev1")
    await dev.start()
    url = blob_server.add("mixed", mixed)
    await cloud.set_desired("dev1", {"software": {"version": "3.0", "url": url, "jobId": "mix"}})
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed")
    assert sw["jobId"] == "mix" and sw["error"]["code"] in {
        "bundle_payload_hash_mismatch",
        "bundle_image_hash_mismatch",
    }, sw
    assert sw["securityVersion"] == 0  # the floor was not raised by the forged manifest
    assert not dev.sim.state().slot("B").bootable
    untouched(dev)


# --- oversized MQTT payloads --------------------------------------------------------------------


async def test_attack_oversized_mqtt_payloads_are_dropped_and_the_device_stays_up(
    cloud: Any, cloud_dir: Any, broker: Any, make_device: Any, blob_server: Any
) -> None:
    dev = make_device("dev1")
    agent = await dev.start()
    await wait_reported(cloud, "dev1", lambda s: s["state"] == "idle")
    version = await current_version(cloud)
    url = blob_server.add("big", b"never fetched")
    software = forged_software(url, "oversize")
    padding = "x" * (200 * 1024)  # under the broker's 256 KiB packet limit, over the agent's 64
    doc = {"state": {"desired": {"software": software, "pad": padding}}, "version": version + 50}
    async with mqtt_client(cloud_dir, "replica", broker, identifier="bloater") as attacker:
        await attacker.publish("state/dev1/get/accepted", json.dumps(doc), qos=1)
        await attacker.publish("state/dev1/update/delta", json.dumps(doc), qos=1)
    # Over the broker's max_packet_size (256 KiB): the broker drops the publisher at once.

    async def publish_huge() -> None:
        async with mqtt_client(
            cloud_dir, "replica", broker, identifier="bloater2", timeout=3
        ) as attacker:
            await attacker.publish("state/dev1/get/accepted", b"{" + b" " * MiB + b"}", qos=1)

    with pytest.raises(aiomqtt.MqttError):
        await publish_huge()
    await quiet()
    assert agent.jobs_started == 0 and blob_server.requests == 0
    assert agent.session is not None and agent.session.connected.is_set()
    # A device's own oversized report is refused by the replica or the broker; its session stays.
    async with mqtt_client(cloud_dir, "dev1", broker, identifier="dev1-bloat") as device:
        await device.subscribe("state/dev1/update/rejected")
        body = {"state": {"reported": {"pad": "y" * (100 * 1024)}}, "clientToken": "big"}
        await device.publish("state/dev1/update", json.dumps(body), qos=1)
        async with asyncio.timeout(15):
            message = await anext(device.messages)
        answer = json.loads(message.payload)  # type: ignore[arg-type]
    # too large to look for the clientToken in: the rejection cannot echo it
    assert answer["code"] == 413 and answer.get("clientToken") in (None, "big"), answer
    doc_after = await cloud.get_document("dev1")
    assert "pad" not in doc_after["state"].get("reported", {})
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "idle")
    assert sw["version"] == "1.0"


# --- secrets never in logs ----------------------------------------------------------------------


async def test_attack_presigned_query_and_token_never_reach_logs_or_the_shadow(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    proxy = await store_proxy(cloud).start()
    dev = make_device("dev1", config={"store": {"url": cloud.store_url}})
    secrets: list[str] = []
    try:
        with capture_logs() as logs:
            agent = await dev.start()
            # 1. a pre-signed URL that expires mid-way (error paths log the URL), then a fresh one
            _, entry = await offer_bundle(
                cloud, cloud_dir, tmp_path, proxy=proxy, publish=False, expires_in=1.5, job="p"
            )
            bundle_size = (tmp_path / "p.otb").stat().st_size
            proxy.rate = bundle_size / 6
            proxy.cut_after(bundle_size // 2)
            await cloud.set_desired("dev1", {"software": entry})
            await wait_reported(
                cloud,
                "dev1",
                lambda s: (s.get("error") or {}).get("code") == "download_url_expired",
            )
            proxy.rate = None
            artifact = entry["url"].split("/v1/artifacts/")[1].split("?")[0]
            fresh_url = proxy.url(cloud.presign(artifact, "dev1"))
            await cloud.set_desired("dev1", {"software": {**entry, "url": fresh_url}})
            await dev.wait_reboot_requested()
            secrets += [entry["url"].split("?", 1)[1], fresh_url.split("?", 1)[1]]
            # 2. the token flow, on a fresh boot of the same device (the job goes to slot A)
            await dev.reboot()
            _, token_entry = await offer_bundle(
                cloud, cloud_dir, tmp_path, publish=False, version="3.0", job="t", seed=5
            )
            token_artifact = token_entry["url"].split("/v1/artifacts/")[1].split("?")[0]
            software = {
                "version": "3.0",
                "jobId": "t",
                "url": f"/v1/artifacts/{token_artifact}",
                "auth": "token",
            }
            agent = dev.agent
            await cloud.set_desired("dev1", {"software": software})
            await dev.wait_reboot_requested()
            assert agent is not None and agent.runner is not None
            token = agent.runner.downloader._token
            assert token
            secrets.append(token)
            document = await cloud.get_document("dev1")
            await dev.stop()
    finally:
        await proxy.close()
    # At rest the pre-signed URL lives only in the journal (to resume after a restart): 0600.
    assert (dev.state_dir / "journal.json").stat().st_mode & 0o077 == 0
    text = "\n".join(repr(event) for event in logs)
    assert "credential_obtained" in text and "download_url_expired" in text  # paths were taken
    for secret in secrets:
        assert secret not in text, "a secret reached the logs"
        assert secret not in json.dumps(document.get("state", {}).get("reported", {}))
    for part in (s for secret in secrets for s in secret.split("&")):
        if "=" in part and len(part.split("=", 1)[1]) >= 16:  # the signature / expiry values
            assert part.split("=", 1)[1] not in text

"""Issue 8, network faults: a hostile or broken download server, seen by a whole agent.

Each fault is played by a small asyncio server of this module (raw HTTP/1.1 written by hand, so
it can lie about lengths, stall, trickle or reset the TLS handshake) that holds the cloud CA's
server certificate, so TLS verification passes and only the fault is tested. The device must end
every case with a clear, bounded failure on the shadow (``failed`` + an error code) in a few
seconds under the short timeouts configured below, with the booted slot untouched and the target
slot not bootable. The resume cases (a cut mid-body against the real store, a broker restart)
live in tests/agent/test_agent_network.py; docs/failure-modes.md maps every fault to its test.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from typing import Any

import pytest
from plugins.agent_env import wait_reported
from plugins.cloud_env import make_bundle
from rogue import ENDLESS_CAP, Behaviour, RogueServer, chunk, head, read_request

from otad.agent.config import AgentConfig, parse
from otad.agent.download import Downloader, Source
from otad.errors import RetriesExhausted

# Short, explicit limits so every fault ends in about a second or two (the defaults are
# minutes; docs/agent.md lists them).
DOWNLOAD = {
    "retries": 1,
    "backoff_initial": 0.05,
    "backoff_max": 0.1,
    "sock_connect": 1.0,
    "sock_read": 0.6,
    "min_rate": 20_000,
    "rate_window": 1.0,
}
FAIL_WITHIN = 20.0  # generous on a loaded 2-core machine; the typical case takes 1-3 s

# --- the faults --------------------------------------------------------------------------------


async def cut_mid_body_every_time(s: RogueServer, r: Any, w: asyncio.StreamWriter) -> None:
    """Every connection (the resume too) is cut half way: resuming cannot help."""
    await read_request(r)
    await s.send(w, head(len(s.body)) + s.body[: len(s.body) // 2])


async def stall_before_headers(s: RogueServer, r: Any, w: asyncio.StreamWriter) -> None:
    """Slow loris: accept the request, never answer."""
    await read_request(r)
    await asyncio.sleep(60)


async def stall_mid_body(s: RogueServer, r: Any, w: asyncio.StreamWriter) -> None:
    await read_request(r)
    await s.send(w, head(len(s.body)) + s.body[:4096])
    await asyncio.sleep(60)


async def trickle_below_min_rate(s: RogueServer, r: Any, w: asyncio.StreamWriter) -> None:
    """~1.3 KB/s: every read arrives well inside sock_read, only the rate check can end it."""
    await read_request(r)
    await s.send(w, head(len(s.body)))
    for offset in range(0, len(s.body), 64):
        await s.send(w, s.body[offset : offset + 64])
        await asyncio.sleep(0.05)


async def reset_during_tls_handshake(s: RogueServer, r: Any, w: asyncio.StreamWriter) -> None:
    """Plain TCP: read the ClientHello, then close with RST (SO_LINGER 0)."""
    await asyncio.wait_for(r.read(512), 10)
    sock = w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()


async def stall_in_tls_handshake(s: RogueServer, r: Any, w: asyncio.StreamWriter) -> None:
    """Plain TCP: take the ClientHello and never answer it (slow loris one layer down)."""
    await asyncio.wait_for(r.read(512), 10)
    await asyncio.sleep(60)


async def garbage_instead_of_server_hello(s: RogueServer, r: Any, w: asyncio.StreamWriter) -> None:
    await asyncio.wait_for(r.read(512), 10)
    await s.send(w, b"HTTP/1.1 200 OK\r\n\r\n" + random.Random(1).randbytes(4096))


async def more_bytes_than_declared(s: RogueServer, r: Any, w: asyncio.StreamWriter) -> None:
    """A self-consistent HTTP answer that is 4 MiB longer than the bundle header declares."""
    await read_request(r)
    extra = 4 * 1024 * 1024
    await s.send(w, head(len(s.body) + extra) + s.body)
    for _ in range(extra // 65536):
        await s.send(w, b"\0" * 65536)


async def endless_chunked_after_the_bundle(s: RogueServer, r: Any, w: asyncio.StreamWriter) -> None:
    await read_request(r)
    await s.send(w, head(None, chunked=True) + chunk(s.body))
    filler = chunk(b"\0" * 65536)
    while s.sent < ENDLESS_CAP:
        await s.send(w, filler)


async def endless_chunked_garbage(s: RogueServer, r: Any, w: asyncio.StreamWriter) -> None:
    await read_request(r)
    await s.send(w, head(None, chunked=True))
    noise = chunk(random.Random(2).randbytes(65536))
    while s.sent < ENDLESS_CAP:
        await s.send(w, noise)


# behaviour, TLS?, the codes the device may report (the first listed is what it reports today)
FAULTS: dict[str, tuple[Behaviour, bool, set[str]]] = {
    "cut_mid_body_every_time__retries_then_fails": (
        cut_mid_body_every_time,
        True,
        {"download_retries_exhausted"},
    ),
    "stall_before_headers__times_out": (
        stall_before_headers,
        True,
        {"download_retries_exhausted"},
    ),
    "stall_mid_body__times_out": (stall_mid_body, True, {"download_retries_exhausted"}),
    "trickle_below_min_rate__times_out": (
        trickle_below_min_rate,
        True,
        {"download_retries_exhausted"},
    ),
    "reset_during_tls_handshake__fails": (
        reset_during_tls_handshake,
        False,
        {"download_retries_exhausted"},
    ),
    "stall_in_tls_handshake__times_out": (
        stall_in_tls_handshake,
        False,
        {"download_retries_exhausted"},
    ),
    "garbage_instead_of_tls__fails": (
        garbage_instead_of_server_hello,
        False,
        {"download_retries_exhausted"},
    ),
    "more_bytes_than_declared__oversize": (
        more_bytes_than_declared,
        True,
        {"bundle_oversize"},
    ),
    "endless_chunked_after_the_bundle__cut_off": (
        endless_chunked_after_the_bundle,
        True,
        {"bundle_oversize", "download_too_large"},
    ),
    "endless_chunked_garbage__refused": (
        endless_chunked_garbage,
        True,
        {"bundle_malformed_header"},
    ),
}


def downloader_config(cloud_dir: Any, download: dict[str, Any]) -> AgentConfig:
    ident = cloud_dir.device("dev1")
    return parse(
        {
            "device_id": "dev1",
            "compatible": "qemu-x86_64",
            "broker": {"host": "127.0.0.1", "ca": str(cloud_dir.ca_cert)},
            "store": {"ca": str(cloud_dir.ca_cert), "cert": str(ident.cert), "key": str(ident.key)},
            "slots": {"A": {"path": "/nonexistent/a"}, "B": {"path": "/nonexistent/b"}},
            "download": download,
        }
    )


@pytest.fixture(scope="module")
def bundle(cloud_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = make_bundle(cloud_dir, tmp_path_factory.mktemp("net") / "b.otb", image_size=256 * 1024)
    return bytes(out.read_bytes())


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_network_fault_ends_in_a_bounded_reported_failure(
    fault: str, cloud: Any, cloud_dir: Any, make_device: Any, bundle: bytes
) -> None:
    behaviour, tls, codes = FAULTS[fault]
    server = await RogueServer(
        behaviour, bundle, cloud_dir.server_context() if tls else None
    ).start()
    dev = make_device("dev1", config={"download": DOWNLOAD})
    try:
        await dev.start()
        started = time.monotonic()
        entry = {"version": "2.0", "url": server.url, "jobId": f"net-{fault[:20]}"}
        await cloud.set_desired("dev1", {"software": entry})
        sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed", FAIL_WITHIN)
        took = time.monotonic() - started
    finally:
        await server.close()
    assert sw["error"]["code"] in codes, sw
    assert sw["jobId"] == entry["jobId"] and sw["version"] == "1.0" and sw["slot"] == "A"
    assert took < FAIL_WITHIN
    # bounded: one try and one retry at most, and nothing endless was swallowed
    assert 1 <= server.connections <= 1 + DOWNLOAD["retries"], server.connections
    assert server.sent < ENDLESS_CAP
    boot = dev.sim.state()
    assert not boot.slot("B").bootable and boot.next_boot() == "A"
    assert dev.slot_bytes("A") == dev.factory["A"]
    assert dev.reboot_requests == 0
    # the query-less URL is all that may reach the shadow
    assert "?" not in str(sw["error"])


async def overlong(s: RogueServer, r: Any, w: asyncio.StreamWriter) -> None:
    """The whole bundle under an exact Content-Length, then 300 kB nobody asked for."""
    await read_request(r)
    await s.send(w, head(len(s.body)) + s.body + b"\0" * 300_000)


async def fetch(downloader: Downloader, url: str) -> bytes:
    received = bytearray()
    async for offset, data in downloader.transfer(Source(url)).chunks():
        assert offset == len(received)
        received += data
    return bytes(received)


async def test_network_bytes_past_the_content_length_never_reach_the_caller(
    cloud_dir: Any, bundle: bytes
) -> None:
    server = await RogueServer(overlong, bundle, cloud_dir.server_context()).start()
    downloader = Downloader(downloader_config(cloud_dir, DOWNLOAD))
    try:
        assert await fetch(downloader, server.url) == bundle
    finally:
        await downloader.close()
        await server.close()


async def test_network_downloader_closes_cleanly_after_a_server_wrote_past_its_length(
    cloud_dir: Any, bundle: bytes
) -> None:
    server = await RogueServer(overlong, bundle, cloud_dir.server_context()).start()
    downloader = Downloader(downloader_config(cloud_dir, DOWNLOAD))
    try:
        await fetch(downloader, server.url)
        # The poisoned keep-alive connection must not break the close: Agent.run closes its
        # downloader on stop, before it releases the journal lock.
        await downloader.close()
    finally:
        await server.close()


async def test_network_agent_stops_cleanly_after_a_server_sent_past_its_length(
    cloud: Any, cloud_dir: Any, make_device: Any, bundle: bytes
) -> None:
    server = await RogueServer(overlong, bundle, cloud_dir.server_context()).start()
    dev = make_device("dev1", config={"download": DOWNLOAD})
    try:
        await dev.start()
        entry = {"version": "2.0", "url": server.url, "jobId": "overlong"}
        await cloud.set_desired("dev1", {"software": entry})
        await dev.wait_reboot_requested(within=FAIL_WITHIN)  # the bundle itself was complete
        await dev.stop()  # Agent.run closes the downloader: it must end without an error
    finally:
        await server.close()
    assert dev.sim.state().next_boot() == "B"


async def test_network_resets_exhaust_retries_with_the_cause_named(cloud_dir: Any) -> None:
    server = await RogueServer(reset_during_tls_handshake, b"", None).start()
    downloader = Downloader(downloader_config(cloud_dir, {**DOWNLOAD, "retries": 3}))
    started = time.monotonic()
    try:
        with pytest.raises(RetriesExhausted) as info:
            async for _ in downloader.transfer(Source(server.url)).chunks():
                pass
    finally:
        await downloader.close()
        await server.close()
    assert info.value.details.get("cause") == "download_protocol_error"
    assert server.connections == 4 and time.monotonic() - started < 10

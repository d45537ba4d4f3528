"""The downloader against the real artifact store (HTTPS, Range, pre-signed URLs, tokens) and
a byte-level fault proxy; plus a tiny HTTPS server of our own for misbehaving-server cases."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from plugins.agent_env import FaultProxy, deep_merge, serve_https
from plugins.cloud_env import make_bundle

from otad.agent.config import AgentConfig
from otad.agent.download import Downloader, Source, Transfer, backoff_delay, check_https
from otad.errors import (
    DownloadForbidden,
    DownloadNotFound,
    DownloadProtocolError,
    DownloadTooLarge,
    InsecureUrl,
    RetriesExhausted,
    UrlExpired,
)

MiB = 1024 * 1024


def agent_config(cloud_dir: Any, *, device: str = "dev1", **download: Any) -> AgentConfig:
    from otad.agent.config import parse

    ident = cloud_dir.device(device)
    doc = {
        "device_id": device,
        "compatible": "qemu-x86_64",
        "broker": {"host": "127.0.0.1", "ca": str(cloud_dir.ca_cert)},
        "store": {"ca": str(cloud_dir.ca_cert), "cert": str(ident.cert), "key": str(ident.key)},
        "slots": {"A": {"path": "/nonexistent/a"}, "B": {"path": "/nonexistent/b"}},
        "download": deep_merge(
            {"backoff_initial": 0.01, "backoff_max": 0.05, "sock_read": 3.0, "retries": 3},
            download,
        ),
    }
    return parse(doc)


async def collect(transfer: Transfer) -> bytes:
    out = bytearray()
    async for offset, data in transfer.chunks():
        if offset != len(out):
            del out[offset:]
        out += data
    return bytes(out)


@pytest.fixture
async def uploaded(cloud: Any, cloud_dir: Any, tmp_path: Path) -> tuple[str, bytes]:
    bundle = make_bundle(cloud_dir, tmp_path / "b.otb", image_size=2 * MiB, seed=7)
    return await cloud.upload(bundle), bundle.read_bytes()


@pytest.fixture
async def downloader(cloud_dir: Any) -> AsyncIterator[Downloader]:
    d = Downloader(agent_config(cloud_dir))
    yield d
    await d.close()


async def test_download_fetches_presigned_bundle(
    cloud: Any, uploaded: tuple[str, bytes], downloader: Downloader
) -> None:
    artifact, data = uploaded
    transfer = downloader.transfer(Source(cloud.presign(artifact, "dev1")))
    assert await collect(transfer) == data
    assert transfer.requests == 1 and transfer.resumes == 0 and transfer.etag


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/v1/artifacts/x",
        "ftp://127.0.0.1/x",
        "file:///etc/passwd",
        "https:///x",
        "x",
    ],
)
def test_download_refuses_anything_but_https(url: str) -> None:
    with pytest.raises(InsecureUrl):
        Source(url)


@given(st.text(max_size=40))
def test_download_check_https_never_crashes(text: str) -> None:
    with contextlib.suppress(InsecureUrl):
        check_https(text)


def test_download_backoff_is_bounded_and_jittered() -> None:
    delays = [backoff_delay(n, 0.5, 8.0) for n in range(1, 30)]
    assert all(0.25 <= d <= 8.0 for d in delays)
    assert max(delays) > 4.0


async def test_download_cut_at_half_resumes_with_range(
    cloud: Any, uploaded: tuple[str, bytes], downloader: Downloader
) -> None:
    artifact, data = uploaded
    host, port = "127.0.0.1", int(cloud.store_url.rsplit(":", 1)[1])
    proxy = await FaultProxy(host, port).start()
    try:
        proxy.cut_after(len(data) // 2)
        transfer = downloader.transfer(Source(proxy.url(cloud.presign(artifact, "dev1"))))
        assert await collect(transfer) == data
    finally:
        await proxy.close()
    assert proxy.cuts == 1 and transfer.resumes == 1 and transfer.restarts == 0
    assert transfer.bytes_received == len(data)  # no byte fetched twice
    # TLS records and two handshakes on top of the body, but nowhere near a second copy
    assert proxy.down_bytes < len(data) * 1.05 + 64 * 1024


async def test_download_expired_url_then_fresh_url_resumes(
    cloud: Any, uploaded: tuple[str, bytes], downloader: Downloader
) -> None:
    artifact, data = uploaded
    port = int(cloud.store_url.rsplit(":", 1)[1])
    proxy = await FaultProxy("127.0.0.1", port).start()
    short = proxy.url(cloud.presign(artifact, "dev1", expires_in=2))
    proxy.cut_after(len(data) // 3)
    transfer = downloader.transfer(Source(short))
    got = bytearray()
    try:

        async def first_pass() -> None:
            async for offset, chunk in transfer.chunks():
                got[offset:] = chunk
                if offset + len(chunk) >= len(data) // 4:
                    await asyncio.sleep(2.5)  # the URL expires while we are cut off

        with pytest.raises(UrlExpired):
            await first_pass()
        assert 0 < transfer.offset < len(data)
        resumed_at = transfer.offset
        transfer.replace_source(Source(proxy.url(cloud.presign(artifact, "dev1"))))
        async for offset, chunk in transfer.chunks():
            assert offset >= resumed_at
            got[offset:] = chunk
    finally:
        await proxy.close()
    assert bytes(got) == data and transfer.restarts == 0


async def test_download_url_of_another_device_is_refused(
    cloud: Any, uploaded: tuple[str, bytes], downloader: Downloader
) -> None:
    artifact, _ = uploaded
    with pytest.raises(UrlExpired):
        await collect(downloader.transfer(Source(cloud.presign(artifact, "dev2"))))


async def test_download_token_flow(
    cloud: Any, uploaded: tuple[str, bytes], downloader: Downloader
) -> None:
    artifact, data = uploaded
    url = f"{cloud.store_url}/v1/artifacts/{artifact}"
    # the store hands a token only for an artifact the device's desired state names
    with pytest.raises(DownloadForbidden):
        await collect(downloader.transfer(Source(url, auth="token")))
    software = {
        "version": "2.0",
        "jobId": "jt",
        "url": f"/v1/artifacts/{artifact}",
        "auth": "token",
    }
    await cloud.set_desired("dev1", {"software": software})
    assert await collect(downloader.transfer(Source(url, auth="token"))) == data


async def test_download_unknown_artifact_is_not_found(cloud: Any, downloader: Downloader) -> None:
    url = f"{cloud.store_url}/v1/artifacts/{'0' * 64}"
    with pytest.raises((DownloadNotFound, DownloadForbidden)):
        await collect(downloader.transfer(Source(url, auth="token")))


async def test_download_refuses_more_than_the_limit(
    cloud: Any, uploaded: tuple[str, bytes], downloader: Downloader
) -> None:
    artifact, data = uploaded
    transfer = downloader.transfer(Source(cloud.presign(artifact, "dev1")), max_size=len(data) - 1)
    with pytest.raises(DownloadTooLarge):
        await collect(transfer)


async def test_download_untrusted_server_certificate(
    cloud: Any, uploaded: tuple[str, bytes], tmp_path: Path
) -> None:
    from otad.cloud.pki import init_cloud

    other = init_cloud(tmp_path / "other", ["dev1"])
    downloader = Downloader(agent_config(other))
    artifact, _ = uploaded
    try:
        with pytest.raises(DownloadForbidden, match="not trusted"):
            await collect(downloader.transfer(Source(cloud.presign(artifact, "dev1"))))
    finally:
        await downloader.close()


# --- a misbehaving server of our own -------------------------------------------------------


async def test_download_server_ignoring_range_restarts_from_zero(
    cloud_dir: Any, downloader: Downloader
) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    calls: list[str | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        calls.append(request.headers.get("Range"))
        resp = web.StreamResponse(headers={"ETag": '"v1"', "Content-Length": str(len(body))})
        await resp.prepare(request)
        if len(calls) == 1:
            await resp.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.close()  # cut mid-body
            return resp
        await resp.write(body)  # ignores Range: the whole entity again
        return resp

    async with serve_https(cloud_dir, "/b", handler) as origin:
        url = f"{origin}/b"
        transfer = downloader.transfer(Source(url))
        assert await collect(transfer) == body
    assert calls[0] is None and calls[1] is not None and calls[1].startswith("bytes=")
    assert transfer.restarts == 1


async def test_download_bad_content_range_is_a_protocol_error(
    cloud_dir: Any, downloader: Downloader
) -> None:
    body = b"x" * 200_000

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Range"):
            return web.Response(
                status=206, body=body[10:], headers={"Content-Range": "bytes 10-199999/200000"}
            )
        resp = web.StreamResponse(headers={"Content-Length": str(len(body))})
        await resp.prepare(request)
        await resp.write(body[:100_000])
        assert request.transport is not None
        request.transport.close()
        return resp

    async with serve_https(cloud_dir, "/b", handler) as origin:
        url = f"{origin}/b"
        with pytest.raises(RetriesExhausted) as info:
            await collect(downloader.transfer(Source(url)))
    assert isinstance(info.value.__cause__, DownloadProtocolError)


async def test_download_stalled_server_times_out_and_gives_up(cloud_dir: Any) -> None:
    downloader = Downloader(agent_config(cloud_dir, sock_read=0.3, retries=1))

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "1000"})
        await resp.prepare(request)
        await resp.write(b"x" * 10)
        await asyncio.sleep(5)
        return resp

    try:
        async with serve_https(cloud_dir, "/b", handler) as origin:
            url = f"{origin}/b"
            with pytest.raises(RetriesExhausted, match="timed out"):
                await asyncio.wait_for(collect(downloader.transfer(Source(url))), 10)
    finally:
        await downloader.close()


async def test_download_server_errors_are_retried_then_exhausted(
    cloud_dir: Any, downloader: Downloader
) -> None:
    hits = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.Response(status=503)

    async with serve_https(cloud_dir, "/b", handler) as origin:
        url = f"{origin}/b"
        with pytest.raises(RetriesExhausted):
            await collect(downloader.transfer(Source(url)))
    assert hits == 4  # the first try and 3 retries

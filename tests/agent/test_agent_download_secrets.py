"""Credentials stay where they belong: a bearer token is not forwarded to another origin by a
redirect, and a pre-signed URL never reaches an error message (logs, the shadow)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from plugins.agent_env import wait_reported

from otad.agent.config import AgentConfig, parse
from otad.agent.download import Downloader, Source, Transfer
from otad.errors import DownloadError

SECRET = "X-Otad-Signature=s3cr3t-s1gnature"


def agent_config(cloud_dir: Any, *, retries: int = 3) -> AgentConfig:
    ident = cloud_dir.device("dev1")
    return parse(
        {
            "device_id": "dev1",
            "compatible": "qemu-x86_64",
            "broker": {"host": "127.0.0.1", "ca": str(cloud_dir.ca_cert)},
            "store": {
                "ca": str(cloud_dir.ca_cert),
                "cert": str(ident.cert),
                "key": str(ident.key),
            },
            "slots": {"A": {"path": "/nonexistent/a"}, "B": {"path": "/nonexistent/b"}},
            "download": {"backoff_initial": 0.01, "backoff_max": 0.05, "retries": retries},
        }
    )


async def collect(transfer: Transfer) -> bytes:
    out = bytearray()
    async for offset, data in transfer.chunks():
        del out[offset:]
        out += data
    return bytes(out)


@contextlib.asynccontextmanager
async def https_app(cloud_dir: Any, app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=cloud_dir.server_context())
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_download_redirect_to_another_origin_drops_the_bearer_token(
    cloud_dir: Any,
) -> None:
    body = b"bundle bytes " * 1000
    seen: dict[str, str | None] = {}

    async def blob(request: web.Request) -> web.Response:
        seen[request.path] = request.headers.get("Authorization")
        return web.Response(body=body)

    mirror_app = web.Application()
    mirror_app.router.add_get("/b", blob)
    async with https_app(cloud_dir, mirror_app) as mirror:

        async def credentials(request: web.Request) -> web.Response:
            return web.json_response({"token": "T0KEN", "expires_in": 300})

        async def away(request: web.Request) -> web.Response:
            raise web.HTTPFound(f"{mirror}/b")

        async def same(request: web.Request) -> web.Response:
            raise web.HTTPFound("/v1/artifacts/final")

        store_app = web.Application()
        store_app.router.add_post("/v1/credentials", credentials)
        store_app.router.add_get("/v1/artifacts/away", away)
        store_app.router.add_get("/v1/artifacts/same", same)
        store_app.router.add_get("/v1/artifacts/final", blob)
        async with https_app(cloud_dir, store_app) as store:
            downloader = Downloader(agent_config(cloud_dir))
            try:
                away_bytes = await collect(
                    downloader.transfer(Source(f"{store}/v1/artifacts/away", auth="token"))
                )
                same_bytes = await collect(
                    downloader.transfer(Source(f"{store}/v1/artifacts/same", auth="token"))
                )
            finally:
                await downloader.close()
    assert away_bytes == body and same_bytes == body
    assert seen["/b"] is None  # the other origin never sees the store's credential
    assert seen["/v1/artifacts/final"] == "Bearer T0KEN"  # same origin: still authorised


async def test_download_invalid_url_error_does_not_carry_the_presigned_query(
    cloud_dir: Any,
) -> None:
    # passes the https check, but aiohttp refuses the port and puts the whole URL in its error
    url = f"https://127.0.0.1:99999/v1/artifacts/a?{SECRET}"
    downloader = Downloader(agent_config(cloud_dir, retries=1))
    try:
        with pytest.raises(DownloadError) as info:
            await collect(downloader.transfer(Source(url)))
    finally:
        await downloader.close()
    assert "s3cr3t" not in info.value.message
    assert "s3cr3t" not in json.dumps(info.value.to_wire())
    assert "127.0.0.1:99999/v1/artifacts/a" in info.value.message  # still says where


async def test_agent_failed_download_reports_no_presigned_query(
    cloud: Any, make_device: Any, tmp_path: Path
) -> None:
    dev = make_device("dev1", config={"download": {"retries": 1}})
    await dev.start()
    entry = {
        "version": "2.0",
        "jobId": "jbad",
        "url": f"https://127.0.0.1:99999/v1/artifacts/a?{SECRET}",
    }
    await cloud.set_desired("dev1", {"software": entry})
    sw = await wait_reported(
        cloud, "dev1", lambda s: s["state"] == "failed" and s.get("jobId") == "jbad"
    )
    assert sw["error"]["code"]
    assert "s3cr3t" not in json.dumps(sw)

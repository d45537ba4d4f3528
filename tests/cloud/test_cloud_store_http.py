"""The real store over HTTPS: uploads, Range/If-Range/416, pre-signed URLs, bearer tokens.

Clients are aiohttp sessions and, for the hypothesis range test, urllib (another HTTP stack),
all over TLS with certificates from the session's cloud dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from plugins.cloud_env import CloudEnv, identity, make_bundle
from plugins.threads import race

from otad.bundle import Keyring
from otad.cloud.pki import CloudDir, init_cloud
from otad.cloud.store import SHUTDOWN_GRACE, ArtifactStore
from otad.cloud.store_files import ArtifactRepository
from otad.errors import StoreError

# --- helpers -------------------------------------------------------------------------------------


async def fetch(
    env: CloudEnv, url: str, who: str | None = "dev1", **kwargs: Any
) -> tuple[int, CIMultiDict[str], bytes]:
    async with env.http(who) as session, session.get(url, **kwargs) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def error_code(
    env: CloudEnv, url: str, who: str | None = "dev1", **kwargs: Any
) -> tuple[int, str]:
    status, headers, body = await fetch(env, url, who, **kwargs)
    assert headers["Content-Type"].startswith("application/json")
    return status, json.loads(body)["error"]["code"]


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


# --- uploads -------------------------------------------------------------------------------------


async def test_store_upload_returns_content_hash_id(
    cloud: CloudEnv, signed_bundle: Path, bundle_bytes: bytes
) -> None:
    artifact = await cloud.upload(signed_bundle)
    assert artifact == hashlib.sha256(bundle_bytes).hexdigest()
    stored = cloud.config.artifacts_dir / f"{artifact}.bundle"
    assert await asyncio.to_thread(stored.read_bytes) == bundle_bytes
    # The same bytes again: the same artifact, no second copy.
    assert await cloud.upload(signed_bundle) == artifact
    assert sorted(p.name for p in cloud.config.artifacts_dir.glob("*.bundle")) == [
        f"{artifact}.bundle"
    ]


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("payload", "bundle_payload_hash_mismatch"),
        ("manifest", None),
        ("truncated", "bundle_truncated"),
    ],
)
async def test_store_upload_rejects_a_tampered_bundle(
    cloud: CloudEnv, signed_bundle: Path, where: str, reason: str | None, bundle_bytes: bytes
) -> None:
    data = bytearray(bundle_bytes)
    if where == "payload":
        data[-100] ^= 0x01
    elif where == "manifest":
        data[60] ^= 0x01  # inside the manifest, right after the 40-byte header
    else:
        del data[-1000:]
    async with (
        cloud.http("fleet") as session,
        session.post(f"{cloud.store_url}/v1/artifacts", data=bytes(data)) as resp,
    ):
        body = await resp.json()
    assert resp.status == 422
    assert body["error"]["code"] == "artifact_rejected"
    if reason:
        assert body["error"]["reason"] == reason
    else:
        assert body["error"]["reason"].startswith("bundle_")
    assert not list(cloud.config.artifacts_dir.glob("*.bundle"))
    assert not list((cloud.config.artifacts_dir / ".incoming").glob("*"))


async def test_store_upload_rejects_a_bundle_signed_by_an_unknown_key(
    cloud: CloudEnv, tmp_path: Path
) -> None:
    stranger = init_cloud(tmp_path / "stranger", [])
    bundle = make_bundle(stranger, tmp_path / "evil.otab", version="9.9")
    async with (
        cloud.http("fleet") as session,
        session.post(f"{cloud.store_url}/v1/artifacts", data=bundle.read_bytes()) as resp,
    ):
        body = await resp.json()
    assert resp.status == 422
    assert body["error"]["reason"] == "bundle_unknown_key"


@pytest.mark.parametrize(
    ("who", "status", "code"),
    [(None, 401, "auth_required"), ("dev1", 403, "auth_failed"), ("replica", 403, "auth_failed")],
)
async def test_store_upload_needs_an_uploader_identity(
    cloud: CloudEnv,
    signed_bundle: Path,
    who: str | None,
    status: int,
    code: str,
    bundle_bytes: bytes,
) -> None:
    async with (
        cloud.http(who) as session,
        session.post(f"{cloud.store_url}/v1/artifacts", data=bundle_bytes) as resp,
    ):
        body = await resp.json()
    assert (resp.status, body["error"]["code"]) == (status, code)


async def test_store_upload_over_the_limit_is_413(
    cloud: CloudEnv, signed_bundle: Path, bundle_bytes: bytes
) -> None:
    cloud.store.config = cloud.store.config.with_overrides(max_upload_bytes=1000)
    async with (
        cloud.http("fleet") as session,
        session.post(f"{cloud.store_url}/v1/artifacts", data=bundle_bytes) as resp,
    ):
        body = await resp.json()
    assert resp.status == 413 and body["error"]["code"] == "artifact_rejected"


# --- downloads -----------------------------------------------------------------------------------


async def test_store_presigned_download_serves_the_bytes(
    cloud: CloudEnv, signed_bundle: Path, bundle_bytes: bytes
) -> None:
    artifact = await cloud.upload(signed_bundle)
    url = cloud.presign(artifact, "dev1", 60)
    status, headers, body = await fetch(cloud, url)
    assert status == 200
    assert body == bundle_bytes
    assert headers["ETag"] == f'"{artifact}"'
    assert headers["Accept-Ranges"] == "bytes"
    assert int(headers["Content-Length"]) == len(body)


async def test_store_head_gives_headers_without_body(
    cloud: CloudEnv, signed_bundle: Path, bundle_bytes: bytes
) -> None:
    artifact = await cloud.upload(signed_bundle)
    url = cloud.presign(artifact, "dev1", 60)
    async with cloud.http("dev1") as session, session.head(url) as resp:
        assert resp.status == 200
        assert int(resp.headers["Content-Length"]) == len(bundle_bytes)
        assert await resp.read() == b""


async def test_store_range_resume_reassembles_the_file(
    cloud: CloudEnv, signed_bundle: Path, bundle_bytes: bytes
) -> None:
    artifact = await cloud.upload(signed_bundle)
    url = cloud.presign(artifact, "dev1", 60)
    data = bundle_bytes
    got = bytearray()
    etag = None
    # Read 100 KiB, "lose" the connection, resume with If-Range, repeat until done.
    for _ in range(100):
        headers = {"Range": f"bytes={len(got)}-{len(got) + 100 * 1024 - 1}"}
        if etag:
            headers["If-Range"] = etag
        status, resp_headers, body = await fetch(cloud, url, headers=headers)
        assert status == 206
        assert resp_headers["Content-Range"] == (
            f"bytes {len(got)}-{len(got) + len(body) - 1}/{len(data)}"
        )
        etag = resp_headers["ETag"]
        got += body
        if len(got) == len(data):
            break
    assert bytes(got) == data


async def test_store_if_range_with_a_stale_etag_sends_everything(
    cloud: CloudEnv, signed_bundle: Path, bundle_bytes: bytes
) -> None:
    artifact = await cloud.upload(signed_bundle)
    url = cloud.presign(artifact, "dev1", 60)
    for stale in ('"0000"', 'W/"' + artifact + '"', "Mon, 01 Jan 2001 00:00:00 GMT"):
        status, headers, body = await fetch(
            cloud, url, headers={"Range": "bytes=10-", "If-Range": stale}
        )
        assert status == 200, stale
        assert "Content-Range" not in headers
        assert body == bundle_bytes
    # The current ETag and the current Last-Modified keep the range.
    status, headers, body = await fetch(
        cloud, url, headers={"Range": "bytes=10-19", "If-Range": f'"{artifact}"'}
    )
    assert (status, body) == (206, bundle_bytes[10:20])
    status, _, _ = await fetch(
        cloud, url, headers={"Range": "bytes=10-19", "If-Range": headers["Last-Modified"]}
    )
    assert status == 206


async def test_store_unsatisfiable_range_is_416(
    cloud: CloudEnv, signed_bundle: Path, bundle_bytes: bytes
) -> None:
    artifact = await cloud.upload(signed_bundle)
    url = cloud.presign(artifact, "dev1", 60)
    size = len(bundle_bytes)
    status, headers, body = await fetch(cloud, url, headers={"Range": f"bytes={size}-"})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{size}"
    assert json.loads(body)["error"]["code"] == "range_not_satisfiable"


async def test_store_if_none_match_is_304(cloud: CloudEnv, signed_bundle: Path) -> None:
    artifact = await cloud.upload(signed_bundle)
    url = cloud.presign(artifact, "dev1", 60)
    status, _, body = await fetch(cloud, url, headers={"If-None-Match": f'"{artifact}"'})
    assert (status, body) == (304, b"")


async def test_store_presigned_url_refusals(cloud: CloudEnv, signed_bundle: Path) -> None:
    artifact = await cloud.upload(signed_bundle)
    url = cloud.presign(artifact, "dev1", 60)
    expired = cloud.store.signer.presign(artifact, "dev1", 60, now=time.time() - 120)
    assert await error_code(cloud, expired) == (403, "auth_expired")
    expires = dict(parse_qsl(urlsplit(url).query))["expires"]
    assert await error_code(cloud, with_query(url, expires=str(int(expires) + 1))) == (
        403,
        "auth_failed",
    )
    assert await error_code(cloud, with_query(url, device="dev2")) == (403, "auth_failed")
    assert await error_code(cloud, with_query(url, signature="f" * 64)) == (403, "auth_failed")
    # dev2 holds dev1's URL and presents its own certificate.
    assert await error_code(cloud, url, who="dev2") == (403, "auth_wrong_device")
    # Without a client certificate (binding "certificate", the default).
    assert await error_code(cloud, url, who=None) == (401, "auth_required")
    # No credential at all.
    bare = url.split("?", 1)[0]
    assert await error_code(cloud, bare) == (401, "auth_required")
    # A service identity is not the device either.
    assert await error_code(cloud, url, who="fleet") == (403, "auth_wrong_device")


async def test_store_presign_binding_id_accepts_the_url_alone(
    cloud: CloudEnv, signed_bundle: Path, bundle_bytes: bytes
) -> None:
    artifact = await cloud.upload(signed_bundle)
    cloud.store.config = cloud.store.config.with_overrides(presign_binding="id")
    url = cloud.presign(artifact, "dev1", 60)
    status, _, body = await fetch(cloud, url, who=None)
    assert status == 200 and body == bundle_bytes
    # A presented certificate must still be the right one.
    assert await error_code(cloud, url, who="dev2") == (403, "auth_wrong_device")


async def test_store_unknown_and_malformed_artifacts_are_404(cloud: CloudEnv) -> None:
    missing = "0" * 64
    url = cloud.presign(missing, "dev1", 60)
    assert await error_code(cloud, url) == (404, "artifact_not_found")
    assert await error_code(cloud, f"{cloud.store_url}/v1/artifacts/nothex") == (
        404,
        "artifact_not_found",
    )
    assert await error_code(cloud, f"{cloud.store_url}/v2/whatever") == (404, "not_found")


# --- hypothesis over ranges, with urllib as an independent client --------------------------------


@pytest.fixture(scope="module")
def threaded_store(
    cloud_dir: CloudDir, signed_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, bytes, ssl.SSLContext]]:
    """A store on its own thread + loop (hypothesis drives it from synchronous code)."""
    config = cloud_dir.config().with_overrides(
        artifacts_dir=tmp_path_factory.mktemp("threaded-artifacts")
    )
    store = ArtifactStore(
        config,
        keyring=Keyring.load(cloud_dir.keyring_dir),
        ssl_context=cloud_dir.server_context(),
        host="127.0.0.1",
        port=0,
    )
    info = store.repository.import_file(signed_bundle, store.keyring)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        async with store:
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        url = store.signer.presign(info.artifact_id, "dev4", 600)
        ctx = cloud_dir.client_context(cloud_dir.device("dev4"))
        yield url, signed_bundle.read_bytes(), ctx
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        with contextlib.suppress(Exception):
            loop.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_store_range_requests_match_the_file_bytes(
    threaded_store: tuple[str, bytes, ssl.SSLContext], data: st.DataObject
) -> None:
    url, content, ctx = threaded_store
    size = len(content)
    kind = data.draw(st.sampled_from(["closed", "open", "suffix"]))
    start = data.draw(st.integers(0, size + 10))
    if kind == "closed":
        end = data.draw(st.integers(start, size + 10))
        header, expected = f"bytes={start}-{end}", (start, min(end + 1, size))
    elif kind == "open":
        header, expected = f"bytes={start}-", (start, size)
    else:
        n = data.draw(st.integers(1, size + 10))
        header, expected = f"bytes=-{n}", (max(0, size - n), size)
    status, headers, body = urllib_get(url, ctx, {"Range": header})
    if expected[0] >= size:
        assert status == 416, header
        assert headers["Content-Range"] == f"bytes */{size}"
    else:
        assert status == 206, header
        assert headers["Content-Range"] == f"bytes {expected[0]}-{expected[1] - 1}/{size}"
        assert body == content[expected[0] : expected[1]]


def urllib_get(url: str, ctx: ssl.SSLContext, headers: dict[str, str]) -> tuple[int, Any, bytes]:
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - https URL we built
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=10) as resp:  # noqa: S310
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


# --- broken connections --------------------------------------------------------------------------


async def eventually(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll ``condition`` every 50 ms, at most ``seconds`` long (bounded in count and time)."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {seconds} s")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def raw_request(cloud: CloudEnv, who: str, head: bytes) -> tuple[Any, Any]:
    ctx = cloud.cloud_dir.client_context(identity(cloud.cloud_dir, who))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", cloud.store.port, ssl=ctx, server_hostname="127.0.0.1"
    )
    writer.write(head)
    await writer.drain()
    return reader, writer


async def test_store_client_gone_mid_download_is_logged_not_an_error(
    cloud: CloudEnv, tmp_path: Path
) -> None:
    big = make_bundle(cloud.cloud_dir, tmp_path / "big.otab", image_size=24 * 1024 * 1024, seed=9)
    artifact = await cloud.upload(big)
    url = urlsplit(cloud.presign(artifact, "dev1", 60))
    before = open_fds()
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            reader, writer = await raw_request(
                cloud, "dev1", f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            got = 0
            async with asyncio.timeout(10):
                while got < 2 * 1024 * 1024:
                    got += len(await reader.read(65536))
            writer.transport.abort()
        await eventually(lambda: sum(e["event"] == "download_interrupted" for e in logs) == 3)
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    assert open_fds() <= before + 1  # the bundle file descriptors were closed
    # The store still serves.
    status, _, body = await fetch(
        cloud, cloud.presign(artifact, "dev1", 60), headers={"Range": "bytes=0-9"}
    )
    assert (status, len(body)) == (206, 10)


async def test_store_upload_cut_half_way_leaves_nothing(
    cloud: CloudEnv, bundle_bytes: bytes
) -> None:
    head = (
        f"POST /v1/artifacts HTTP/1.1\r\nHost: x\r\nContent-Length: {len(bundle_bytes)}\r\n\r\n"
    ).encode()
    _, writer = await raw_request(cloud, "fleet", head + bundle_bytes[: len(bundle_bytes) // 2])
    await asyncio.sleep(0.3)
    writer.transport.abort()
    incoming = cloud.config.artifacts_dir / ".incoming"
    await eventually(lambda: not list(incoming.glob("*")))
    assert not list(cloud.config.artifacts_dir.glob("*.bundle"))


async def test_store_chunked_upload_over_the_limit_is_413(
    cloud: CloudEnv, bundle_bytes: bytes
) -> None:
    cloud.store.config = cloud.store.config.with_overrides(max_upload_bytes=200_000)

    async def body() -> Any:
        for i in range(0, len(bundle_bytes), 64 * 1024):
            yield bundle_bytes[i : i + 64 * 1024]

    async with (
        cloud.http("fleet") as session,
        session.post(f"{cloud.store_url}/v1/artifacts", data=body()) as resp,
    ):
        answer = await resp.json()
    assert resp.status == 413 and answer["error"]["code"] == "artifact_rejected"
    assert not list((cloud.config.artifacts_dir / ".incoming").glob("*"))


async def test_store_serves_parallel_downloads(cloud: CloudEnv, bundle_bytes: bytes) -> None:
    artifact = await cloud.upload_bytes(bundle_bytes)
    devices = ["dev1", "dev2", "dev3", "dev4"]
    results = await asyncio.gather(
        *(fetch(cloud, cloud.presign(artifact, d, 60), who=d) for d in devices for _ in range(2))
    )
    assert all(status == 200 and body == bundle_bytes for status, _, body in results)


async def test_store_put_is_idempotent_and_checks_the_id(
    cloud: CloudEnv, bundle_bytes: bytes
) -> None:
    artifact = hashlib.sha256(bundle_bytes).hexdigest()
    url = f"{cloud.store_url}/v1/artifacts/{artifact}"
    async with cloud.http("fleet") as session:
        async with session.put(url, data=bundle_bytes) as resp:
            assert resp.status == 201
            assert (await resp.json())["id"] == artifact
        async with session.put(url, data=bundle_bytes) as resp:
            assert resp.status == 200  # already there: nothing created
        wrong = f"{cloud.store_url}/v1/artifacts/{'a' * 64}"
        async with session.put(wrong, data=bundle_bytes) as resp:
            body = await resp.json()
            assert resp.status == 422
            assert body["error"]["reason"] == "artifact_id_mismatch"
    assert not (cloud.config.artifacts_dir / f"{'a' * 64}.bundle").exists()
    async with cloud.http("dev1") as session, session.put(url, data=b"x") as resp:
        assert resp.status == 403


async def test_store_non_ascii_credentials_are_refused_not_crashing(
    cloud: CloudEnv, bundle_bytes: bytes
) -> None:
    artifact = await cloud.upload_bytes(bundle_bytes)
    url = cloud.presign(artifact, "dev1", 60)
    for field, value in [("signature", "é" * 64), ("device", "dév1"), ("expires", "١٢٣")]:
        assert await error_code(cloud, with_query(url, **{field: value})) == (403, "auth_failed")


async def test_store_refuses_to_start_on_a_busy_port(cloud: CloudEnv) -> None:
    other = ArtifactStore(
        cloud.config,
        keyring=cloud.store.keyring,
        ssl_context=cloud.cloud_dir.server_context(),
        host="127.0.0.1",
        port=cloud.store.port,
    )
    with pytest.raises(StoreError, match="cannot listen"):  # the running store has that port
        await other.start()


async def test_store_catalogue_is_for_services_only(cloud: CloudEnv, bundle_bytes: bytes) -> None:
    artifact = await cloud.upload_bytes(bundle_bytes)
    async with cloud.http("fleet") as session:
        async with session.get(f"{cloud.store_url}/v1/artifacts") as resp:
            listing = await resp.json()
        async with session.get(f"{cloud.store_url}/v1/artifacts/{artifact}/manifest") as resp:
            one = await resp.json()
    assert [a["id"] for a in listing["artifacts"]] == [artifact]
    assert one["size"] == len(bundle_bytes)
    assert one["manifest"]["version"] == "2.0"
    for who, expected in [("dev1", (403, "auth_failed")), (None, (401, "auth_required"))]:
        assert await error_code(cloud, f"{cloud.store_url}/v1/artifacts", who=who) == expected
        manifest_url = f"{cloud.store_url}/v1/artifacts/{artifact}/manifest"
        assert await error_code(cloud, manifest_url, who=who) == expected


async def test_store_urls_follow_a_moved_listener_unless_a_public_url_is_set(
    cloud_dir: CloudDir, tmp_path: Path
) -> None:
    keyring = Keyring.load(cloud_dir.keyring_dir)
    config = cloud_dir.config().with_overrides(artifacts_dir=tmp_path)
    moved = ArtifactStore(config, keyring=keyring, ssl_context=cloud_dir.server_context(), port=0)
    async with moved:
        assert moved.signer.presign("a" * 64, "dev1", 60).startswith(f"{moved.url}/v1/")
    public = config.with_overrides(store_public_url="https://ota.example.org")
    behind_proxy = ArtifactStore(
        public, keyring=keyring, ssl_context=cloud_dir.server_context(), port=0
    )
    async with behind_proxy:
        url = behind_proxy.signer.presign("a" * 64, "dev1", 60)
        assert url.startswith("https://ota.example.org/v1/")


async def test_store_head_with_range_and_unknown_methods(
    cloud: CloudEnv, bundle_bytes: bytes
) -> None:
    artifact = await cloud.upload_bytes(bundle_bytes)
    url = cloud.presign(artifact, "dev1", 60)
    async with cloud.http("dev1") as session:
        async with session.head(url, headers={"Range": "bytes=100-199"}) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes 100-199/{len(bundle_bytes)}"
            assert resp.headers["Content-Length"] == "100"
        async with session.delete(url) as resp:
            body = await resp.json()
            assert resp.status == 405 and body["error"]["code"] == "method_not_allowed"
            assert "GET" in resp.headers["Allow"]


async def test_store_stop_does_not_wait_long_for_a_stalled_download(
    cloud_dir: CloudDir, tmp_path: Path
) -> None:
    config = cloud_dir.config().with_overrides(artifacts_dir=tmp_path / "a")
    store = ArtifactStore(
        config,
        keyring=Keyring.load(cloud_dir.keyring_dir),
        ssl_context=cloud_dir.server_context(),
        port=0,
    )
    big = make_bundle(cloud_dir, tmp_path / "big.otab", image_size=16 * 1024 * 1024, seed=5)
    info = await asyncio.to_thread(store.repository.import_file, big, store.keyring)
    await store.start()
    url = urlsplit(store.signer.presign(info.artifact_id, "dev1", 60))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        store.port,
        ssl=cloud_dir.client_context(cloud_dir.device("dev1")),
        server_hostname="127.0.0.1",
    )
    writer.write(f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await reader.read(1024)  # the download started; the client now stalls
    started = time.monotonic()
    await store.stop()
    assert time.monotonic() - started < SHUTDOWN_GRACE + 3
    writer.transport.abort()


def test_store_sweeps_only_stale_upload_leftovers(tmp_path: Path) -> None:
    from otad.cloud.store import ArtifactRepository

    repo = ArtifactRepository(tmp_path)
    incoming = tmp_path / ".incoming"
    incoming.mkdir()
    stale, fresh = incoming / "a.part", incoming / "b.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - 2 * 24 * 3600
    os.utime(stale, (old, old))
    assert repo.sweep_incoming() == 1
    assert not stale.exists() and fresh.exists()
    assert ArtifactRepository(tmp_path / "none").sweep_incoming() == 0


def test_store_same_bundle_uploaded_twice_at_once_stores_it_once(
    cloud_dir: CloudDir, signed_bundle: Path, tmp_path: Path
) -> None:
    """Both uploads used one temp metadata file: whichever renamed it second failed, and the
    error blamed the source bundle ("cannot read ..."). Each upload now has its own."""
    keyring = Keyring.load(cloud_dir.keyring_dir)
    for n in range(20):  # the window is small: several rounds, each on a fresh directory
        repo_dir = tmp_path / f"artifacts-{n}"
        repo_dir.mkdir()
        repo = ArtifactRepository(repo_dir)
        results: list[object] = []

        def upload(repo: ArtifactRepository = repo, results: list[object] = results) -> None:
            try:
                results.append(repo.import_file(signed_bundle, keyring, uploader="fleet"))
            except Exception as exc:  # the assertion below names it
                results.append(exc)

        race(upload, upload)
        assert len(results) == 2 and not [r for r in results if isinstance(r, Exception)], results
        assert len(list(repo_dir.glob("*.bundle"))) == 1 and len(list(repo_dir.glob("*.json"))) == 1
        assert not list((repo_dir / ".incoming").glob("*"))

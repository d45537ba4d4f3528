"""The download HTTP/1.1 client against a hand-written TLS server: framing, limits, timeouts.

The server is raw asyncio writing exact bytes, so every malformed or hostile answer can be
played; TLS uses the test cloud's server certificate, so only the HTTP layer is under test.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otad.agent.httpclient import Response, Target, request
from otad.errors import DownloadProtocolError, DownloadTimeout

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)


def _answer(raw: bytes) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(raw)
        await writer.drain()

    return script


@asynccontextmanager
async def serve(cloud_dir: Any, script: Script) -> AsyncIterator[str]:
    tasks: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await script(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=cloud_dir.server_context())
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"https://127.0.0.1:{port}/bundle?X-Sig=abc"
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def client_context(cloud_dir: Any) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cloud_dir.ca_cert))


async def fetch(
    cloud_dir: Any, url: str, *, read_timeout: float = 5.0, block: int = 1 << 16
) -> tuple[Response, bytes]:
    response = await request(
        "GET",
        url,
        headers={"Accept-Encoding": "identity"},
        ssl_context=client_context(cloud_dir),
        connect_timeout=5.0,
        read_timeout=read_timeout,
        buffer_size=block,
    )
    try:
        body = b"".join([data async for data in response.chunks(block)])
    finally:
        await response.close()
    return response, body


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, pos = bytearray(), 0
    for size in sizes:
        piece = body[pos : pos + size]
        if not piece:
            break
        out += b"%x;ext=1\r\n" % len(piece) + piece + b"\r\n"
        pos += len(piece)
    if pos < len(body):
        out += b"%x\r\n" % (len(body) - pos) + body[pos:] + b"\r\n"
    return bytes(out + b"0\r\nX-Trailer: yes\r\n\r\n")


async def test_httpclient_content_length_body_and_headers(cloud_dir: Any) -> None:
    body = bytes(range(256)) * 1000
    raw = b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\nETag: "e1"\r\n\r\n' % len(body) + body
    async with serve(cloud_dir, _answer(raw)) as url:
        response, got = await fetch(cloud_dir, url)
    assert got == body
    assert response.status == 200 and response.content_length == len(body)
    assert response.headers.get("etag") == '"e1"'


async def test_httpclient_never_hands_out_bytes_past_content_length(cloud_dir: Any) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA-BYTES-NOBODY-ASKED-FOR"
    async with serve(cloud_dir, _answer(raw)) as url:
        _, got = await fetch(cloud_dir, url)
    assert got == b"hello"


async def test_httpclient_interim_100_continue_is_skipped(cloud_dir: Any) -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 206 Partial\r\nContent-Length: 2\r\n\r\nok"
    async with serve(cloud_dir, _answer(raw)) as url:
        response, got = await fetch(cloud_dir, url)
    assert (response.status, response.reason, got) == (206, "Partial", b"ok")


async def test_httpclient_read_until_close_without_length(cloud_dir: Any) -> None:
    raw = b"HTTP/1.0 200 OK\r\n\r\n" + b"z" * 70000
    async with serve(cloud_dir, _answer(raw)) as url:
        response, got = await fetch(cloud_dir, url)
    assert got == b"z" * 70000 and response.content_length is None


async def test_httpclient_body_cut_short_ends_early_without_error(cloud_dir: Any) -> None:
    # the caller compares the length and resumes with Range; the client only reports the bytes
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 10
    async with serve(cloud_dir, _answer(raw)) as url:
        _, got = await fetch(cloud_dir, url)
    assert got == b"a" * 10


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"HTTP/2 200 OK\r\n\r\n", "status line"),
        (b"ICY 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", "and"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "Content-Len"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n", "too long|too large"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n", "too large"),
        (b"HTTP/1.1 101 Switching\r\n\r\n", "switched"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "closed"),
    ],
)
async def test_httpclient_refuses_malformed_heads(cloud_dir: Any, raw: bytes, match: str) -> None:
    async with serve(cloud_dir, _answer(raw)) as url:
        with pytest.raises(DownloadProtocolError, match=match):
            await fetch(cloud_dir, url)


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nabc\r\n0\r\n\r\n",  # not hex
        b"3\r\nabcXX0\r\n\r\n",  # chunk not followed by CRLF
        b"5\r\nab",  # cut inside a chunk
        b"1" * 80 + b"\r\n",  # absurd chunk-size line
    ],
)
async def test_httpclient_refuses_malformed_chunked_bodies(cloud_dir: Any, body: bytes) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    async with serve(cloud_dir, _answer(raw)) as url:
        with pytest.raises(DownloadProtocolError):
            await fetch(cloud_dir, url)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    body=st.binary(min_size=0, max_size=5000),
    sizes=st.lists(st.integers(min_value=1, max_value=2000), max_size=8),
    block=st.integers(min_value=64, max_value=4096),
)
def test_httpclient_chunked_round_trips_any_split(
    cloud_dir: Any, body: bytes, sizes: list[int], block: int
) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(body, sizes)

    async def run() -> bytes:
        async with serve(cloud_dir, _answer(raw)) as url:
            _, got = await fetch(cloud_dir, url, block=block)
        return got

    assert asyncio.run(run()) == body


async def test_httpclient_silent_server_times_out(cloud_dir: Any) -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(30)

    async with serve(cloud_dir, stall) as url:
        with pytest.raises(DownloadTimeout, match="timed out"):
            await asyncio.wait_for(fetch(cloud_dir, url, read_timeout=0.3), 10)


async def test_httpclient_slow_but_live_server_is_not_a_timeout(cloud_dir: Any) -> None:
    # every byte arrives within read_timeout, the whole body takes several times longer
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n")
        for byte in b"abcdefgh":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)

    async with serve(cloud_dir, trickle) as url:
        _, got = await asyncio.wait_for(fetch(cloud_dir, url, read_timeout=0.3, block=1024), 10)
    assert got == b"abcdefgh"


async def test_httpclient_slow_server_yields_partial_blocks_as_bytes_arrive(
    cloud_dir: Any,
) -> None:
    # progress must show on a slow link: a block is handed out after LINGER, not when full
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4000\r\n\r\n")
        for _ in range(4):
            writer.write(b"q" * 1000)
            await writer.drain()
            await asyncio.sleep(0.3)

    async with serve(cloud_dir, slow) as url:
        response = await request(
            "GET",
            url,
            headers={},
            ssl_context=client_context(cloud_dir),
            connect_timeout=5.0,
            read_timeout=5.0,
        )
        try:
            pieces = [data async for data in response.chunks(1 << 20)]
        finally:
            await response.close()
    assert b"".join(pieces) == b"q" * 4000
    assert len(pieces) >= 3  # not one block at the end


async def test_httpclient_untrusted_certificate_fails_the_handshake(cloud_dir: Any) -> None:
    async with serve(cloud_dir, _answer(b"HTTP/1.1 204 No\r\n\r\n")) as url:
        with pytest.raises(ssl.SSLCertVerificationError):
            await request(
                "GET",
                url,
                headers={},
                ssl_context=ssl.create_default_context(),  # system store: not our CA
                connect_timeout=5.0,
                read_timeout=5.0,
            )


def test_httpclient_target_parsing() -> None:
    t = Target.parse("https://[::1]:8443/v1/a?x=1")
    assert (t.host, t.port, t.host_header, t.path) == ("::1", 8443, "[::1]:8443", "/v1/a?x=1")
    assert Target.parse("https://example.com").host_header == "example.com"
    assert Target.parse("https://example.com").path == "/"
    with pytest.raises(DownloadProtocolError, match="invalid URL") as info:
        Target.parse("https://127.0.0.1:99999/a?secret=1")
    assert "secret" not in info.value.message
    with pytest.raises(DownloadProtocolError, match="control"):
        Target.parse("https://example.com/a b")


async def test_httpclient_refuses_header_injection(cloud_dir: Any) -> None:
    with pytest.raises(DownloadProtocolError, match="header"):
        await request(
            "GET",
            "https://127.0.0.1:1/",
            headers={"Range": "bytes=0-\r\nX-Evil: 1"},
            ssl_context=client_context(cloud_dir),
            connect_timeout=1.0,
            read_timeout=1.0,
        )

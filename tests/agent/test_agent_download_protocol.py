"""The downloader against an HTTPS server scripted byte by byte: framing the real store never
produces (bodies without a length, cut trailers, short or overlong 206s, weak ETags, a head sent
a byte at a time) and a consumer slower than the read timeout."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from test_agent_download import agent_config, collect

from otad.agent.download import Downloader, Source, Transfer
from otad.agent.httpclient import _Connection
from otad.errors import DownloadProtocolError, DownloadTimeout, RetriesExhausted

BODY = bytes(range(256)) * 4096  # 1 MiB


@dataclass
class Exchange:
    """One request as the scripted server saw it, and the stream to answer it on."""

    index: int
    head: bytes
    writer: asyncio.StreamWriter

    def header(self, name: str) -> str | None:
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def reset(self) -> None:
        """Cut the connection with a TCP RST (no TLS close_notify)."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


@dataclass
class Scripted:
    origin: str
    exchanges: list[Exchange] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{self.origin}/bundle"


Answer = Callable[[Exchange], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted_server(cloud_dir: Any, answer: Answer) -> AsyncIterator[Scripted]:
    """A TLS server on loopback that hands each request head to ``answer``; the connection is
    closed (with close_notify) when ``answer`` returns, unless it cut it itself."""
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        exchange = Exchange(len(script.exchanges), b"", writer)
        try:
            exchange.head = await reader.readuntil(b"\r\n\r\n")
            script.exchanges.append(exchange)
            await answer(exchange)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def track(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(serve(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(track, "127.0.0.1", 0, ssl=cloud_dir.server_context())
    script = Scripted(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        yield script
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def head(status: str, *fields: str) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", *fields]) + "\r\n\r\n").encode("latin-1")


def whole(body: bytes, *fields: str) -> bytes:
    """The head of a 200 answer carrying all of ``body`` (the caller sends what it wants of it)."""
    return head("200 OK", f"Content-Length: {len(body)}", *fields)


async def cut_halfway(ex: Exchange, *fields: str) -> None:
    """Answer 200 with BODY's length, send half of it, then reset the connection."""
    ex.send(whole(BODY, *fields) + BODY[: len(BODY) // 2])
    await ex.writer.drain()
    ex.reset()


async def fetch_restarted_once(cloud_dir: Any, downloader: Downloader, answer: Answer) -> bytes:
    """Download from ``answer``, expecting: a cut, a resume that is refused, one restart."""
    async with scripted_server(cloud_dir, answer) as server:
        transfer = downloader.transfer(Source(server.url))
        got = await asyncio.wait_for(collect(transfer), 20)
    assert [ex.header("Range") is not None for ex in server.exchanges] == [False, True, False]
    assert transfer.restarts == 1
    return got


def send_the_rest(ex: Exchange, *fields: str, body: bytes = BODY) -> None:
    """Answer a ``Range: bytes=N-`` request with the rest of ``body`` as a 206."""
    start = ranged_from(ex)
    ex.send(
        head(
            "206 Partial Content",
            f"Content-Range: bytes {start}-{len(body) - 1}/{len(body)}",
            f"Content-Length: {len(body) - start}",
            *fields,
        )
        + body[start:]
    )


def ranged_from(exchange: Exchange) -> int:
    value = exchange.header("Range")
    assert value is not None and value.startswith("bytes=") and value.endswith("-")
    return int(value[len("bytes=") : -1])


def ranges_of(step: int) -> Answer:
    """Answer every request with a 206 of at most ``step`` bytes from where it asks."""

    async def answer(ex: Exchange) -> None:
        start = ranged_from(ex) if ex.header("Range") else 0
        last = min(start + step, len(BODY)) - 1
        ex.send(
            head(
                "206 Partial Content",
                f"Content-Range: bytes {start}-{last}/{len(BODY)}",
                f"Content-Length: {last + 1 - start}",
            )
            + BODY[start : last + 1]
        )

    return answer


@pytest.fixture
async def downloader(cloud_dir: Any) -> AsyncIterator[Downloader]:
    d = Downloader(agent_config(cloud_dir))
    yield d
    await d.close()


async def collect_declared(transfer: Transfer, size: int) -> bytes:
    """Like the agent: once the first bytes are in, the size the bundle header declares is set."""
    out = bytearray()
    async for offset, data in transfer.chunks():
        del out[offset:]
        out += data
        transfer.limit(size)
    return bytes(out)


async def test_download_body_without_length_cut_by_a_reset_is_resumed(
    cloud_dir: Any, downloader: Downloader
) -> None:
    async def answer(ex: Exchange) -> None:
        if ex.index == 0:
            ex.send(head("200 OK", 'ETag: "v1"') + BODY[: len(BODY) // 2])
            await ex.writer.drain()
            ex.reset()
        else:
            send_the_rest(ex)

    async with scripted_server(cloud_dir, answer) as server:
        transfer = downloader.transfer(Source(server.url))
        got = await asyncio.wait_for(collect(transfer), 20)
    assert got == BODY
    assert len(server.exchanges) == 2 and transfer.restarts == 0
    assert transfer.bytes_received == len(BODY)  # nothing fetched twice


async def test_download_body_without_length_closed_early_resumes_to_the_declared_size(
    cloud_dir: Any, downloader: Downloader
) -> None:
    """A close that looks clean (here: a TLS close_notify after half the body) ends a body
    without a length; the size the signed bundle header declares shows it is not all."""

    async def answer(ex: Exchange) -> None:
        if ex.index == 0:
            ex.send(head("200 OK", 'ETag: "v1"') + BODY[: len(BODY) // 2])
        else:
            send_the_rest(ex)

    async with scripted_server(cloud_dir, answer) as server:
        transfer = downloader.transfer(Source(server.url))
        got = await asyncio.wait_for(collect_declared(transfer, len(BODY)), 20)
    assert got == BODY
    assert [ex.header("Range") for ex in server.exchanges] == [None, f"bytes={len(BODY) // 2}-"]


async def test_download_consumer_slower_than_the_read_timeout_is_not_a_stalled_server(
    cloud_dir: Any,
) -> None:
    """The receive buffer fills while the disk is busy; the paused connection's silence is
    ours, not the server's."""
    downloader = Downloader(agent_config(cloud_dir, sock_read=0.5, retries=0))
    body = BODY * 4

    async def answer(ex: Exchange) -> None:
        ex.send(whole(body) + body)

    try:
        async with scripted_server(cloud_dir, answer) as server:
            out = bytearray()
            async for _, data in downloader.transfer(Source(server.url)).chunks():
                if not out:
                    await asyncio.sleep(1.2)  # a slow disk, longer than sock_read
                out += data
    finally:
        await downloader.close()
    assert bytes(out) == body


async def test_download_header_line_longer_than_the_smallest_buffers_is_read(
    cloud_dir: Any,
) -> None:
    """chunk_size and block_size at their minimum (4 KiB) once made a 6 KB header line spin the
    event loop forever: the line could never fit the receive buffer."""
    downloader = Downloader(agent_config(cloud_dir, chunk_size=4096, block_size=4096))

    async def answer(ex: Exchange) -> None:
        ex.send(head("200 OK", "X-Long: " + "a" * 6000, "Content-Length: 5") + b"hello")

    try:
        async with scripted_server(cloud_dir, answer) as server:
            got = await asyncio.wait_for(collect(downloader.transfer(Source(server.url))), 10)
    finally:
        await downloader.close()
    assert got == b"hello"


async def test_download_every_byte_then_a_cut_trailer_completes_without_fetching_again(
    cloud_dir: Any,
) -> None:
    """The body arrived whole, the cut came in the chunked trailer: the resume at the end gets
    416 with the entity's length = our offset, which means done (it once meant: start over,
    forever, the retry budget refilled by each full download)."""
    downloader = Downloader(agent_config(cloud_dir, retries=2))
    body = BODY[:200_000]

    async def answer(ex: Exchange) -> None:
        if ex.header("Range"):
            ex.send(head("416 Range Not Satisfiable", f"Content-Range: bytes */{len(body)}"))
            return
        ex.send(
            head("200 OK", "Transfer-Encoding: chunked", 'ETag: "v1"')
            + b"%x\r\n" % len(body)
            + body
            + b"\r\n0\r\n"  # no final empty line
        )
        await ex.writer.drain()
        ex.reset()

    try:
        async with scripted_server(cloud_dir, answer) as server:
            transfer = downloader.transfer(Source(server.url))
            got = await asyncio.wait_for(collect(transfer), 10)
    finally:
        await downloader.close()
    assert got == body
    assert len(server.exchanges) == 2 and transfer.restarts == 0


async def test_download_cut_at_the_same_place_after_each_restart_runs_out_of_retries(
    cloud_dir: Any,
) -> None:
    """Starting over and getting as far as before is no progress: the retry budget is not
    refilled by bytes fetched again."""
    downloader = Downloader(agent_config(cloud_dir, retries=2))

    async def answer(ex: Exchange) -> None:
        if ex.header("Range"):
            ex.send(head("416 Range Not Satisfiable", "Content-Range: bytes */999999999"))
            return
        ex.send(whole(BODY) + BODY[: len(BODY) // 2])
        await ex.writer.drain()
        ex.reset()

    try:
        async with scripted_server(cloud_dir, answer) as server:
            transfer = downloader.transfer(Source(server.url))
            with pytest.raises(RetriesExhausted):
                await asyncio.wait_for(collect(transfer), 10)
    finally:
        await downloader.close()
    assert len(server.exchanges) <= 6
    assert transfer.restarts >= 1  # a 416 for another length: our bytes may be stale


def cut_once_then_ranges(etag: str) -> Answer:
    """The first answer is cut halfway (a reset); later ones serve the rest as a 206."""

    async def answer(ex: Exchange) -> None:
        if ex.index == 0:
            await cut_halfway(ex, f"ETag: {etag}")
            return
        send_the_rest(ex, f"ETag: {etag}")

    return answer


async def test_download_weak_etag_is_compared_but_never_sent_in_if_range(
    cloud_dir: Any, downloader: Downloader
) -> None:
    async with scripted_server(cloud_dir, cut_once_then_ranges('W/"v1"')) as server:
        transfer = downloader.transfer(Source(server.url))
        got = await asyncio.wait_for(collect(transfer), 20)
    assert got == BODY
    assert server.exchanges[1].header("Range") is not None
    assert server.exchanges[1].header("If-Range") is None
    assert transfer.restarts == 0 and transfer.bytes_received == len(BODY)


async def test_download_strong_etag_goes_in_if_range(
    cloud_dir: Any, downloader: Downloader
) -> None:
    async with scripted_server(cloud_dir, cut_once_then_ranges('"v1"')) as server:
        assert await asyncio.wait_for(collect(downloader.transfer(Source(server.url))), 20) == BODY
    assert server.exchanges[1].header("If-Range") == '"v1"'


async def test_download_changed_etag_on_resume_starts_over(
    cloud_dir: Any, downloader: Downloader
) -> None:
    new = bytes(reversed(BODY))

    async def answer(ex: Exchange) -> None:
        if ex.index == 0:
            await cut_halfway(ex, 'ETag: "v1"')
        elif ex.header("Range"):  # a server that ignores If-Range and serves the new entity
            send_the_rest(ex, 'ETag: "v2"', body=new)
        else:
            ex.send(whole(new, 'ETag: "v2"') + new)

    assert await fetch_restarted_once(cloud_dir, downloader, answer) == new


async def test_download_206_body_longer_than_its_range_is_refused(
    cloud_dir: Any, downloader: Downloader
) -> None:
    async def answer(ex: Exchange) -> None:
        if ex.index == 0:
            await cut_halfway(ex)
            return
        start = ranged_from(ex)
        ex.send(  # declares 100 bytes, sends the rest of the entity
            head(
                "206 Partial Content",
                f"Content-Range: bytes {start}-{start + 99}/{len(BODY)}",
                f"Content-Length: {len(BODY) - start}",
            )
            + BODY[start:]
        )

    async with scripted_server(cloud_dir, answer) as server:
        transfer = downloader.transfer(Source(server.url))
        with pytest.raises(RetriesExhausted) as info:
            await asyncio.wait_for(collect(transfer), 20)
    assert isinstance(info.value.__cause__, DownloadProtocolError)
    assert "range" in str(info.value)
    # nothing of those answers was taken: all bytes are the cut first answer's
    assert 0 < transfer.offset < len(BODY) and transfer.bytes_received == transfer.offset


async def test_download_206_with_less_than_asked_continues_with_the_next_range(
    cloud_dir: Any,
) -> None:
    """A server may answer a range with less than asked; that is not a cut (no retry spent)."""
    downloader = Downloader(agent_config(cloud_dir, retries=0))
    answer = ranges_of(300_000)
    try:
        async with scripted_server(cloud_dir, answer) as server:
            transfer = Transfer(downloader, Source(server.url), len(BODY))
            got = await asyncio.wait_for(collect(transfer), 20)
    finally:
        await downloader.close()
    assert got == BODY
    assert len(server.exchanges) == 4  # 300k + 300k + 300k + the last 148,576 bytes


async def test_download_206_ranges_of_a_few_bytes_each_fall_below_the_minimum_rate(
    cloud_dir: Any,
) -> None:
    """Each answer is a valid 206 of 16 bytes, so no request fails and none is slow: only a
    rate measured across responses ends a download that would take 65,536 requests."""
    downloader = Downloader(agent_config(cloud_dir, retries=1, min_rate=100_000, rate_window=1.0))

    answer = ranges_of(16)

    try:
        async with scripted_server(cloud_dir, answer) as server:
            transfer = Transfer(downloader, Source(server.url), len(BODY))
            with pytest.raises(RetriesExhausted, match="minimum rate"):
                await asyncio.wait_for(collect(transfer), 20)
    finally:
        await downloader.close()
    # two windows of 1 s (the try and its one retry), not the whole body 16 bytes at a time
    assert 2 < len(server.exchanges) < len(BODY) // 16 // 4


async def test_download_head_sent_a_byte_at_a_time_times_out(cloud_dir: Any) -> None:
    """Each byte comes well within sock_read, so only a bound on the whole head stops a
    server that takes minutes to send it."""
    downloader = Downloader(agent_config(cloud_dir, sock_read=0.5, retries=0))

    async def answer(ex: Exchange) -> None:
        for byte in head("200 OK", "X-Slow: " + "a" * 200, "Content-Length: 2"):
            ex.send(bytes([byte]))
            await ex.writer.drain()
            await asyncio.sleep(0.05)

    try:
        async with scripted_server(cloud_dir, answer) as server:
            started = asyncio.get_running_loop().time()
            with pytest.raises(RetriesExhausted) as info:
                await asyncio.wait_for(collect(downloader.transfer(Source(server.url))), 10)
            took = asyncio.get_running_loop().time() - started
    finally:
        await downloader.close()
    assert isinstance(info.value.__cause__, DownloadTimeout)
    assert "head" in str(info.value)
    assert took < 3


async def test_connection_takes_a_read_into_a_full_buffer_without_losing_bytes() -> None:
    """asyncio asks for a buffer once more after the connection paused too late: it gets a
    larger one, with the unread bytes kept."""
    conn = _Connection(4096, 1.0)
    view = conn.get_buffer(-1)
    view[:] = b"x" * len(view)
    size = len(view)
    conn.buffer_updated(size)  # full; no transport to pause
    more = conn.get_buffer(-1)
    assert len(more) > 0
    more[:3] = b"abc"
    conn.buffer_updated(3)
    assert conn.take(size + 3) == b"x" * size + b"abc"
    del view, more


async def test_download_server_ignoring_range_with_a_short_body_runs_out_of_retries(
    cloud_dir: Any,
) -> None:
    """A truncated file behind a server that ignores Range: every answer starts over and ends
    cleanly short of the declared size. Retries, with backoff, not an endless loop."""
    downloader = Downloader(agent_config(cloud_dir, retries=2))

    async def answer(ex: Exchange) -> None:
        ex.send(head("200 OK") + BODY[: len(BODY) // 2])  # no length, ends with close_notify

    try:
        async with scripted_server(cloud_dir, answer) as server:
            transfer = downloader.transfer(Source(server.url))
            with pytest.raises(RetriesExhausted):
                await asyncio.wait_for(collect_declared(transfer, len(BODY)), 10)
    finally:
        await downloader.close()
    assert len(server.exchanges) == 3  # the first try and 2 retries


async def test_download_416_naming_our_offset_short_of_the_declared_size_starts_over(
    cloud_dir: Any, downloader: Downloader
) -> None:
    """The bundle header declared more than the server now has: not done, another entity."""

    async def answer(ex: Exchange) -> None:
        if ex.index == 0:
            ex.send(head("200 OK", 'ETag: "v1"') + BODY[: len(BODY) // 2])
            await ex.writer.drain()
            ex.reset()
        elif ex.header("Range"):
            ex.send(head("416 Range Not Satisfiable", f"Content-Range: bytes */{ranged_from(ex)}"))
        else:
            ex.send(whole(BODY, 'ETag: "v2"') + BODY)

    async with scripted_server(cloud_dir, answer) as server:
        transfer = downloader.transfer(Source(server.url))
        got = await asyncio.wait_for(collect_declared(transfer, len(BODY)), 20)
    assert got == BODY
    assert transfer.restarts == 1 and len(server.exchanges) == 3


async def test_download_short_206_ranges_of_unknown_length_go_on_until_the_end(
    cloud_dir: Any, downloader: Downloader
) -> None:
    """Cut before any length was known, then ranges of an entity whose length the server does
    not give (`bytes a-b/*`): ask for the rest until a 416 names our offset as the end."""
    step = 300_000

    async def answer(ex: Exchange) -> None:
        if ex.index == 0:
            ex.send(head("200 OK") + BODY[:400_000])
            await ex.writer.drain()
            ex.reset()
            return
        start = ranged_from(ex)
        if start >= len(BODY):
            ex.send(head("416 Range Not Satisfiable", f"Content-Range: bytes */{len(BODY)}"))
            return
        last = min(start + step, len(BODY)) - 1
        ex.send(
            head(
                "206 Partial Content",
                f"Content-Range: bytes {start}-{last}/*",
                f"Content-Length: {last + 1 - start}",
            )
            + BODY[start : last + 1]
        )

    async with scripted_server(cloud_dir, answer) as server:
        transfer = downloader.transfer(Source(server.url))
        got = await asyncio.wait_for(collect(transfer), 20)
    assert got == BODY
    assert server.exchanges[-1].header("Range") == f"bytes={len(BODY)}-"
    assert transfer.restarts == 0 and transfer.bytes_received == len(BODY)


async def test_download_weak_etag_missing_from_the_206_starts_over(
    cloud_dir: Any, downloader: Downloader
) -> None:
    async def answer(ex: Exchange) -> None:
        if ex.index == 0:
            await cut_halfway(ex, 'ETag: W/"v1"')
        elif ex.header("Range"):
            send_the_rest(ex)  # no ETag: nothing says these bytes continue the first ones
        else:
            ex.send(whole(BODY, 'ETag: W/"v1"') + BODY)

    assert await fetch_restarted_once(cloud_dir, downloader, answer) == BODY


async def test_download_restart_onto_a_smaller_entity_without_a_length_takes_it_whole(
    cloud_dir: Any, downloader: Downloader
) -> None:
    """After a restart nothing of the old entity's length applies to the new one."""
    new = bytes(reversed(BODY[:600_000]))

    async def answer(ex: Exchange) -> None:
        if ex.index == 0:
            await cut_halfway(ex)
        else:  # ignores Range: the new entity, read until the close
            ex.send(head("200 OK") + new)

    async with scripted_server(cloud_dir, answer) as server:
        transfer = downloader.transfer(Source(server.url))
        got = await asyncio.wait_for(collect(transfer), 20)
    assert got == new
    assert transfer.restarts == 1 and transfer.total == len(new)

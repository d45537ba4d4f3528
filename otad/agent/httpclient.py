"""A small HTTP/1.1 client over asyncio streams and TLS, just what bundle downloads need.

Why not aiohttp: importing it costs ~17 MiB of resident memory (its module graph: cookies,
email, attrs, tracing, happy eyeballs ...), almost half the 40 MiB an installing agent may use,
and its per-chunk machinery is a third of the event loop's CPU in a download. Downloads need
little of HTTP: one request per connection (``Connection: close``, so no pool a server could
poison by writing past its length), ``Content-Length``, chunked or read-until-close bodies,
no redirects followed here (the caller decides), no cookies, no compression.

Every wait on the network is bounded: ``connect_timeout`` covers TCP connect plus the TLS
handshake, ``read_timeout`` any wait without a new byte (like aiohttp's ``sock_read``). Framing
errors raise :class:`~otad.errors.DownloadProtocolError`, timeouts
:class:`~otad.errors.DownloadTimeout`; OS and TLS errors propagate for the caller to translate.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit

from otad.errors import DownloadProtocolError, DownloadTimeout
from otad.logs import redact_url

__layer__ = "adapter"

# The receive buffer: the transport pauses when it is full, so a fast server holds at most this
# much in the client while the disk catches up; the body comes out in blocks of up to this size.
BUFFER_SIZE = 1 << 20
# A block of the body waits at most this long for more bytes before it is handed out partly
# filled, so a slow link still shows steady progress (and the minimum-rate check still runs).
LINGER = 0.05
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
_STATUS_LINE = re.compile(rb"^HTTP/1\.([01]) (\d{3})(?: ([^\r\n]*))?\r?\n$")
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_CHUNK_SIZE = re.compile(rb"^([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r?\n$")
_FORBIDDEN_IN_TARGET = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True)
class Target:
    """Where a request goes: parsed once, validated (no control characters, a real port)."""

    host: str
    port: int
    host_header: str
    path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        try:
            parts = urlsplit(url)
            port = parts.port or 443
        except ValueError as exc:
            # urllib's message names the problem ("Port out of range"), never the URL
            raise DownloadProtocolError(f"download: invalid URL {redact_url(url)}: {exc}") from exc
        host = parts.hostname
        if not host:
            raise DownloadProtocolError("download: URL has no host")
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        if _FORBIDDEN_IN_TARGET.search(path) or _FORBIDDEN_IN_TARGET.search(host):
            raise DownloadProtocolError("download: URL contains spaces or control characters")
        name = f"[{host}]" if ":" in host else host
        host_header = name if port == 443 else f"{name}:{port}"
        return cls(host=host, port=port, host_header=host_header, path=path)


@dataclass
class Headers:
    """Response headers: names case-insensitive, repeated fields kept in order."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in reversed(self.items):
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.items if key == name]


class _Connection(asyncio.BufferedProtocol):
    """The receiving end of one connection: TLS decrypts straight into one reused buffer.

    With a buffered protocol, asyncio's TLS layer writes the plaintext into the buffer we hand
    it (no per-record ``bytes`` objects, no joins, no stream buffer); the consumer copies out
    whole blocks. When the buffer is full the transport is paused, so the client never holds
    more than ``capacity`` bytes however fast the server is.
    """

    def __init__(self, capacity: int, read_timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        # room for the longest head line: readline needs a line whole in the buffer
        self._buf = bytearray(max(capacity, MAX_HEAD_BYTES))
        self._view = memoryview(self._buf)
        self._start = 0  # unread bytes are _buf[_start:_fill]
        self._fill = 0
        self.read_timeout = read_timeout
        self._last_data = self._loop.time()
        self._want = 0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.error: BaseException | None = None

    # --- protocol side (called by the event loop) ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._fill == len(self._buf):
            self._compact()
            if self._fill == len(self._buf):  # paused too late: take this read, then stop
                # a new, larger buffer: the old one may still be exported to the transport,
                # so it cannot be resized in place
                grown = bytearray(len(self._buf) + 64 * 1024)
                grown[: self._fill] = self._view[: self._fill]
                self._buf, self._view = grown, memoryview(grown)
        return self._view[self._fill :]

    def buffer_updated(self, nbytes: int) -> None:
        self._fill += nbytes
        self._last_data = self._loop.time()
        if self._fill >= len(self._buf) and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        if self._fill - self._start >= self._want:
            self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _compact(self) -> None:
        if self._start:
            left = self._fill - self._start
            self._buf[:left] = self._view[self._start : self._fill]
            self._start, self._fill = 0, left

    # --- consumer side --------------------------------------------------------------------------

    @property
    def available(self) -> int:
        return self._fill - self._start

    async def wait(self, want: int, linger: float | None = None) -> None:
        """Until ``want`` bytes are buffered or the peer is done; with ``linger``, also return
        once bytes have been buffered for ``linger`` seconds (a slow server still makes
        progress). DownloadTimeout after ``read_timeout`` without a new byte."""
        want = min(want, len(self._buf))
        since = self._loop.time() if self.available else None  # bytes buffered since
        while self.available < want and not self.eof:
            now = self._loop.time()
            if linger is not None and self.available:
                if since is None:
                    since = now
                if now - since >= linger:
                    return
            if self._fill == len(self._buf):
                self._compact()
            self._resume()
            left = self.read_timeout - (now - self._last_data)
            if left <= 0:
                raise DownloadTimeout(
                    "download: read timed out (the server sent nothing within sock_read)"
                )
            wake_at, patience = want, left
            if linger is not None:
                if since is None:
                    wake_at = self.available + 1  # the first byte starts the linger
                else:
                    patience = min(left, since + linger - now)
            waiter = self._loop.create_future()
            self._waiter, self._want = waiter, wake_at
            timer = self._loop.call_later(patience, _resolve, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter, self._want = None, 0

    def take(self, size: int) -> bytes:
        size = min(size, self.available)
        data = bytes(self._view[self._start : self._start + size])
        self._start += size
        if self._start == self._fill:
            self._start = self._fill = 0
            self._resume()
        return data

    def find(self, needle: bytes, limit: int) -> int:
        """Index (relative to the unread start) just past ``needle``, or -1."""
        end = min(self._fill, self._start + limit)
        at = self._buf.find(needle, self._start, end)
        return -1 if at < 0 else at - self._start + len(needle)

    def _resume(self) -> None:
        if self._paused and self._fill < len(self._buf) and self.transport is not None:
            self._paused = False
            # the server could not send while we did not read: its silence counts from now
            self._last_data = self._loop.time()
            self.transport.resume_reading()

    async def readline(self, limit: int) -> bytes:
        """One line ending in LF, at most ``limit`` bytes (DownloadProtocolError otherwise)."""
        while True:
            end = self.find(b"\n", limit)
            if end >= 0:
                return self.take(end)
            if self.available >= min(limit, len(self._buf)):
                raise DownloadProtocolError("download: response line too long")
            if self.eof:
                raise DownloadProtocolError("download: connection closed inside a response line")
            await self.wait(self.available + 1)

    def close(self, *, abort: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if abort:
            transport.abort()
        else:
            transport.close()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Response:
    """One response on its own connection; iterate :meth:`chunks` or :meth:`read`, then close."""

    def __init__(
        self,
        conn: _Connection,
        status: int,
        reason: str,
        headers: Headers,
        *,
        head_only: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self._conn = conn
        self._complete = False
        self.chunked = False
        self.content_length: int | None = None
        self._frame(head_only)

    def _frame(self, head_only: bool) -> None:
        codings = [
            c.strip().lower()
            for v in self.headers.get_all("transfer-encoding")
            for c in v.split(",")
        ]
        lengths = {v.strip() for v in self.headers.get_all("content-length")}
        if codings:
            if lengths:
                # both framings: the classic request-smuggling ambiguity, refuse it
                raise DownloadProtocolError(
                    "download: response has Content-Length and Transfer-Encoding"
                )
            if codings != ["chunked"]:
                raise DownloadProtocolError(f"download: unsupported Transfer-Encoding {codings}")
            self.chunked = True
        elif lengths:
            if len(lengths) > 1 or not all(v.isdigit() for v in lengths):
                raise DownloadProtocolError("download: invalid Content-Length")
            self.content_length = int(lengths.pop())
        if head_only or self.status in (204, 304) or 100 <= self.status < 200:
            self.content_length = 0
            self.chunked = False

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        """The body in blocks of up to ``size`` bytes (smaller when the server is slow: a block
        waits at most LINGER for more bytes); ends at the body's end.

        A body cut short ends early without an error: the caller compares what it got with
        the length it expects (and knows the offset to resume from).
        """
        if self.chunked:
            async for data in self._chunked(size):
                yield data
        else:
            left = self.content_length
            while left is None or left > 0:
                want = size if left is None else min(size, left)
                data = await self._read(want)
                if not data:
                    if left is None and self._conn.error is None:
                        self._complete = True
                    return
                if left is not None:
                    left -= len(data)
                yield data
        self._complete = True

    async def read(self, limit: int) -> bytes:
        """The whole body (at most ``limit`` bytes, else DownloadProtocolError)."""
        parts: list[bytes] = []
        got = 0
        async for data in self.chunks(64 * 1024):
            got += len(data)
            if got > limit:
                raise DownloadProtocolError(f"download: response body larger than {limit} bytes")
            parts.append(data)
        if self.content_length is not None and got < self.content_length:
            raise DownloadProtocolError("download: response body cut short")
        return b"".join(parts)

    async def _chunked(self, size: int) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            match = _CHUNK_SIZE.match(await conn.readline(64))
            if match is None:
                raise DownloadProtocolError("download: invalid chunk header")
            left = int(match.group(1), 16)
            if left == 0:
                break
            while left:
                data = await self._read(min(size, left))
                if not data:
                    raise DownloadProtocolError("download: body cut short inside a chunk")
                left -= len(data)
                yield data
            if await conn.readline(2) not in (b"\r\n", b"\n"):
                raise DownloadProtocolError("download: chunk not followed by CRLF")
        try:
            async with asyncio.timeout(conn.read_timeout):  # a trickled trailer, as for the head
                for _ in range(MAX_HEADERS):  # trailer fields, up to the empty line
                    if await conn.readline(8192) in (b"\r\n", b"\n"):
                        return
        except TimeoutError as exc:
            raise DownloadTimeout("download: trailer not complete within the read timeout") from exc
        raise DownloadProtocolError("download: too many trailer fields")

    async def _read(self, size: int) -> bytes:
        conn = self._conn
        await conn.wait(size, LINGER)
        if not conn.available and conn.eof and isinstance(conn.error, ssl.SSLError):
            raise conn.error  # a TLS failure is not a clean end; the caller translates it
        return conn.take(size)

    @property
    def complete(self) -> bool:
        """The whole body was read (for a body without a length: the peer closed cleanly)."""
        return self._complete

    async def close(self) -> None:
        """Close the connection: politely after a complete body, cut it otherwise."""
        self._conn.close(abort=not self._complete)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._complete = False
        await self.close()


async def request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    body: bytes | None = None,
    ssl_context: ssl.SSLContext,
    connect_timeout: float,
    read_timeout: float,
    buffer_size: int = BUFFER_SIZE,
) -> Response:
    """Send one request on a fresh TLS connection and read the response head."""
    target = Target.parse(url)
    lines = [
        f"{method} {target.path} HTTP/1.1",
        f"Host: {target.host_header}",
        "Connection: close",
        "User-Agent: otad",
    ]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or not _TOKEN.match(name.encode()):
            raise DownloadProtocolError(f"download: invalid request header {name!r}")
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            transport, conn = await loop.create_connection(
                lambda: _Connection(buffer_size, read_timeout),
                target.host,
                target.port,
                ssl=ssl_context,
                server_hostname=target.host,
                ssl_handshake_timeout=connect_timeout,
            )
    except TimeoutError as exc:
        raise DownloadTimeout("download: connect or TLS handshake timed out") from exc
    try:
        transport.write(head + body if body else head)
        try:
            # read_timeout bounds each silence; this bounds a head trickled a byte at a time
            async with asyncio.timeout(read_timeout):
                status, reason, fields = await _read_head(conn)
        except TimeoutError as exc:
            raise DownloadTimeout(
                f"download: response head not complete within {read_timeout:g} s"
            ) from exc
        return Response(conn, status, reason, fields, head_only=method == "HEAD")
    except BaseException:
        conn.close(abort=True)
        raise


async def _read_head(conn: _Connection) -> tuple[int, str, Headers]:
    budget = MAX_HEAD_BYTES
    while True:  # interim 1xx answers (100 Continue, 103 Early Hints) come before the real one
        line = await conn.readline(budget)
        budget -= len(line)
        match = _STATUS_LINE.match(line)
        if match is None:
            raise DownloadProtocolError("download: not an HTTP/1.x status line")
        status = int(match.group(2))
        reason = (match.group(3) or b"").decode("latin-1")
        fields = Headers()
        while True:
            if budget <= 0 or len(fields.items) > MAX_HEADERS:
                raise DownloadProtocolError("download: response head too large")
            line = await conn.readline(budget)
            budget -= len(line)
            if line in (b"\r\n", b"\n"):
                break
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.match(name):
                # also refuses obsolete line folding (a line starting with whitespace)
                raise DownloadProtocolError("download: malformed response header")
            fields.items.append((name.decode("ascii").lower(), value.strip().decode("latin-1")))
        if 100 <= status < 200 and status != 101:
            continue
        if status == 101:
            raise DownloadProtocolError("download: server switched protocols")
        return status, reason, fields

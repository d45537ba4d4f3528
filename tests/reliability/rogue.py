"""A hand-written HTTP/1.1 server over TLS (the cloud CA's server certificate) or plain TCP that
plays a scripted misbehaviour on every connection: the "small asyncio server the tests own" of
issue 8's network faults. Used by test_network_faults.py and test_resource_limits.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

ENDLESS_CAP = 64 * 1024 * 1024  # the rogue server's own bound: a test loop is never endless

Behaviour = Callable[["RogueServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RogueServer:
    """One TCP listener (TLS with the cloud CA's server cert unless ``tls=False``) that plays
    ``behaviour`` on every connection and counts what it did."""

    def __init__(self, behaviour: Behaviour, body: bytes, ssl_context: Any) -> None:
        self.behaviour = behaviour
        self.body = body
        self.ssl_context = ssl_context
        self.connections = 0
        self.sent = 0
        self.peer_closed = 0  # the client hung up on us (the endless cases end that way)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/bundle"

    async def start(self) -> RogueServer:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, ssl=self.ssl_context
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self.behaviour(self, reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            self.peer_closed += 1
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()
            self._tasks.discard(task)

    async def send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if writer.is_closing():
            raise ConnectionResetError("rogue: the client closed the connection")
        writer.write(data)
        await writer.drain()
        self.sent += len(data)
        # Once a write found the socket reset, asyncio drops later writes and drain() returns
        # without suspending (nothing is buffered): without this yield the connection-lost
        # callbacks never run and a sending loop spins to ENDLESS_CAP on a dead connection.
        await asyncio.sleep(0)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)


def head(length: int | None, *, chunked: bool = False) -> bytes:
    lines = ["HTTP/1.1 200 OK", "Content-Type: application/octet-stream", 'ETag: "rogue"']
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"

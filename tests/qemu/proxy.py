"""A TCP relay between QEMU's guestfwd and the artifact store, counting what it relays.

The QEMU tests point the guest's store address at this relay instead of the store, so they know
how far a download has got without asking the guest, and can slow it down: the power-cut test
throttles the download so "kill QEMU in the middle of the slot write" is a deterministic point
(bytes relayed between two bounds), not a race against the guest's speed. TLS passes through
untouched (the relay never sees plaintext).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

CHUNK = 64 * 1024


class Relay:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.to_guest = 0  # bytes relayed server -> guest, all connections together
        self.rate: float | None = None  # bytes/s limit on server -> guest, None = unlimited
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        if self._server is not None:
            with contextlib.suppress(OSError):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, count=False),
                self._pipe(up_reader, writer, count=True),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, count: bool
    ) -> None:
        started = time.monotonic()
        sent = 0
        while True:
            data = await src.read(CHUNK)
            if not data:
                with contextlib.suppress(OSError):
                    dst.write_eof()
                return
            dst.write(data)
            await dst.drain()
            if count:
                self.to_guest += len(data)
                sent += len(data)
                if self.rate:
                    # Sleep until this connection's average is back under the limit.
                    ahead = sent / self.rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(min(ahead, 5.0))

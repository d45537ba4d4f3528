"""Entering an aiomqtt client without leaking what a failed connect leaves open.

aiomqtt 2.x's ``Client.__aenter__`` runs paho's blocking connect in an executor thread, which
opens the socket and queues, through ``call_soon_threadsafe``, its registration with the event
loop and a task that services it once a second; then it waits for the CONNACK. When that wait
times out or the caller is cancelled, ``__aenter__`` raises and nothing closes the socket or
stops the task: they live as long as the process. A broker that accepts connections but does
not answer (overloaded, paused) cost the agent a file descriptor and a task per reconnect
attempt, 32 descriptors in 6 s at a 0.3 s timeout. A cancellation that comes while the connect
thread still runs (the agent stops during a reconnect) is worse: the socket does not exist yet,
and the thread opens and registers it afterwards.

:func:`enter` closes the half-open connection on any failure, once the connect thread is done
with it, and after the loop has run the registrations that thread queued (closing before them
makes them fail with "Bad file descriptor").
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from types import TracebackType

import aiomqtt

__layer__ = "adapter"


class _ConnectGuard:
    """Tracks a client's connect thread so that an abandoned client is closed exactly once,
    after that thread (and the loop callbacks it queued) are done with the socket."""

    def __init__(self, client: aiomqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop
        self._lock = threading.Lock()
        self._connecting = False
        self._abandoned = False

    def wrap(self, connect: Callable[[], None]) -> Callable[[], None]:
        def guarded() -> None:
            with self._lock:
                self._connecting = True
            try:
                connect()
            finally:
                with self._lock:
                    self._connecting = False
                    abandoned = self._abandoned
                if abandoned:
                    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left
                        self._loop.call_soon_threadsafe(_close, self._client)

        return guarded

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            connecting = self._connecting
        if not connecting:
            # call_soon: after the registrations a finished connect thread queued
            self._loop.call_soon(_close, self._client)


async def enter(client: aiomqtt.Client) -> aiomqtt.Client:
    """``await client.__aenter__()``; on any failure, close the half-open connection."""
    guard = _ConnectGuard(client, asyncio.get_running_loop())
    connect = getattr(client, "_client_connect", None)  # aiomqtt 2.x; < 3 is pinned
    if callable(connect):
        client._client_connect = guard.wrap(connect)  # type: ignore[method-assign]
    client._otad_guard = guard  # type: ignore[attr-defined]
    try:
        return await client.__aenter__()
    except BaseException:
        _abandon(client)
        raise


def _abandon(client: aiomqtt.Client) -> None:
    """Close the connection under ``client`` (at once, or when its connect thread ends)."""
    for name in ("_connected", "_disconnected"):
        future = getattr(client, name, None)
        if isinstance(future, asyncio.Future):
            # nobody waits on an abandoned client: its errors, now or later, were seen
            future.add_done_callback(_retrieve)
    guard = getattr(client, "_otad_guard", None)
    if isinstance(guard, _ConnectGuard):
        guard.abandon()
    else:
        _close(client)


def _close(client: aiomqtt.Client) -> None:
    paho = getattr(client, "_client", None)
    close = getattr(paho, "_sock_close", None)  # paho 2.x
    if callable(close):
        close()


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class Connected:
    """``async with Connected(client) as client``: ``async with client`` with :func:`enter`."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self._client = client

    async def __aenter__(self) -> aiomqtt.Client:
        return await enter(self._client)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.__aexit__(exc_type, exc, tb)

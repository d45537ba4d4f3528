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
    """Tracks one connect attempt's thread so that an abandoned client is closed exactly once,
    after that thread (and the loop callbacks it queued) are done with the socket.

    The thread is in one of three states: not started (abandoning it means it never connects),
    running (it closes the client itself when it ends), done (the loop closes the client, after
    the callbacks the thread queued)."""

    _NOT_STARTED, _RUNNING, _DONE = range(3)

    def __init__(self, client: aiomqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop
        self._lock = threading.Lock()
        self._state = self._NOT_STARTED
        self._abandoned = False

    def wrap(self, connect: Callable[[], None]) -> Callable[[], None]:
        def guarded() -> None:
            with self._lock:
                if self._abandoned:
                    self._state = self._DONE
                    return  # given up before the thread got to it: never connect
                self._state = self._RUNNING
            try:
                connect()
            finally:
                with self._lock:
                    self._state = self._DONE
                    abandoned = self._abandoned
                if abandoned:
                    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left
                        self._loop.call_soon_threadsafe(_close, self._client)

        return guarded

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            state = self._state
        if state == self._DONE:
            # call_soon: after the registrations the finished connect thread queued
            self._loop.call_soon(_close, self._client)


async def enter(client: aiomqtt.Client) -> aiomqtt.Client:
    """``await client.__aenter__()``; on any failure, close the half-open connection."""
    guard = None
    connect = getattr(type(client), "_client_connect", None)  # aiomqtt 2.x; < 3 is pinned
    if callable(connect):
        # this attempt's guard only: the executor keeps its reference to the wrapper, and
        # a later `enter` of the same client starts from aiomqtt's own method again
        guard = _ConnectGuard(client, asyncio.get_running_loop())
        client._client_connect = guard.wrap(connect.__get__(client))  # type: ignore[method-assign]
    try:
        return await client.__aenter__()
    except BaseException:
        _abandon(client, guard)
        raise
    finally:
        client.__dict__.pop("_client_connect", None)


def _abandon(client: aiomqtt.Client, guard: _ConnectGuard | None) -> None:
    """Close the connection under ``client`` (at once, or when its connect thread ends)."""
    for name in ("_connected", "_disconnected"):
        future = getattr(client, name, None)
        if isinstance(future, asyncio.Future):
            # nobody waits on an abandoned client: its errors, now or later, were seen
            future.add_done_callback(_retrieve)
    if guard is not None:
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

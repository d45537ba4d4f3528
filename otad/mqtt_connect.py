"""Entering an aiomqtt client without leaking what a failed connect leaves open.

aiomqtt 2.x's ``Client.__aenter__`` opens paho's socket (and starts a task that services it
once a second), then waits for the CONNACK. When that wait times out or is cancelled it raises,
and nothing closes the socket or stops the task: they live as long as the process. A broker
that accepts connections but does not answer (overloaded, paused) cost the agent a file
descriptor and a task per reconnect attempt; 32 descriptors in 6 s at a 0.3 s timeout.
:func:`enter` closes paho's socket when the connect fails, which also makes aiomqtt stop that
task (its socket-close callback).
"""

from __future__ import annotations

import asyncio
from types import TracebackType

import aiomqtt

__layer__ = "adapter"


async def enter(client: aiomqtt.Client) -> aiomqtt.Client:
    """``await client.__aenter__()``; on any failure, close the half-open connection first."""
    try:
        return await client.__aenter__()
    except BaseException:
        abandon(client)
        raise


def abandon(client: aiomqtt.Client) -> None:
    """Close paho's socket under ``client`` (nothing to do if there is none)."""
    paho = getattr(client, "_client", None)
    close = getattr(paho, "_sock_close", None)  # paho 2.x; aiomqtt < 3 is pinned
    if callable(close):
        close()
    for name in ("_connected", "_disconnected"):
        future = getattr(client, name, None)
        if isinstance(future, asyncio.Future) and future.done() and not future.cancelled():
            future.exception()  # nobody waits on an abandoned client: its error was seen


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

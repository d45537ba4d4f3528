"""Blocking steps run in a thread that a cancellation cannot leave half done behind its caller.

``asyncio.to_thread`` returns at a cancellation while its thread goes on: a journal write then
lands after the caller journaled the cancellation (the cancelled job comes back at the next
start), a slot opened meanwhile stays open with nobody to close it, a slot is closed while the
re-read of it still runs. :func:`settled` waits for the thread first, then raises the
cancellation, so the caller's clean-up always comes after the step it cleans up.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from typing import Any, TypeVar

__layer__ = "adapter"

T = TypeVar("T")


async def settled(
    fn: Callable[..., T],
    /,
    *args: Any,
    undo: Callable[[T], object] | None = None,
    **kwargs: Any,
) -> T:
    """``fn(*args, **kwargs)`` in a thread (with the caller's context, like ``asyncio.to_thread``).
    Cancelled meanwhile: wait for it, ``undo(result)`` if it returned (in a thread too), then
    raise the cancellation."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    future: asyncio.Future[T] = loop.run_in_executor(None, call)
    if not await outlast(future):
        return future.result()
    if undo is not None and not future.cancelled() and future.exception() is None:
        await settled(undo, future.result())
    raise asyncio.CancelledError


async def outlast(future: asyncio.Future[Any]) -> bool:
    """Wait until ``future`` is done, however often the caller is cancelled meanwhile; whether
    it was (the caller raises the cancellation once it has cleaned up)."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled = True
        except BaseException:
            break  # the future holds its exception for the caller
    return cancelled or future.cancelled()

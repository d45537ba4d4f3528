"""The disk side of a download: bundle bytes in, verified image bytes written to the slot.

:class:`DiskPipe` runs the streaming verifier and the slot writes in a thread behind a bounded
queue; :class:`FileTransfer` reads a local bundle the way a download is read.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from otad.agent.config import DownloadConfig
from otad.agent.crashpoints import CrashPoints
from otad.agent.download import Source
from otad.agent.settled import outlast, settled
from otad.agent.slots import SlotWriter
from otad.bundle import Manifest, StreamVerifier
from otad.errors import DesiredStateInvalid

__layer__ = "adapter"

_END = object()
_RESET = object()


class DiskPipe:
    """Bundle bytes in (from the event loop), verified image bytes out to the slot (in a thread).

    The event loop hands chunks over through an unbounded ``queue.Queue`` but never has more
    than ``depth`` chunks in it (an asyncio semaphore released by the thread), so the network is
    back-pressured by the disk and memory stays bounded. The thread runs ``StreamVerifier.feed``
    (payload hash + decompression) and the slot writes, so neither ever blocks the loop.

    ``checkpoint`` is the latest (payload offset, image offset) an install interrupted now could
    resume from: the end of a zstd frame whose image bytes are all on the medium. A pipe for a
    resumed install starts with ``verifier`` (made with ``resume_from``), ``writer`` opened at
    the image offset and ``written`` set to it; a restart of the download from byte 0 then
    makes a fresh verifier and writer as usual.
    """

    def __init__(
        self,
        make_verifier: Callable[[], StreamVerifier],
        make_writer: Callable[[], SlotWriter],
        writer: SlotWriter,
        depth: int,
        crash: CrashPoints,
        on_manifest: Callable[[Manifest], None],
        *,
        verifier: StreamVerifier | None = None,
        written: int = 0,
    ) -> None:
        self.on_manifest = on_manifest
        self.make_verifier = make_verifier
        self.make_writer = make_writer
        self.verifier = verifier if verifier is not None else make_verifier()
        self.writer: SlotWriter | None = writer
        self.crash = crash
        self.written = written
        self.checkpoint: tuple[int, int] | None = None
        self._frame_ends: deque[tuple[int, int]] = deque(maxlen=256)
        self.error: BaseException | None = None
        self._manifest: Manifest | None = None
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(depth)
        self._queue: queue.Queue[object] = queue.Queue()
        self._abort = threading.Event()
        self._marks = [25, 50, 75]
        self._resets_asked = self._resets_done = 0
        self._thread_done: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name="otad-slot-writer", daemon=True)
        self._thread.start()

    async def put(self, data: bytes) -> None:
        await self._slots.acquire()
        if self.error is not None:
            self._slots.release()
            raise self.error
        self._queue.put(data)

    def reset(self) -> None:
        """The download restarted at offset 0: start the verifier and the slot over."""
        self._resets_asked += 1
        self._queue.put(_RESET)

    @property
    def current(self) -> bool:
        """The thread has started over as often as asked: ``verifier`` and ``checkpoint`` are
        of the entity now downloading (until then they still describe the one before)."""
        return self._resets_done == self._resets_asked

    async def finish(self) -> Manifest:
        """The verified manifest once the thread has written everything queued (the verifier's
        last checks, which wait for its hashing thread, run in the pipe's thread too)."""
        self._queue.put(_END)
        await asyncio.shield(self._thread_done)
        if self.error is not None:
            raise self.error
        assert self._manifest is not None
        return self._manifest

    async def abort(self) -> None:
        """Stop the thread, then close the verifier and the slot (in a thread: closing the
        slot waits for its read-back step). A cancellation meanwhile is raised only after
        that: the slot is never closed under a write, and never left open."""
        self._abort.set()
        self._queue.put(_END)
        cancelled = await outlast(self._thread_done)
        await settled(self._close)
        if cancelled:
            raise asyncio.CancelledError

    def _close(self) -> None:
        self.verifier.close()
        self._close_writer()

    def _close_writer(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _release(self) -> None:
        self._loop.call_soon_threadsafe(self._slots.release)

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    if self.error is None and not self._abort.is_set():
                        try:
                            self._manifest = self.verifier.finish()
                        except BaseException as exc:
                            self.error = exc
                    return
                if item is _RESET:
                    try:
                        self._start_over()
                    except BaseException as exc:
                        self.error = exc
                    self._resets_done += 1
                    continue
                try:
                    if self.error is None and not self._abort.is_set():
                        self._process(item)  # type: ignore[arg-type]
                except BaseException as exc:
                    self.error = exc
                finally:
                    self._release()
        finally:
            self._loop.call_soon_threadsafe(_set_done, self._thread_done)

    def _start_over(self) -> None:
        self.verifier.close()
        self.verifier = self.make_verifier()
        self.written = 0
        self.checkpoint = None
        self._frame_ends.clear()
        self._close_writer()

    def _process(self, data: bytes) -> None:
        had_manifest = self.verifier.manifest is not None
        outputs = self.verifier.feed(data)  # the preamble is authenticated before this returns
        if not had_manifest and self.verifier.manifest is not None:
            self.on_manifest(self.verifier.manifest)  # before the first byte is written
        for out in outputs:
            if self.writer is None:
                # opened only now: the manifest is verified, nothing was written before this
                self.writer = self.make_writer()
            self.writer.write(out)
            self.written += len(out)
            manifest = self.verifier.manifest
            if self._marks and manifest is not None and manifest.image_size:
                percent = self.written * 100 // manifest.image_size
                while self._marks and percent >= self._marks[0]:
                    self.crash.hit(f"write:{self._marks.pop(0)}")
        self._advance_checkpoint()

    def _advance_checkpoint(self) -> None:
        point = self.verifier.resume_point
        if point is not None and (not self._frame_ends or self._frame_ends[-1] != point):
            self._frame_ends.append(point)
        if self.writer is None:
            return
        durable = self.writer.durable_offset
        while self._frame_ends and self._frame_ends[0][1] <= durable:
            self.checkpoint = self._frame_ends.popleft()


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class FileTransfer:
    """A local bundle file read like a download (``otad agent install BUNDLE``)."""

    def __init__(self, path: Path, settings: DownloadConfig) -> None:
        self.path = path
        # whole disk blocks, like a download hands them over: no joining in the pump
        self.chunk_size = max(settings.chunk_size, settings.block_size)
        self.offset = 0
        self.total: int | None = None
        self.bytes_received = 0
        self.resumes = 0
        self.restarts = 0

    def limit(self, size: int) -> None:
        if self.total is not None and size != self.total:
            raise DesiredStateInvalid(
                f"install: {self.path} has {self.total} bytes, its header declares {size}"
            )

    def replace_source(self, source: Source) -> None:  # pragma: no cover - files do not expire
        raise DesiredStateInvalid("install: a local bundle has no URL to refresh")

    async def chunks(self) -> AsyncIterator[tuple[int, bytes]]:
        try:
            handle = await asyncio.to_thread(open, self.path, "rb")
        except OSError as exc:
            raise DesiredStateInvalid(f"install: cannot open {self.path}: {exc.strerror}") from exc
        try:
            self.total = os.fstat(handle.fileno()).st_size
            while data := await asyncio.to_thread(handle.read, self.chunk_size):
                yield self.offset, data
                self.offset += len(data)
                self.bytes_received += len(data)
        finally:
            handle.close()

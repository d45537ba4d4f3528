"""SHA-256 digests computed on one helper thread, each stream in order, with a bounded backlog.

Verifying a bundle costs a SHA-256 over the payload, one over the image and the decompression.
On one core that is about twice the cost of the slowest part alone. ``hashlib`` and libzstd both
release the GIL on large buffers, so hashing on one helper thread while the caller's thread
decompresses uses a second core and keeps the verifier close to the speed of its slowest part.

Measured on the 2-vCPU reference machine (``benchmarks/bundle_verify.py``): handing the work
over costs the decoding thread CPU of its own (each wake-up of the other thread and each GIL
transfer is a cross-CPU interrupt in a VM). Pieces of 256 KiB cost it about 0.25 CPU-s per GiB
more than pieces of 1 MiB, and copying the output once more about 0.1. So work travels in pieces
of about 1 MiB, never copied: :meth:`Digests.update` takes a ``memoryview`` and returns a
:class:`Pending` the caller waits on before it changes that memory again (the output ring in
:mod:`otad.bundle.ring` does exactly that). Small pieces are first joined into 64 KiB blocks, so
a caller feeding one byte at a time does not queue a million objects.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import deque
from queue import SimpleQueue
from typing import Final

__layer__ = "pure"

Buffer = bytes | bytearray | memoryview

_PIECE: Final = 1 << 20  # largest piece per job: the GIL is released for each piece's hashing
_SMALL: Final = 64 << 10  # pieces below this are copied and joined first
_MAX_IN_FLIGHT: Final = 8 << 20  # bytes queued or being hashed; the caller waits beyond this


class Pending:
    """Completion of one hand-over: :meth:`wait` returns once the helper thread hashed it."""

    __slots__ = ("_lock",)

    def __init__(self, lock: threading.Lock | None) -> None:
        self._lock = lock  # held from hand-over until hashed; None when hashed already

    def wait(self) -> None:
        lock = self._lock
        if lock is not None:
            with lock:
                pass
            self._lock = None

    @property
    def done(self) -> bool:
        return self._lock is None or not self._lock.locked()


DONE: Final = Pending(None)

_Job = tuple[int, Buffer, threading.Lock] | None


class Digests:
    """``count`` independent SHA-256 streams, optionally hashed on one helper thread."""

    def __init__(self, count: int, *, threaded: bool) -> None:
        self._hashes = [hashlib.sha256() for _ in range(count)]
        self._threaded = threaded
        self._small = [bytearray() for _ in range(count)]
        self._jobs: SimpleQueue[_Job] = SimpleQueue()
        self._stop = threading.Event()
        self._failure: list[BaseException] = []
        self._thread: threading.Thread | None = None
        self._in_flight: deque[tuple[Pending, int]] = deque()
        self._in_flight_bytes = 0

    def update(self, index: int, data: Buffer) -> Pending:
        """Append ``data`` to stream ``index``.

        The bytes behind ``data`` must stay unchanged until the returned :class:`Pending` is done
        (immutable ``bytes`` need no care). Blocks while more than 8 MiB wait to be hashed.
        """
        if not self._threaded:
            self._hashes[index].update(data)
            return DONE
        small = self._small[index]
        if len(data) < _SMALL:
            small += data  # copied: the caller may reuse its memory right away
            if len(small) < _SMALL:
                return DONE
            data = bytes(small)
            small.clear()
        elif small:
            self._submit(index, bytes(small))
            small.clear()
        view = memoryview(data)
        pending = DONE
        for start in range(0, len(view), _PIECE):
            pending = self._submit(index, view[start : start + _PIECE])
        return pending

    def hexdigests(self) -> list[str]:
        """Every stream's digest; waits for the helper thread, then stops it."""
        if self._threaded:
            for index, small in enumerate(self._small):
                if small:
                    self._submit(index, bytes(small))
                    small.clear()
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
                self._thread = None
            if self._failure:
                raise RuntimeError("bundle: the hashing thread failed") from self._failure[0]
        return [h.hexdigest() for h in self._hashes]

    def close(self) -> None:
        """Stop the helper thread (pending work is dropped); safe to call more than once."""
        self._stop.set()
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None
        self._in_flight.clear()
        self._in_flight_bytes = 0

    def _submit(self, index: int, data: Buffer) -> Pending:
        if self._thread is None:
            if self._stop.is_set():
                raise RuntimeError("bundle: digests used after close()")
            self._thread = threading.Thread(
                target=_hash_jobs,
                args=(self._jobs, self._hashes, self._stop, self._failure),
                name="otad-bundle-sha256",
                daemon=True,  # never keeps the process alive; the finalizer below ends it anyway
            )
            self._thread.start()
            # A verifier dropped without close() or finish() must not leave its thread behind.
            weakref.finalize(self, self._jobs.put, None)
        lock = threading.Lock()
        lock.acquire()
        self._jobs.put((index, data, lock))
        pending = Pending(lock)
        self._in_flight.append((pending, len(data)))
        self._in_flight_bytes += len(data)
        while self._in_flight and (
            self._in_flight_bytes > _MAX_IN_FLIGHT or self._in_flight[0][0].done
        ):
            oldest, size = self._in_flight.popleft()
            oldest.wait()
            self._in_flight_bytes -= size
        return pending


def _hash_jobs(
    jobs: SimpleQueue[_Job],
    hashes: list[hashlib._Hash],
    stop: threading.Event,
    failure: list[BaseException],
) -> None:
    """The helper thread: hash each job in order, then release its lock (even after a failure)."""
    while (job := jobs.get()) is not None:
        index, data, lock = job
        try:
            if not stop.is_set() and not failure:
                hashes[index].update(data)
        except BaseException as exc:  # surfaced by hexdigests(); the caller must not hang
            failure.append(exc)
        finally:
            lock.release()

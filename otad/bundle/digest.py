"""SHA-256 digests computed on a helper thread, each in order, with a bounded backlog.

Verifying a bundle costs a SHA-256 over the payload, one over the image and the decompression.
On one core that is about twice the cost of the slowest part alone. ``hashlib`` and libzstd both
release the GIL on large buffers, so hashing on one helper thread while the caller's thread
decompresses uses a second core and keeps the verifier close to the speed of its slowest part.

Only immutable ``bytes`` are handed over, so nothing can change a buffer after it was counted
and before it was hashed. Pieces travel in batches of about 1 MiB (a hand-off costs far less than
the hashing it moves); small pieces are first joined into 64 KiB blocks, so a caller feeding one
byte at a time does not queue a million objects.
"""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

__layer__ = "pure"

_BATCH: Final = 1 << 20
_SMALL: Final = 64 << 10
_MAX_BACKLOG: Final = 3  # batches queued or running on the helper thread


class Digests:
    """``count`` independent SHA-256 streams, optionally hashed on one helper thread."""

    def __init__(self, count: int, *, threaded: bool) -> None:
        self._hashes = [hashlib.sha256() for _ in range(count)]
        self._threaded = threaded
        self._executor: ThreadPoolExecutor | None = None
        self._backlog: deque[Future[None]] = deque()
        self._pieces: list[list[bytes]] = [[] for _ in range(count)]
        self._small = [bytearray() for _ in range(count)]
        self._batched = 0

    def update(self, index: int, data: bytes) -> None:
        """Append ``data`` to stream ``index``."""
        if not self._threaded:
            self._hashes[index].update(data)
            return
        small = self._small[index]
        if len(data) < _SMALL:
            small += data
            if len(small) < _SMALL:
                return
            data = bytes(small)
            small.clear()
        elif small:
            self._pieces[index].append(bytes(small))
            small.clear()
        self._pieces[index].append(data)
        self._batched += len(data)
        if self._batched >= _BATCH:
            self._hand_over()

    def hexdigests(self) -> list[str]:
        """Every stream's digest; waits for the helper thread, then stops it."""
        for index, small in enumerate(self._small):
            if small:
                self._pieces[index].append(bytes(small))
                small.clear()
        self._hand_over()
        self._wait(0)
        self.close()
        return [h.hexdigest() for h in self._hashes]

    def close(self) -> None:
        """Stop the helper thread (pending work is dropped); safe to call more than once."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._backlog.clear()

    def _hand_over(self) -> None:
        if not any(self._pieces):
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="otad-bundle-sha256")
        # A bounded backlog keeps memory constant when hashing is slower than decompression.
        self._wait(_MAX_BACKLOG - 1)
        self._backlog.append(self._executor.submit(self._update_all, self._pieces))
        self._pieces = [[] for _ in self._hashes]
        self._batched = 0

    def _update_all(self, pieces: list[list[bytes]]) -> None:
        for digest, stream in zip(self._hashes, pieces, strict=True):
            for piece in stream:
                digest.update(piece)

    def _wait(self, backlog: int) -> None:
        while len(self._backlog) > backlog:
            self._backlog.popleft().result()

"""SHA-256 that can run on a helper thread, in order, with a bounded backlog.

Verifying a bundle costs a SHA-256 over the image, one over the payload and the decompression.
On one core that is roughly twice the cost of the slowest part alone. ``hashlib`` and libzstd both
release the GIL on large buffers, so hashing the image on one helper thread while the caller's
thread decompresses uses a second core and keeps the verifier close to the speed of its slowest
part. Only immutable ``bytes`` are handed over, so nothing can change a buffer after it was
counted and before it was hashed. Pieces are handed over in batches of about 1 MiB, so the cost
of a hand-off stays small next to the hashing it moves.
"""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

__layer__ = "pure"

_BATCH: Final = 1 << 20
_MAX_BACKLOG: Final = 3  # batches queued or running on the helper thread


class Sha256:
    """``hashlib.sha256`` with an optional in-order helper thread."""

    def __init__(self, *, threaded: bool) -> None:
        self._hash = hashlib.sha256()
        self._threaded = threaded
        self._executor: ThreadPoolExecutor | None = None
        self._backlog: deque[Future[None]] = deque()
        self._batch: list[bytes] = []
        self._batched = 0

    def update(self, data: bytes) -> None:
        if not self._threaded:
            self._hash.update(data)
            return
        self._batch.append(data)
        self._batched += len(data)
        if self._batched >= _BATCH:
            self._hand_over()

    def hexdigest(self) -> str:
        if self._batch:
            self._hand_over()
        self._wait(0)
        self.close()
        return self._hash.hexdigest()

    def close(self) -> None:
        """Stop the helper thread (pending work is dropped); safe to call more than once."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._backlog.clear()
        self._batch = []
        self._batched = 0

    def _hand_over(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="otad-bundle-sha256")
        # A bounded backlog keeps memory constant when hashing is slower than decompression.
        self._wait(_MAX_BACKLOG - 1)
        self._backlog.append(self._executor.submit(self._update_all, self._batch))
        self._batch = []
        self._batched = 0

    def _update_all(self, pieces: list[bytes]) -> None:
        update = self._hash.update
        for piece in pieces:
            update(piece)

    def _wait(self, backlog: int) -> None:
        while len(self._backlog) > backlog:
            self._backlog.popleft().result()

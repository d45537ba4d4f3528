"""Running calls at the same moment on real threads (bounded waits)."""

from __future__ import annotations

import threading
from collections.abc import Callable


def race(*calls: Callable[[], object]) -> None:
    """Run ``calls`` in threads released together by a barrier; each wait is bounded."""
    barrier = threading.Barrier(len(calls))

    def go(call: Callable[[], object]) -> None:
        barrier.wait(5)
        call()

    threads = [threading.Thread(target=go, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)

"""Running calls at the same moment on real threads (bounded waits)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from otad.agent.bootloader import Bootloader


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


def assert_concurrent_marks_lose_nothing(
    one: Bootloader, two: Bootloader, rounds: int = 200
) -> None:
    """Two instances of one bootloader env (the daemon and `otad agent mark-bad`, each with its
    own lock fd) mark at the same moment, ``rounds`` times: neither change is ever lost."""
    for i in range(rounds):
        one.mark_good("A")
        one.mark_good("B")
        race(lambda: one.mark_bad("A"), lambda: two.try_once("B"))
        state = one.state()
        assert state.slot("A").bad and state.slot("B").on_trial, f"round {i}: {state.to_dict()}"

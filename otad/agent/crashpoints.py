"""Test-only fault injection: named points where the agent ends its process at once."""

from __future__ import annotations

import os

import structlog

__layer__ = "adapter"

log = structlog.get_logger(__name__)


class CrashPoints:
    """Test-only fault injection: end the process at once at a named point (issue 8's matrix).

    Names: ``journaled:<state>`` after each journal store, ``write:<percent>`` (25/50/75) mid-write,
    ``written`` (all bytes written, before fsync/verify), ``verified`` (slot verified, before the
    bootloader switch), ``switched`` (after try_once, before the reboot), ``committed`` (after
    mark_good, before the journal), ``rollback_marked`` (after mark_bad in a rollback, before the
    reboot), ``reported:<state>`` (after a final report was accepted, before it is journaled).
    """

    def __init__(self, names: frozenset[str], exit_code: int = 137) -> None:
        self.names = names
        self.exit_code = exit_code

    def hit(self, name: str) -> None:
        if name in self.names:
            log.warning("crash_point_hit", point=name)
            os._exit(self.exit_code)

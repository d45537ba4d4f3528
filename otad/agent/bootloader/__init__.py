"""Bootloader env codecs (pure) and one backend per bootloader (grub, uboot, sim).

This package module holds the vocabulary every backend shares, and nothing that does I/O:

* :data:`SLOTS` - the two slot names, ``"A"`` and ``"B"``.
* :class:`SlotBoot` / :class:`BootState` - what the bootloader will do at the next power-on,
  read back from its environment.
* :class:`Bootloader` - the protocol of a backend (:mod:`.grub`, :mod:`.uboot`, :mod:`.sim`).

Semantics shared by all backends (the GRUB and U-Boot schemes are RAUC's):

``mark_bad(slot)``
    the bootloader never picks ``slot`` again until ``try_once``/``mark_good``.
``try_once(slot)``
    ``slot`` goes first in the boot order with exactly one boot attempt; the other slot keeps its
    state, so when that attempt is used up without a ``mark_good`` the bootloader falls back.
``repair(booted)``
    a corrupt or missing env is rewritten: ``booted`` good and first, the other slot bad.
``mark_good(slot)``
    ``slot`` is committed: first in the order, the full number of attempts. Both schemes consume
    an attempt on *every* boot, also of a committed slot, so the running system confirms its
    slot on each start (RAUC's ``mark-good`` service does the same); that is what makes a
    committed slot that later stops booting fall back too.

Every backend method is synchronous and does blocking file I/O with fsync: call it from a worker
thread (``asyncio.to_thread``) in async code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__layer__ = "pure"

SLOTS: tuple[str, str] = ("A", "B")


def other_slot(slot: str) -> str:
    """The slot that is not ``slot`` (``"A"`` <-> ``"B"``)."""
    check_slot(slot)
    return "B" if slot == "A" else "A"


def check_slot(slot: str) -> str:
    """``slot`` itself when it names a slot; ValueError otherwise (a programming error)."""
    if slot not in SLOTS:
        raise ValueError(f"bootloader: unknown slot {slot!r}, expected one of {SLOTS}")
    return slot


@dataclass(frozen=True)
class SlotBoot:
    """The bootloader's view of one slot.

    ``bad``: explicitly marked bad (GRUB ``X_OK=0``; U-Boot: not in ``BOOT_ORDER``).
    ``tries_left``: boot attempts the bootloader still grants (GRUB: 1 while ``X_OK=1`` and
    ``X_TRY=0``; U-Boot: ``BOOT_X_LEFT``). 0 after the attempts were used up.
    ``good``: committed by ``mark_good`` and not put on trial or marked bad since; a good slot
    can have ``tries_left == 0`` right after a boot, until the running system confirms it.
    """

    bad: bool = False
    tries_left: int = 0
    good: bool = False

    @property
    def bootable(self) -> bool:
        """Would the bootloader pick this slot if it came first in the order?"""
        return not self.bad and self.tries_left > 0

    @property
    def on_trial(self) -> bool:
        """Put on trial by ``try_once`` and neither committed nor marked bad since."""
        return not self.bad and not self.good


@dataclass(frozen=True)
class BootState:
    """What the bootloader environment says, for both slots.

    ``full_tries``: the attempts ``mark_good`` grants (GRUB 1, U-Boot/sim their setting); a
    booted slot with fewer left has used one this boot and needs confirming.
    """

    order: tuple[str, ...]
    slots: Mapping[str, SlotBoot] = field(default_factory=dict)
    full_tries: int = 1

    def slot(self, name: str) -> SlotBoot:
        """The state of slot ``name`` (a slot absent from the env counts as bad)."""
        check_slot(name)
        return self.slots.get(name, SlotBoot(bad=True))

    def next_boot(self) -> str | None:
        """The slot the bootloader would pick at the next power-on, or None."""
        for name in self.order:
            if name in SLOTS and self.slot(name).bootable:
                return name
        return None

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly view (for ``otad agent status --json`` and logs)."""
        return {
            "order": list(self.order),
            "next": self.next_boot(),
            "fullTries": self.full_tries,
            "slots": {
                name: {
                    "bad": self.slot(name).bad,
                    "triesLeft": self.slot(name).tries_left,
                    "good": self.slot(name).good,
                    "bootable": self.slot(name).bootable,
                }
                for name in SLOTS
            },
        }


@runtime_checkable
class Bootloader(Protocol):
    """One backend. Every write is durable (fsync'd) when the method returns."""

    name: str

    def state(self) -> BootState:
        """Read the environment; raises BootloaderEnvCorrupt when no valid copy exists."""
        ...

    def mark_bad(self, slot: str) -> None:
        """Never pick ``slot`` again (until try_once / mark_good)."""
        ...

    def try_once(self, slot: str) -> None:
        """Put ``slot`` first with exactly one attempt; the other slot keeps its state."""
        ...

    def mark_good(self, slot: str) -> None:
        """Commit ``slot``: first in the order with the full number of attempts."""
        ...

    def primary(self) -> str | None:
        """The slot the next power-on would boot (None: no bootable slot)."""
        ...

    def repair(self, booted: str) -> None:
        """Rewrite a lost or corrupt environment from what is known for sure.

        For the agent when :meth:`state` raised BootloaderEnvCorrupt (the bootloader then
        rescue-booted slot A): ``booted`` becomes the good, first slot; the other slot is marked
        bad, since nothing vouches for its content.
        """
        ...

"""A model of the boot ROM + bootloader at power-on, for fast tests of every fallback path.

The state lives in a JSON file (written atomically), so a test models a power cut as: kill the
agent (whatever reached the file is what the "env" holds), :meth:`SimBootloader.power_on`, start
a new agent with the slot it returned.

The model is the U-Boot counter scheme, which includes GRUB's (``attempts=1``): at power-on the
first slot in the order that is not bad and has attempts left is chosen and one attempt is
consumed; a slot told to fail (:meth:`fail_boot`, a kernel panic or a hang followed by a watchdog
reset) consumes its attempt and the bootloader runs again, so the order falls through to the
other slot once the attempts are used up. With no attempts left anywhere, the last resort boots
the *first* committed slot of the order, as grub.cfg and boot.cmd do (see
:meth:`SimBootloader.power_on`). Only when that fails too does power-on raise BootloaderError: in
a test that is the one outcome that must never happen.

Every read-modify-write of the state file holds ``flock(LOCK_EX)`` on ``<state file>.lock``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from otad.agent.bootloader import SLOTS, BootState, SlotBoot, check_slot, other_slot
from otad.agent.bootloader.durable import held_lock, replace_file
from otad.errors import BootloaderEnvCorrupt, BootloaderError

__layer__ = "adapter"

log = structlog.get_logger(__name__)

FORMAT = 1
FOREVER = -1


class SimBootloader:
    """File-backed simulated bootloader.

    ``attempts``: tries a committed slot gets (3 like RAUC's U-Boot script; 1 models GRUB).
    ``durable``: fsync each write (turn off for a thousand simulated devices in one process).
    A new file starts with both slots good, order ``initial`` first, and ``initial`` booted.
    """

    name = "sim"

    def __init__(
        self, path: Path, *, attempts: int = 3, initial: str = "A", durable: bool = True
    ) -> None:
        if attempts < 1:
            raise ValueError("sim: attempts must be at least 1")
        check_slot(initial)
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.attempts = attempts
        self.durable = durable
        with self._locked():
            self._create(initial)

    def _create(self, initial: str) -> None:
        if not self.path.exists():
            good = {"bad": False, "tries": self.attempts, "good": True}
            self._save(
                {
                    "format": FORMAT,
                    "order": [initial, other_slot(initial)],
                    "slots": {s: dict(good) for s in SLOTS},
                    "fails": {s: 0 for s in SLOTS},
                    "booted": initial,
                    "boots": 0,
                }
            )

    # --- Bootloader protocol --------------------------------------------------------------

    def state(self) -> BootState:
        return self._state(self._load())

    def _state(self, raw: dict[str, Any]) -> BootState:
        return BootState(
            tuple(raw["order"]),
            {
                s: SlotBoot(bad=v["bad"], tries_left=v["tries"], good=v["good"])
                for s, v in raw["slots"].items()
            },
            full_tries=self.attempts,
        )

    def mark_bad(self, slot: str) -> None:
        check_slot(slot)

        def change(raw: dict[str, Any]) -> None:
            raw["slots"][slot] = {"bad": True, "tries": 0, "good": False}

        self._update(change)
        log.info("slot_marked_bad", bootloader=self.name, slot=slot)

    def try_once(self, slot: str) -> None:
        check_slot(slot)

        def change(raw: dict[str, Any]) -> None:
            raw["slots"][slot] = {"bad": False, "tries": 1, "good": False}
            raw["order"] = [slot, other_slot(slot)]

        self._update(change)
        log.info("slot_set_to_try_once", bootloader=self.name, slot=slot)

    def mark_good(self, slot: str) -> None:
        check_slot(slot)

        def change(raw: dict[str, Any]) -> None:
            raw["slots"][slot] = {"bad": False, "tries": self.attempts, "good": True}
            raw["order"] = [slot, other_slot(slot)]

        self._update(change)
        log.info("slot_marked_good", bootloader=self.name, slot=slot)

    def primary(self) -> str | None:
        return self.state().next_boot()

    def repair(self, booted: str) -> None:
        check_slot(booted)
        other = other_slot(booted)
        with self._locked():
            self._repair_locked(booted, other)
        log.warning("bootloader_env_repaired", bootloader=self.name, good=booted, bad=other)

    def _repair_locked(self, booted: str, other: str) -> None:
        try:
            raw = self._load()
            fails, boots = raw["fails"], raw["boots"]
        except BootloaderError:
            fails, boots = {s: 0 for s in SLOTS}, 0
        self._save(
            {
                "format": FORMAT,
                "order": [booted, other],
                "slots": {
                    booted: {"bad": False, "tries": self.attempts, "good": True},
                    other: {"bad": True, "tries": 0, "good": False},
                },
                "fails": fails,
                "booted": booted,
                "boots": boots,
            }
        )

    # --- the simulated hardware -----------------------------------------------------------

    def fail_boot(self, slot: str, times: int = FOREVER) -> None:
        """Make the next ``times`` boots of ``slot`` fail (FOREVER: until :meth:`heal`)."""
        check_slot(slot)

        def change(raw: dict[str, Any]) -> None:
            raw["fails"][slot] = times

        self._update(change)

    def heal(self, slot: str) -> None:
        self.fail_boot(slot, 0)

    def booted(self) -> str | None:
        """The slot the last power-on booted."""
        value = self._load()["booted"]
        return str(value) if value is not None else None

    def power_on(self) -> str:
        """Run the bootloader until a slot comes up; returns it. Consumes attempts.

        When no slot has an attempt left, the last resort (as in grub.cfg and boot.cmd) boots
        the first *committed* slot of the order that is not marked bad, without consuming
        anything (``rescued()`` is then true; real bootloaders add ``otad.rescue=1``): a lost
        confirmation of a good slot is an ordinary power cut and must not brick the device,
        while a slot on trial never gets a try it was not given. Only that first committed slot:
        the real scripts save nothing on this path, so they pick the same slot at every power-on
        and never go on to a second committed slot when the first one fails.
        """
        with self._locked():
            return self._power_on_locked()

    def _power_on_locked(self) -> str:
        raw = self._load()
        attempts_made: list[str] = []
        # each iteration consumes an attempt, so the loop is bounded by the attempts in the env
        for _ in range(2 * self.attempts + 2):
            slot = self._state(raw).next_boot()
            if slot is None:
                break
            raw["slots"][slot]["tries"] -= 1
            attempts_made.append(slot)
            if self._fails(raw, slot):
                continue
            return self._booted(raw, slot, attempts_made, rescue=False)
        state = self._state(raw)
        rescue = next((s for s in state.order if s in SLOTS and state.slot(s).good), None)
        if rescue is not None:
            attempts_made.append(f"{rescue} (last resort)")
            if not self._fails(raw, rescue):
                return self._booted(raw, rescue, attempts_made, rescue=True)
        raw["booted"] = None
        self._save(raw)
        raise BootloaderError(
            f"sim: no bootable slot at power-on (attempts made: {attempts_made or 'none'})",
            attempts=attempts_made,
        )

    @staticmethod
    def _fails(raw: dict[str, Any], slot: str) -> bool:
        """Does this boot attempt of ``slot`` fail (and count it)?"""
        fails = raw["fails"][slot]
        if fails == 0:
            return False
        if fails > 0:
            raw["fails"][slot] = fails - 1
        return True

    def _booted(self, raw: dict[str, Any], slot: str, attempts: list[str], *, rescue: bool) -> str:
        raw["booted"] = slot
        raw["boots"] += 1
        raw["rescue"] = rescue
        self._save(raw)
        log.info("sim_powered_on", booted=slot, attempts=attempts, rescue=rescue)
        return slot

    def rescued(self) -> bool:
        """Did the last power-on boot by the last resort (no slot had an attempt left)?"""
        return bool(self._load().get("rescue", False))

    # --- storage --------------------------------------------------------------------------

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """The lock next to the state file (not the state file) for a read-modify-write."""
        return held_lock(
            self.lock_path,
            lambda exc: BootloaderError(
                f"sim: cannot open the lock {self.lock_path}: {exc.strerror or exc}"
            ),
        )

    def _update(self, change: Callable[[dict[str, Any]], None]) -> None:
        with self._locked():
            raw = self._load()
            change(raw)
            self._save(raw)

    def _load(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError as exc:
            raise BootloaderError(f"sim: no state file at {self.path}") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise BootloaderEnvCorrupt(f"sim: state file {self.path} is not JSON: {exc}") from exc
        if not _valid(raw):
            raise BootloaderEnvCorrupt(f"sim: state file {self.path} has an unexpected shape")
        return raw  # type: ignore[no-any-return]

    def _save(self, raw: dict[str, Any]) -> None:
        replace_file(
            self.path, json.dumps(raw, sort_keys=True).encode() + b"\n", durable=self.durable
        )


def _valid(raw: object) -> bool:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        return False
    order, slots, fails = raw.get("order"), raw.get("slots"), raw.get("fails")
    if not (isinstance(order, list) and all(s in SLOTS for s in order)):
        return False
    if not (isinstance(slots, dict) and set(slots) == set(SLOTS)):
        return False
    if not (isinstance(fails, dict) and set(fails) == set(SLOTS)):
        return False
    for s in SLOTS:
        v = slots[s]
        if not isinstance(v, dict):
            return False
        if not (isinstance(v.get("bad"), bool) and isinstance(v.get("good"), bool)):
            return False
        if type(v.get("tries")) is not int or type(fails[s]) is not int:
            return False
    booted = raw.get("booted")
    if not isinstance(raw.get("rescue", False), bool):
        return False
    return (booted is None or booted in SLOTS) and type(raw.get("boots")) is int

"""GRUB backend: RAUC's ORDER / A_OK / A_TRY / B_OK / B_TRY scheme, in two env copies.

The scheme (what ``boot/grub/grub.cfg`` does at every boot): take the slots of ``ORDER`` in
turn; the first with ``X_OK=1`` and ``X_TRY=0`` wins; GRUB sets ``X_TRY=1`` and saves it
*before* booting. The running system confirms its slot by writing ``X_TRY=0`` again
(:meth:`GrubBootloader.mark_good`); a slot whose ``X_TRY`` is still 1 at the next boot is
skipped, so the order falls through to the other slot.

Power safety: a single grubenv rewritten in place can be torn by a power cut, and GRUB then
ignores the whole block (no slot qualifies). So the state lives in two copies,
``grubenv.0`` and ``grubenv.1`` (next to grub.cfg), each a normal 1024-byte GRUB block::

    SEQ=<n>        first variable
    ORDER=A B
    A_OK=1 ... B_TRY=0
    otad_trial=    the slot on trial (ignored by GRUB; gives "good" its meaning)
    SEQ_END=<n>    last variable

A copy is *valid* when it has the signature and ``SEQ`` and ``SEQ_END`` are equal decimal
numbers; the *current* copy is the valid one with the higher ``SEQ`` (copy 0 on a tie). A torn
in-place write leaves the new ``SEQ`` without a matching ``SEQ_END`` (or no signature, or an
old ``SEQ_END`` from the previous content after it): that copy is invalid and the other one is
used. grub.cfg applies exactly this rule in GRUB script (``load_env`` with a whitelist and
``test``), so userspace and GRUB always agree on the current copy.

Every write rewrites both copies, the non-current one first (``SEQ`` = n+1, then n+2), each in
place + fsync (GRUB's ``save_env`` writes through the file's block list, so the files keep
their blocks). A power cut therefore leaves either the old state or the new one readable, and
after a write returns no stale copy is left that could bring back a slot just marked bad.
GRUB itself only flips ``X_TRY`` in the current copy (same length, one sector).

A new ``SEQ`` is above every ``SEQ``/``SEQ_END`` number found in either copy, torn copies
included: were a number of an interrupted write used again, the first half of that write and
the second half of a later one could combine into a copy that looks valid.

Every read-modify-write holds ``flock(LOCK_EX)`` on ``grubenv.lock`` next to the copies (the
daemon and ``otad agent mark-good``/``mark-bad`` must not lose each other's change). The env
directory must exist: a missing directory (ESP not mounted) or no copy at all is a
BootloaderError, not a corrupt env, and only :func:`write_initial` (image builders) creates it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from otad.agent.bootloader import SLOTS, BootState, SlotBoot, check_slot, grubenv, other_slot
from otad.agent.bootloader.durable import FaultHook, held_lock, overwrite_file, replace_file
from otad.errors import BootloaderEnvCorrupt, BootloaderError

__layer__ = "adapter"

log = structlog.get_logger(__name__)

COPY_NAMES = ("grubenv.0", "grubenv.1")
LOCK_NAME = "grubenv.lock"
TRIAL = "otad_trial"
#: GRUB's ``test -gt`` parses numbers as unsigned long, 32 bits on i386-pc: stay below 2**31.
SEQ_LIMIT = 2**31 - 1
#: The variables of the scheme; grub.cfg's load_env whitelist names each one GRUB reads.
SCHEME_KEYS = ("ORDER", "A_OK", "A_TRY", "B_OK", "B_TRY")


@dataclass(frozen=True)
class EnvCopy:
    """One copy as read from disk."""

    path: Path
    seq: int | None  # None: invalid (missing, torn, unreadable)
    values: Mapping[str, str]
    problem: str = ""
    #: the highest SEQ / SEQ_END number in the raw bytes, torn or not (0: none)
    max_seen: int = 0


_SEQ_NUMBER = re.compile(rb"(?:^|\n)SEQ(?:_END)?=([0-9]{1,10})(?=\n)")


def seq_numbers_seen(data: bytes) -> int:
    """The highest SEQ or SEQ_END number anywhere in ``data`` (0: none).

    Read from the raw bytes, so a torn copy that no longer decodes still counts; numbers
    beyond SEQ_LIMIT were never written by us (render refuses them) and are ignored.
    """
    found = (int(m.group(1)) for m in _SEQ_NUMBER.finditer(data))
    return max((n for n in found if n <= SEQ_LIMIT), default=0)


def read_copy(path: Path) -> EnvCopy:
    """Read one copy and apply the validity rule grub.cfg applies."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return EnvCopy(path, None, {}, "missing")
    except OSError as exc:
        return EnvCopy(path, None, {}, f"unreadable: {exc.strerror or exc}")
    seen = seq_numbers_seen(data)
    try:
        env = grubenv.decode(data)
    except BootloaderEnvCorrupt as exc:
        return EnvCopy(path, None, {}, str(exc), seen)
    seq, seq_end = env.values.get("SEQ", ""), env.values.get("SEQ_END", "")
    if not (seq.isascii() and seq.isdigit() and seq == seq_end):
        return EnvCopy(path, None, env.values, f"torn (SEQ={seq!r}, SEQ_END={seq_end!r})", seen)
    return EnvCopy(path, int(seq), env.values, max_seen=seen)


def current_copy(copies: tuple[EnvCopy, EnvCopy]) -> EnvCopy | None:
    """The valid copy with the higher SEQ; copy 0 on a tie (the same rule as grub.cfg)."""
    first, second = copies
    if first.seq is None:
        return second if second.seq is not None else None
    if second.seq is None:
        return first
    return second if second.seq > first.seq else first


def scheme_state(values: Mapping[str, str]) -> BootState:
    """Interpret ORDER / X_OK / X_TRY / otad_trial the way grub.cfg does."""
    order: list[str] = []
    for word in values.get("ORDER", "").split():
        if word in SLOTS and word not in order:
            order.append(word)
    slots: dict[str, SlotBoot] = {}
    trial = values.get(TRIAL, "")
    for s in SLOTS:
        ok = values.get(f"{s}_OK") == "1"
        tried = values.get(f"{s}_TRY", "0") != "0"
        slots[s] = SlotBoot(
            bad=not ok, tries_left=1 if ok and not tried else 0, good=ok and trial != s
        )
    return BootState(tuple(order), slots)


def initial_values(order: tuple[str, ...] = ("A", "B")) -> dict[str, str]:
    """Both slots good, ``order`` first: what an image ships (see :func:`write_initial`)."""
    return {
        "ORDER": " ".join(order),
        "A_OK": "1",
        "A_TRY": "0",
        "B_OK": "1",
        "B_TRY": "0",
        TRIAL: "",
    }


def render(values: Mapping[str, str], seq: int) -> bytes:
    """One copy's bytes: SEQ first, the scheme and extra variables, SEQ_END last."""
    if not 0 <= seq <= SEQ_LIMIT:
        raise BootloaderError(f"grub: sequence number {seq} out of range")
    body = {"SEQ": str(seq)}
    body.update((k, v) for k, v in values.items() if k not in ("SEQ", "SEQ_END"))
    body["SEQ_END"] = str(seq)
    return grubenv.encode(body)


def write_initial(
    env_dir: Path,
    values: Mapping[str, str] | None = None,
    *,
    names: tuple[str, str] = COPY_NAMES,
    create: bool = True,
    first_seq: int = 1,
) -> None:
    """Write both copies (``SEQ`` ``first_seq`` and ``first_seq + 1``).

    ``create`` (image builders): create ``env_dir`` and the copies. Without it (repair on a
    device) the directory and both copies must exist: a missing one is a BootloaderError and
    nothing is written, so an unmounted ESP never gets an env directory of its own.
    """
    if create:
        env_dir.mkdir(parents=True, exist_ok=True)
    else:
        for name in names:
            if not (env_dir / name).is_file():
                raise BootloaderError(
                    f"grub: env copy {env_dir / name} does not exist (ESP not mounted, or an "
                    "image without otad's grubenv copies); nothing is created there"
                )
    vals = dict(values) if values is not None else initial_values()
    for seq, name in enumerate(names, start=first_seq):
        replace_file(env_dir / name, render(vals, seq))


class GrubBootloader:
    """The GRUB backend over the two env copies in ``env_dir`` (the ESP's /EFI/BOOT)."""

    name = "grub"

    def __init__(
        self,
        env_dir: Path,
        *,
        names: tuple[str, str] = COPY_NAMES,
        fault: FaultHook | None = None,
    ) -> None:
        self.env_dir = Path(env_dir)
        self.paths = (self.env_dir / names[0], self.env_dir / names[1])
        self.lock_path = self.env_dir / LOCK_NAME
        self._fault = fault  # test-only: see durable.overwrite_file

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """The env lock (a file next to the copies, not a copy) for one read-modify-write."""

        def failed(exc: OSError) -> BootloaderError:
            if isinstance(exc, FileNotFoundError):
                return self._no_dir()
            return BootloaderError(
                f"grub: cannot open the env lock {self.lock_path}: {exc.strerror or exc}"
            )

        return held_lock(self.lock_path, failed)

    def _no_dir(self) -> BootloaderError:
        return BootloaderError(
            f"grub: env directory {self.env_dir} does not exist (ESP not mounted?); "
            "nothing is created there"
        )

    # --- reading ---------------------------------------------------------------------------

    def read(self) -> tuple[EnvCopy, EnvCopy, EnvCopy]:
        """(copy 0, copy 1, current); BootloaderEnvCorrupt when neither copy is valid."""
        copies = (read_copy(self.paths[0]), read_copy(self.paths[1]))
        current = current_copy(copies)
        if current is None and all(c.problem == "missing" for c in copies):
            # nothing there at all: a configuration or mount problem, not an env to repair
            if not self.env_dir.is_dir():
                raise self._no_dir()
            raise BootloaderError(
                f"grub: no env copies in {self.env_dir} ({copies[0].path.name} and "
                f"{copies[1].path.name} do not exist); nothing is created there"
            )
        if current is None:
            raise BootloaderEnvCorrupt(
                f"grub: no valid env copy in {self.env_dir} "
                f"({copies[0].path.name}: {copies[0].problem}; "
                f"{copies[1].path.name}: {copies[1].problem})"
            )
        for copy in copies:
            if copy.seq is None and copy.problem != "missing":
                log.warning("grubenv_copy_invalid", path=str(copy.path), problem=copy.problem)
        return copies[0], copies[1], current

    def values(self) -> dict[str, str]:
        """All variables of the current copy (SEQ/SEQ_END included)."""
        return dict(self.read()[2].values)

    def state(self) -> BootState:
        return scheme_state(self.read()[2].values)

    def primary(self) -> str | None:
        return self.state().next_boot()

    # --- writing ---------------------------------------------------------------------------

    def write(self, changes: Mapping[str, str], *, end_trial_of: str | None = None) -> None:
        """Apply ``changes`` to the current variables and store them in both copies.

        ``end_trial_of``: clear ``otad_trial`` when it names this slot.
        """
        with self._locked():
            self._write_locked(changes, end_trial_of)

    def _write_locked(self, changes: Mapping[str, str], end_trial_of: str | None) -> None:
        first, second, current = self.read()
        values = {k: v for k, v in current.values.items() if k not in ("SEQ", "SEQ_END")}
        values.update(changes)
        if end_trial_of is not None and values.get(TRIAL) == end_trial_of:
            values[TRIAL] = ""
        # above every number on disk, also a torn copy's: see the module doc
        seq = max(current.seq or 0, first.max_seen, second.max_seen)
        if seq + 2 > SEQ_LIMIT:
            raise BootloaderError(f"grub: sequence number {seq} exhausted in {self.env_dir}")
        # the non-current copy first: until it is complete the current one stays intact
        order = (second, first) if current is first else (first, second)
        for step, copy in enumerate(order, start=1):
            self._store(copy.path, render(values, seq + step))

    def _store(self, path: Path, data: bytes) -> None:
        try:
            try:
                overwrite_file(path, data, fault=self._fault)
            except (FileNotFoundError, ValueError):
                # first write of this copy, or a copy of the wrong size: create it whole
                replace_file(path, data)
        except OSError as exc:
            raise BootloaderError(f"grub: cannot write grubenv at {path}: {exc}") from exc

    def repair(self, booted: str) -> None:
        check_slot(booted)
        other = other_slot(booted)
        values = initial_values((booted, other))
        values.update({f"{other}_OK": "0"})
        with self._locked():
            try:
                extra = {k: v for k, v in self.values().items() if k.startswith("otad_")}
            except BootloaderEnvCorrupt:
                extra = {}
            extra.pop(TRIAL, None)
            values.update(extra)
            self._rewrite(values)
        log.warning("bootloader_env_repaired", bootloader=self.name, good=booted, bad=other)

    def _rewrite(self, values: Mapping[str, str]) -> None:
        """Both copies from scratch, in place of the existing ones (never creates them)."""
        seen = max(read_copy(p).max_seen for p in self.paths)
        try:
            write_initial(
                self.env_dir,
                values,
                names=(self.paths[0].name, self.paths[1].name),
                create=False,
                first_seq=seen + 1,
            )
        except OSError as exc:
            raise BootloaderError(f"grub: cannot write grubenv in {self.env_dir}: {exc}") from exc

    def mark_bad(self, slot: str) -> None:
        check_slot(slot)
        self.write({f"{slot}_OK": "0", f"{slot}_TRY": "0"}, end_trial_of=slot)
        log.info("slot_marked_bad", bootloader=self.name, slot=slot)

    def try_once(self, slot: str) -> None:
        check_slot(slot)
        self.write(
            {
                "ORDER": f"{slot} {other_slot(slot)}",
                f"{slot}_OK": "1",
                f"{slot}_TRY": "0",
                TRIAL: slot,
            }
        )
        log.info("slot_set_to_try_once", bootloader=self.name, slot=slot)

    def mark_good(self, slot: str) -> None:
        check_slot(slot)
        self.write(
            {"ORDER": f"{slot} {other_slot(slot)}", f"{slot}_OK": "1", f"{slot}_TRY": "0"},
            end_trial_of=slot,
        )
        log.info("slot_marked_good", bootloader=self.name, slot=slot)

"""U-Boot backend: RAUC's BOOT_ORDER / BOOT_A_LEFT / BOOT_B_LEFT scheme in the U-Boot env.

The scheme (what ``boot/u-boot/boot.cmd`` does at every boot): take the slots of
``BOOT_ORDER`` in turn; the first with ``BOOT_X_LEFT > 0`` wins, its counter is decremented and
saved *before* the kernel starts. The running system confirms its slot by resetting the counter
(:meth:`UBootBootloader.mark_good`); a slot whose counter reached 0 is skipped. A slot marked bad
is removed from ``BOOT_ORDER`` (and its counter set to 0). ``otad_trial`` names the slot put on
trial by ``try_once`` (U-Boot ignores it).

Where the env lives is read from an ``fw_env.config`` (the file ``fw_printenv`` uses): one line
per copy, ``<device or file> <offset> <env size> [<sector size> [<sectors>]]``. Two lines mean
the redundant layout (CRC + flags byte per copy): every write goes to the non-current copy with
the flags counted up, then fsync, exactly like libubootenv - so a power cut mid-write leaves the
previous copy current (its CRC is intact, the torn one's is not). One line is the single
layout, which a torn write destroys (U-Boot then falls back to its built-in env): use it only
where the medium cannot hold two copies. Files and block devices (eMMC, SD, a FAT file) are
written directly; raw NOR/NAND MTD devices need erase cycles and are not supported here.

A device or file that is not there is a configuration or hardware problem (wrong name in
fw_env.config, device not probed yet), never a "corrupt env": it raises BootloaderError and
nothing is created at that path. Only :meth:`UBootBootloader.initialize` with ``create=True``
(image builders) creates env files.

An env written from scratch (:meth:`UBootBootloader.repair`, ``initialize``) always starts from
U-Boot's default environment as text (``u-boot-initial-env``: ``name=value`` lines, what
``make u-boot-initial-env`` produces and Yocto installs as ``/etc/u-boot-initial-env``), with
otad's variables on top. U-Boot uses a stored env with a valid CRC *instead of* its built-in
default, so an env holding only otad's variables would have no ``bootcmd`` and stop U-Boot at
its prompt. Without a readable default env file nothing is written.

Every read-modify-write holds ``flock(LOCK_EX)`` on libubootenv's lock file
(``/var/lock/fw_printenv.lock``), which ``fw_setenv`` takes too: the agent, its CLI and
``fw_setenv`` never pick the same target copy and lose each other's change.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from otad.agent.bootloader import SLOTS, BootState, SlotBoot, check_slot, other_slot, ubootenv
from otad.agent.bootloader.durable import FaultHook, held_lock, overwrite_file
from otad.errors import BootloaderEnvCorrupt, BootloaderError, ConfigError

__layer__ = "adapter"

log = structlog.get_logger(__name__)

FW_ENV_CONFIG = Path("/etc/fw_env.config")
#: U-Boot's default env as text (libubootenv's ``fw_setenv --defenv`` default, too).
DEFAULT_ENV_FILE = Path("/etc/u-boot-initial-env")
#: libubootenv's lock (fw_printenv / fw_setenv flock it around every env access).
LOCK_FILE = Path("/var/lock/fw_printenv.lock")
TRIAL = "otad_trial"
DEFAULT_ATTEMPTS = 3


@dataclass(frozen=True)
class EnvLocation:
    """One env copy: a file or block device, the byte offset in it, the env size."""

    device: Path
    offset: int
    size: int


def parse_fw_env_config(text: str, where: str = "fw_env.config") -> tuple[EnvLocation, ...]:
    """The copies an ``fw_env.config`` names (one or two); ConfigError on anything else."""
    found: list[EnvLocation] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) < 3:
            raise ConfigError(f"u-boot: {where}:{lineno}: need '<device> <offset> <size>'")
        try:
            offset, size = int(fields[1], 0), int(fields[2], 0)
        except ValueError as exc:
            raise ConfigError(f"u-boot: {where}:{lineno}: bad number: {exc}") from exc
        if offset < 0 or size <= ubootenv.HEADER_REDUNDANT + 2:
            raise ConfigError(f"u-boot: {where}:{lineno}: bad offset or size")
        if Path(fields[0]).name.startswith("mtd"):
            # flash needs erase cycles and libubootenv marks its copies with other flag values
            # there: an env written the block-device way would not be read back by U-Boot
            raise ConfigError(
                f"u-boot: {where}:{lineno}: {fields[0]} is a raw MTD device, which otad does "
                "not write; keep the env on a block device (eMMC, SD) or in a file"
            )
        found.append(EnvLocation(Path(fields[0]), offset, size))
    if len(found) not in (1, 2):
        raise ConfigError(f"u-boot: {where} must name one or two env copies, has {len(found)}")
    if len(found) == 2 and found[0].size != found[1].size:
        raise ConfigError(f"u-boot: {where}: both copies must have the same size")
    return tuple(found)


def parse_default_env(text: str, where: str = "u-boot-initial-env") -> dict[str, str]:
    """The variables of a ``u-boot-initial-env`` text file; BootloaderError on a bad line.

    One ``name=value`` per line (U-Boot's build turns the NUL-separated default env into
    lines and drops empty ones); lines starting with ``#`` and empty lines are skipped, as
    libubootenv does. A line without ``=`` (e.g. a value that had a newline) is refused rather
    than guessed at: a half-understood default env must not be written to the device.
    """
    values: dict[str, str] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        name, eq, value = line.partition("=")
        if not eq or not name or "\0" in line:
            raise BootloaderError(f"u-boot: {where}:{lineno}: not a 'name=value' line: {line!r}")
        values[name] = value
    if not values:
        raise BootloaderError(f"u-boot: {where}: the default env is empty")
    return values


def read_default_env(path: Path) -> dict[str, str]:
    """U-Boot's default env from ``path``; BootloaderError naming the file when it cannot."""
    try:
        text = Path(path).read_bytes().decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise BootloaderError(
            f"u-boot: cannot read U-Boot's default env {path} ({exc.strerror or exc}); it is "
            "needed to write an env from scratch (install u-boot-initial-env or set "
            "bootloader.uboot_default_env)"
        ) from exc
    return parse_default_env(text, str(path))


def scheme_state(values: Mapping[str, str], attempts: int = DEFAULT_ATTEMPTS) -> BootState:
    """Interpret BOOT_ORDER / BOOT_X_LEFT / otad_trial the way boot.cmd does."""
    order: list[str] = []
    for word in values.get("BOOT_ORDER", "").split():
        if word in SLOTS and word not in order:
            order.append(word)
    trial = values.get(TRIAL, "")
    slots: dict[str, SlotBoot] = {}
    for s in SLOTS:
        left = values.get(f"BOOT_{s}_LEFT", "0")
        tries = int(left) if left.isascii() and left.isdigit() else 0
        bad = s not in order
        slots[s] = SlotBoot(bad=bad, tries_left=0 if bad else tries, good=not bad and trial != s)
    return BootState(tuple(order), slots, full_tries=attempts)


def initial_values(
    order: tuple[str, ...] = ("A", "B"), attempts: int = DEFAULT_ATTEMPTS
) -> dict[str, str]:
    return {
        "BOOT_ORDER": " ".join(order),
        "BOOT_A_LEFT": str(attempts),
        "BOOT_B_LEFT": str(attempts),
        TRIAL: "",
    }


class UBootBootloader:
    """The U-Boot backend over the env copies an fw_env.config names."""

    name = "uboot"

    def __init__(
        self,
        config: Path = FW_ENV_CONFIG,
        *,
        locations: tuple[EnvLocation, ...] | None = None,
        attempts: int = DEFAULT_ATTEMPTS,
        fault: FaultHook | None = None,
        default_env: Path = DEFAULT_ENV_FILE,
        lock_file: Path = LOCK_FILE,
    ) -> None:
        self._fault = fault  # test-only: see durable.overwrite_file
        self.default_env = Path(default_env)
        self.lock_file = Path(lock_file)
        if locations is None:
            try:
                text = Path(config).read_text()
            except OSError as exc:
                raise ConfigError(f"u-boot: cannot read {config}: {exc}") from exc
            locations = parse_fw_env_config(text, str(config))
        if len(locations) not in (1, 2):
            raise ConfigError("u-boot: one or two env copies")
        if not 1 <= attempts <= 9:
            # boot.cmd decrements with setexpr, which computes in hex: keep to one digit
            raise ConfigError(f"u-boot: attempts must be 1..9, got {attempts}")
        self.locations = locations
        self.redundant = len(locations) == 2
        self.attempts = attempts

    # --- raw env ---------------------------------------------------------------------------

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """libubootenv's lock (the one fw_setenv takes) for one read-modify-write."""
        return held_lock(
            self.lock_file,
            lambda exc: BootloaderError(
                f"u-boot: cannot open the env lock {self.lock_file}: {exc.strerror or exc}"
            ),
        )

    def _missing(self, loc: EnvLocation) -> BootloaderError:
        return BootloaderError(
            f"u-boot: env device {loc.device} does not exist (wrong name in fw_env.config, or "
            "the device is not there yet); nothing is created there"
        )

    def _read_copy(self, loc: EnvLocation) -> ubootenv.UBootEnv:
        try:
            with open(loc.device, "rb") as f:
                f.seek(loc.offset)
                blob = f.read(loc.size)
        except FileNotFoundError as exc:
            # not an invalid copy: a configuration or hardware fault that repair must not "fix"
            raise self._missing(loc) from exc
        except OSError as exc:
            # an unreadable copy counts as an invalid one: the other copy may still serve
            raise BootloaderEnvCorrupt(f"u-boot: cannot read env at {loc.device}: {exc}") from exc
        if len(blob) != loc.size:
            raise BootloaderEnvCorrupt(
                f"u-boot: env copy {loc.device} has {len(blob)} of {loc.size} bytes"
            )
        return ubootenv.decode(blob, redundant=self.redundant)

    def read(self) -> tuple[dict[str, str], int, int]:
        """(variables, index of the current copy, its flags); BootloaderEnvCorrupt if none."""
        if not self.redundant:
            env = self._read_copy(self.locations[0])
            return dict(env.values), 0, 0
        copies: list[ubootenv.UBootEnv | None] = []
        problems: list[str] = []
        for loc in self.locations:
            try:
                copies.append(self._read_copy(loc))
                problems.append("")
            except BootloaderEnvCorrupt as exc:
                copies.append(None)
                problems.append(str(exc))
        first, second = copies
        if first is None and second is None:
            raise BootloaderEnvCorrupt(f"u-boot: no valid env copy ({problems[0]}; {problems[1]})")
        if first is not None and second is not None:
            index = ubootenv.newer(first.flags or 0, second.flags or 0)
        else:
            index = 0 if first is not None else 1
            log.warning("uboot_env_copy_invalid", copy=1 - index, problem=problems[1 - index])
        current = copies[index]
        if current is None:  # unreachable: one of the two is valid here
            raise BootloaderEnvCorrupt("u-boot: no valid env copy")
        return dict(current.values), index, current.flags or 0

    def values(self) -> dict[str, str]:
        return self.read()[0]

    def write(self, changes: Mapping[str, str], *, end_trial_of: str | None = None) -> None:
        """Apply ``changes`` and store the env (redundant: into the other copy, flags + 1)."""
        self._update(lambda _values: changes, end_trial_of=end_trial_of)

    def _update(
        self,
        changes: Callable[[Mapping[str, str]], Mapping[str, str]],
        *,
        end_trial_of: str | None = None,
    ) -> None:
        """One locked read-modify-write: ``changes`` computed from the variables just read."""
        with self._locked():
            values, index, flags = self.read()
            values.update(changes(values))
            if end_trial_of is not None and values.get(TRIAL) == end_trial_of:
                values[TRIAL] = ""
            self._store(values, index, flags)

    def _store(self, values: Mapping[str, str], index: int, flags: int) -> None:
        if self.redundant:
            loc = self.locations[1 - index]
            blob = ubootenv.encode(
                values, loc.size, redundant=True, flags=ubootenv.next_flags(flags)
            )
        else:
            loc = self.locations[0]
            blob = ubootenv.encode(values, loc.size)
        try:
            # a file or device region is rewritten in place; whatever follows it stays
            size = os.stat(loc.device).st_size
            overwrite_file(loc.device, blob, offset=loc.offset, size=size, fault=self._fault)
        except FileNotFoundError as exc:
            raise self._missing(loc) from exc
        except OSError as exc:
            raise BootloaderError(f"u-boot: cannot write env at {loc.device}: {exc}") from exc

    def initialize(self, values: Mapping[str, str] | None = None, *, create: bool = False) -> None:
        """Write a fresh env into every copy: U-Boot's default env with ``values`` on top
        (default: both slots good, A first).

        ``create``: image builders only - create env files that do not exist yet, at the needed
        size. Without it a missing device or file is a BootloaderError and nothing is written.
        The default env file is read first: when it is missing, nothing is written either.
        """
        vals = self.from_default_env(
            values if values is not None else initial_values(attempts=self.attempts)
        )
        with self._locked():
            for loc in self.locations:
                if not loc.device.exists():
                    if not create:
                        raise self._missing(loc)
                    with open(loc.device, "wb") as f:
                        f.truncate(loc.offset + loc.size)
            for i, loc in enumerate(self.locations):
                if self.redundant:
                    blob = ubootenv.encode(vals, loc.size, redundant=True, flags=i)
                else:
                    blob = ubootenv.encode(vals, loc.size)
                self._write_whole(loc, blob)

    def from_default_env(self, values: Mapping[str, str]) -> dict[str, str]:
        """U-Boot's default env (``bootcmd`` and the board's variables) with ``values`` on top."""
        env = read_default_env(self.default_env)
        env.update(values)
        return env

    def _write_whole(self, loc: EnvLocation, blob: bytes) -> None:
        try:
            # O_RDWR without O_CREAT: never creates a file where a device should be
            fd = os.open(loc.device, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise self._missing(loc) from exc
        except OSError as exc:
            raise BootloaderError(f"u-boot: cannot write env at {loc.device}: {exc}") from exc
        try:
            view = memoryview(blob)
            done = 0
            while done < len(blob):
                done += os.pwrite(fd, view[done:], loc.offset + done)
            os.fsync(fd)
        except OSError as exc:
            raise BootloaderError(f"u-boot: cannot write env at {loc.device}: {exc}") from exc
        finally:
            os.close(fd)

    # --- Bootloader protocol --------------------------------------------------------------

    def repair(self, booted: str) -> None:
        """Rewrite a lost env from U-Boot's default env: ``booted`` good, the other slot bad.

        BootloaderError (and nothing written) when the default env file cannot be read or an
        env device is missing: U-Boot then keeps booting from its built-in default env.
        """
        check_slot(booted)
        other = other_slot(booted)
        values = initial_values((booted,), self.attempts)
        values[f"BOOT_{other}_LEFT"] = "0"
        self.initialize(values)
        log.warning(
            "bootloader_env_repaired",
            bootloader=self.name,
            good=booted,
            bad=other,
            default_env=str(self.default_env),
        )

    def state(self) -> BootState:
        return scheme_state(self.values(), self.attempts)

    def primary(self) -> str | None:
        return self.state().next_boot()

    def _order_with_first(self, values: Mapping[str, str], slot: str) -> str:
        order = [s for s in values.get("BOOT_ORDER", "").split() if s in SLOTS]
        other = other_slot(slot)
        return " ".join([slot, other] if other in order else [slot])

    def mark_bad(self, slot: str) -> None:
        check_slot(slot)

        def changes(values: Mapping[str, str]) -> dict[str, str]:
            order = [s for s in values.get("BOOT_ORDER", "").split() if s in SLOTS and s != slot]
            return {"BOOT_ORDER": " ".join(order), f"BOOT_{slot}_LEFT": "0"}

        self._update(changes, end_trial_of=slot)
        log.info("slot_marked_bad", bootloader=self.name, slot=slot)

    def try_once(self, slot: str) -> None:
        check_slot(slot)
        self._update(
            lambda values: {
                "BOOT_ORDER": self._order_with_first(values, slot),
                f"BOOT_{slot}_LEFT": "1",
                TRIAL: slot,
            }
        )
        log.info("slot_set_to_try_once", bootloader=self.name, slot=slot)

    def mark_good(self, slot: str) -> None:
        check_slot(slot)
        self._update(
            lambda values: {
                "BOOT_ORDER": self._order_with_first(values, slot),
                f"BOOT_{slot}_LEFT": str(self.attempts),
            },
            end_trial_of=slot,
        )
        log.info("slot_marked_good", bootloader=self.name, slot=slot)

"""The journal: an atomic, fsync'd record of the job in flight, and the agent's exclusive lock.

Layout of the state directory::

    <state_dir>/journal.json   the JobRecord (schema-versioned JSON), replaced atomically
    <state_dir>/agent.lock     flock'ed by the running agent; holds its pid for the message

Writes go temp file -> fsync -> rename -> fsync dir, so after a power cut the journal holds the
last stored record, never a mix. Every store stamps the kernel boot id
(``/proc/sys/kernel/random/boot_id``), so "did a reboot happen since" is a fact, not a guess.

All methods block (fsync): call them from a worker thread in async code.
The record holds the bundle URL; it may carry a pre-signed credential, so never log it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from otad.agent.bootloader.durable import replace_file
from otad.agent.machine import (
    FINAL_STATES,
    Event,
    JobRecord,
    State,
    advance,
)
from otad.errors import AgentLocked, JournalCorrupt, JournalError

__layer__ = "adapter"

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
JOURNAL_NAME = "journal.json"
LOCK_NAME = "agent.lock"
# the signed start of the bundle being downloaded, kept so a restarted agent can resume it
PREAMBLE_NAME = "download.preamble"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def read_boot_id(path: Path = BOOT_ID_PATH) -> str:
    """The kernel's random boot id (changes on every boot)."""
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise JournalError(f"journal: cannot read the boot id from {path}: {exc}") from exc
    if not value:
        raise JournalError(f"journal: empty boot id in {path}")
    return value


class Journal:
    """The job journal of one state directory.

    ``boot_id``: override the kernel boot id (tests and the fleet simulator give each simulated
    boot its own id). ``clock``: seconds since the epoch, for the record's time stamps.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        boot_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / JOURNAL_NAME
        self.lock_path = self.state_dir / LOCK_NAME
        self.boot_id = boot_id if boot_id is not None else read_boot_id()
        self._clock = clock
        self._lock_fd: int | None = None

    # --- the lock -------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the exclusive lock on the state directory; AgentLocked if another agent has it.

        The lock is an flock on ``agent.lock``: the kernel drops it when the process dies, so a
        crashed agent never leaves a stale lock behind.
        """
        if self._lock_fd is not None:
            return
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise JournalError(
                f"journal: cannot open the lock file {self.lock_path}: {exc}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise AgentLocked(
                f"journal: another otad agent ({who}) already uses {self.state_dir} "
                f"(lock {self.lock_path}); stop it first",
                state_dir=str(self.state_dir),
            ) from None
        except OSError as exc:
            os.close(fd)
            raise JournalError(f"journal: cannot lock {self.lock_path}: {exc}") from exc
        self._lock_fd = fd
        try:
            # informational only (names the holder in the message a second agent gets): a full
            # or failing data partition must not cost the lock, nor leak the locked fd
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            log.warning("journal_lock_pid_not_written", path=str(self.lock_path), error=str(exc))
        log.info("journal_locked", state_dir=str(self.state_dir))

    def release(self) -> None:
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def __enter__(self) -> Journal:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # --- the record -----------------------------------------------------------------------

    def load(self) -> JobRecord | None:
        """The stored record, None when there is none; JournalCorrupt when it is unreadable."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise JournalError(f"journal: cannot read {self.path}: {exc}") from exc
        return decode_record(data, str(self.path))

    def store(self, record: JobRecord) -> JobRecord:
        """Write ``record`` durably (atomic replace) and return it."""
        self._require_lock()
        try:
            replace_file(self.path, encode_record(record))
        except OSError as exc:
            raise JournalError(f"journal: cannot write {self.path}: {exc}") from exc
        log.info(
            "journal_stored",
            job_id=record.job_id,
            state=record.state.value,
            transitions=record.transitions,
        )
        return record

    def begin(
        self,
        job_id: str,
        *,
        target_slot: str,
        version: str,
        bundle_url: str,
        from_version: str = "",
        runtime: Mapping[str, Any] | None = None,
    ) -> JobRecord:
        """Store a new job in ``downloading`` (event download_started), replacing a final one.

        JournalError if a job is still unfinished: the caller cancels or finishes it first.
        """
        current = self.load()
        if current is not None and current.state not in FINAL_STATES | {State.IDLE}:
            raise JournalError(
                f"journal: job {current.job_id} is still {current.state.value}; "
                f"cannot begin job {job_id}",
                job_id=current.job_id,
            )
        now = self._clock()
        fresh = JobRecord(
            job_id=job_id,
            state=State.IDLE,
            target_slot=target_slot,
            version=version,
            bundle_url=bundle_url,
            from_version=from_version,
            boot_id=self.boot_id,
            created=now,
            updated=now,
            runtime=dict(runtime or {}),
        )
        return self.store(advance(fresh, Event.DOWNLOAD_STARTED, boot_id=self.boot_id, now=now))

    def advance(self, record: JobRecord, event: Event | str, **changes: Any) -> JobRecord:
        """Apply ``event`` (TransitionError if not allowed), stamp, store, return the record."""
        return self.store(
            advance(record, event, boot_id=self.boot_id, now=self._clock(), **changes)
        )

    def update(self, record: JobRecord, **changes: Any) -> JobRecord:
        """Store changed fields without a transition (``runtime=`` offsets, ``reported=True``).

        Does not count as a transition and keeps the stored boot id, so it never hides a reboot.
        """
        forbidden = {"state", "transitions", "boot_id", "job_id"} & set(changes)
        if forbidden:
            raise ValueError(f"journal: update() cannot change {sorted(forbidden)}")
        return self.store(dataclasses.replace(record, updated=self._clock(), **changes))

    def rebooted(self, record: JobRecord) -> bool:
        """Did the device boot since ``record`` was stored?"""
        return record.boot_id != self.boot_id

    def quarantine(self) -> Path | None:
        """Move a corrupt journal aside (kept for diagnosis) so the agent can start clean."""
        self._require_lock()
        if not self.path.exists():
            return None
        aside = self.path.with_name(f"{JOURNAL_NAME}.corrupt-{int(self._clock())}")
        os.replace(self.path, aside)
        log.warning("journal_quarantined", path=str(aside))
        return aside

    def save_preamble(self, preamble: bytes) -> str:
        """Keep the bundle preamble of the job in flight (durably); returns its SHA-256."""
        self._require_lock()
        path = self.state_dir / PREAMBLE_NAME
        try:
            replace_file(path, preamble)
        except OSError as exc:
            raise JournalError(f"journal: cannot write {path}: {exc}") from exc
        return hashlib.sha256(preamble).hexdigest()

    def load_preamble(self, sha256: str) -> bytes | None:
        """The kept preamble if it is the one with ``sha256``; None if gone or another one."""
        try:
            data = (self.state_dir / PREAMBLE_NAME).read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == sha256 else None

    def _require_lock(self) -> None:
        if self._lock_fd is None:
            raise JournalError(f"journal: {self.state_dir} is not locked; call acquire() first")


# --- encoding ---------------------------------------------------------------------------------


def encode_record(record: JobRecord) -> bytes:
    doc = {
        "schema": SCHEMA_VERSION,
        "job_id": record.job_id,
        "state": record.state.value,
        "target_slot": record.target_slot,
        "version": record.version,
        "from_version": record.from_version,
        "bundle_url": record.bundle_url,
        "boot_id": record.boot_id,
        "transitions": record.transitions,
        "last_event": record.last_event,
        "reported": record.reported,
        "error": dict(record.error) if record.error is not None else None,
        "created": record.created,
        "updated": record.updated,
        "runtime": dict(record.runtime),
    }
    try:
        return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise JournalError(f"journal: record of job {record.job_id} is not JSON: {exc}") from exc


_FIELDS: Mapping[str, tuple[type, ...]] = {
    "job_id": (str,),
    "state": (str,),
    "target_slot": (str,),
    "version": (str,),
    "from_version": (str,),
    "bundle_url": (str,),
    "boot_id": (str,),
    "transitions": (int,),
    "reported": (bool,),
    "created": (int, float),
    "updated": (int, float),
    "runtime": (dict,),
}


def decode_record(data: bytes, where: str = "journal") -> JobRecord:
    """Parse a stored record; JournalCorrupt for anything that is not exactly one."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JournalCorrupt(f"journal: {where} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise JournalCorrupt(f"journal: {where} is not a JSON object")
    schema = doc.get("schema")
    if schema != SCHEMA_VERSION:
        raise JournalCorrupt(
            f"journal: {where} has schema {schema!r}, this agent reads {SCHEMA_VERSION}"
        )
    for name, types in _FIELDS.items():
        value = doc.get(name)
        # bool is an int in Python: keep counters strictly int
        if not isinstance(value, types) or (types == (int,) and isinstance(value, bool)):
            raise JournalCorrupt(f"journal: {where}: field {name!r} is missing or mistyped")
    error = doc.get("error")
    if error is not None and not (
        isinstance(error, dict)
        and isinstance(error.get("code"), str)
        and isinstance(error.get("message"), str)
    ):
        raise JournalCorrupt(f"journal: {where}: field 'error' is mistyped")
    last_event = doc.get("last_event", "")  # absent in records of the first agent builds
    if not isinstance(last_event, str):
        raise JournalCorrupt(f"journal: {where}: field 'last_event' is mistyped")
    if doc["transitions"] < 0:
        raise JournalCorrupt(f"journal: {where}: negative transition count")
    try:
        return JobRecord(
            job_id=doc["job_id"],
            state=State(doc["state"]),
            target_slot=doc["target_slot"],
            version=doc["version"],
            from_version=doc["from_version"],
            bundle_url=doc["bundle_url"],
            boot_id=doc["boot_id"],
            transitions=doc["transitions"],
            last_event=last_event,
            reported=doc["reported"],
            error=error,
            created=float(doc["created"]),
            updated=float(doc["updated"]),
            runtime=doc["runtime"],
        )
    except ValueError as exc:
        raise JournalCorrupt(f"journal: {where}: {exc}") from exc


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None

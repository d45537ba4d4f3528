"""Rollout persistence: rollouts, per-device outcomes, static groups, operator requests.

The tables live in the replica's SQLite database (``replica.db`` in ``otad-cloud.toml``), so a
backup of one file holds the fleet's whole state. Each process opens its own connection in WAL
mode; the rollout service is the only writer of ``rollouts`` and ``rollout_devices`` after a
rollout is created. Operator commands from other processes (``otad fleet pause`` ...) go through
``rollout_requests``: the CLI inserts a row, the service applies it and writes the result back,
so a decision is never taken on a stale copy of the records.

Every operation is a function of an open transaction's connection, so the same code runs in
two places: :class:`RolloutDB` (its own connection; the CLI and tests) and, inside the cloud
process, the replica's single writer thread (:func:`store_runner`), whose group commit then
covers rollout writes too and whose document cache is not dropped by a second writer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import structlog

from otad.cloud.db import SqliteStore
from otad.cloud.rollout_plan import (
    ACTIVE,
    DeviceRecord,
    DeviceSeen,
    DeviceState,
    Rollout,
    RolloutState,
    check_device_id,
    check_group_name,
)
from otad.errors import RolloutError

__layer__ = "adapter"

log = structlog.get_logger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 2
# Upgrades from each older version, in order (a database is never downgraded).
_MIGRATIONS = {
    1: ("ALTER TABLE rollouts ADD COLUMN max_in_flight INTEGER",),
}
ACTIONS = ("pause", "resume", "abort")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    artifact_id TEXT NOT NULL,
    version TEXT NOT NULL,
    bundle_size INTEGER NOT NULL,
    sha256 TEXT,
    waves TEXT NOT NULL,
    max_failure_rate REAL NOT NULL,
    wave_timeout REAL NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    current_wave INTEGER NOT NULL,
    wave_started_at REAL,
    accepted_waves TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    max_in_flight INTEGER
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    device_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    wave INTEGER NOT NULL,
    state TEXT NOT NULL,
    job_id TEXT,
    progress INTEGER,
    error_code TEXT,
    error_message TEXT,
    url_refreshes INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    finished_at REAL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX IF NOT EXISTS rollout_devices_by_device ON rollout_devices(device_id);
CREATE TABLE IF NOT EXISTS rollout_requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL,
    action TEXT NOT NULL,
    requested_at REAL NOT NULL,
    done_at REAL,
    result TEXT
);
CREATE TABLE IF NOT EXISTS device_groups (
    name TEXT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (name, device_id)
);
CREATE TABLE IF NOT EXISTS fleet_devices (
    device_id TEXT PRIMARY KEY,
    version TEXT,
    slot TEXT,
    state TEXT,
    job_id TEXT,
    error_code TEXT,
    last_seen REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Request:
    seq: int
    rollout_id: str
    action: str
    requested_at: float
    done_at: float | None = None
    result: str | None = None


Work = Callable[[sqlite3.Connection], T]


class Runner(Protocol):
    """Runs a unit of work in one transaction, off the event loop; durable when it returns."""

    async def __call__(self, work: Work[T]) -> T: ...


def create_schema(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    row = conn.execute("SELECT value FROM fleet_meta WHERE key='schema_version'").fetchone()
    if row is None:
        conn.execute(
            "INSERT INTO fleet_meta(key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        return
    try:
        version = int(row[0])
    except ValueError:
        raise RolloutError(f"rollout db: schema version {row[0]!r} is not a number") from None
    if version > SCHEMA_VERSION:
        raise RolloutError(
            f"rollout db: schema version {version}, this otad knows {SCHEMA_VERSION}; upgrade otad"
        )
    # The tables of an older version exist already (CREATE ... IF NOT EXISTS kept them as they
    # were): bring them up to date in the caller's transaction, all or nothing.
    for old in range(version, SCHEMA_VERSION):
        for statement in _MIGRATIONS[old]:
            conn.execute(statement)
    if version != SCHEMA_VERSION:
        conn.execute(
            "UPDATE fleet_meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),)
        )
        log.info("rollout_db_upgraded", old=version, new=SCHEMA_VERSION)


# --- rollouts ------------------------------------------------------------------------------------


def create_rollout(
    conn: sqlite3.Connection, rollout: Rollout, devices: Sequence[DeviceRecord]
) -> None:
    """Store a new rollout; refuse devices that are in another active rollout."""
    busy = busy_devices(conn, [d.device_id for d in devices])
    if busy:
        names = ", ".join(f"{d} ({r})" for d, r in sorted(busy.items())[:5])
        more = f" and {len(busy) - 5} more" if len(busy) > 5 else ""
        raise RolloutError(
            f"rollout: devices already in an active rollout: {names}{more}; "
            "let it finish or abort it first"
        )
    if conn.execute("SELECT 1 FROM rollouts WHERE id=?", (rollout.id,)).fetchone():
        raise RolloutError(f"rollout {rollout.id} exists already")
    _write_rollout(conn, rollout, insert=True)
    write_devices(conn, rollout.id, devices)
    log.info(
        "rollout_created",
        rollout=rollout.id,
        version=rollout.version,
        devices=len(devices),
        waves=list(rollout.waves),
    )


def save(conn: sqlite3.Connection, rollout: Rollout, devices: Iterable[DeviceRecord] = ()) -> None:
    """Persist a decision's new records (one transaction: the caller's)."""
    _write_rollout(conn, rollout, insert=False)
    write_devices(conn, rollout.id, devices)


def load_rollout(conn: sqlite3.Connection, rollout_id: str) -> Rollout:
    row = conn.execute("SELECT * FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
    if row is None:
        raise RolloutError(f"rollout {rollout_id} not found")
    return _rollout_from_row(row)


def load_rollouts(conn: sqlite3.Connection, *, active_only: bool = False) -> list[Rollout]:
    query = "SELECT * FROM rollouts"
    params: tuple[str, ...] = ()
    if active_only:
        query += " WHERE state IN (?, ?)"
        params = tuple(sorted(ACTIVE))
    rows = conn.execute(query + " ORDER BY created_at, id", params).fetchall()
    return [_rollout_from_row(r) for r in rows]


def active_ids(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT id FROM rollouts WHERE state IN (?, ?)", tuple(sorted(ACTIVE)))
    return {r[0] for r in rows}


def load_devices(conn: sqlite3.Connection, rollout_id: str) -> dict[str, DeviceRecord]:
    rows = conn.execute(
        "SELECT device_id, position, wave, state, job_id, progress, error_code, "
        "error_message, url_refreshes, started_at, finished_at FROM rollout_devices "
        "WHERE rollout_id=? ORDER BY position",
        (rollout_id,),
    ).fetchall()
    return {r[0]: _device_from_row(r) for r in rows}


def busy_devices(conn: sqlite3.Connection, device_ids: Sequence[str]) -> dict[str, str]:
    """Which of these devices are in an active rollout (device -> rollout id)."""
    wanted = set(device_ids)
    rows = conn.execute(
        "SELECT d.device_id, d.rollout_id FROM rollout_devices d JOIN rollouts r "
        "ON r.id = d.rollout_id WHERE r.state IN (?, ?)",
        tuple(sorted(ACTIVE)),
    )
    return {r[0]: r[1] for r in rows if r[0] in wanted}


def write_devices(
    conn: sqlite3.Connection, rollout_id: str, devices: Iterable[DeviceRecord]
) -> None:
    conn.executemany(
        "INSERT INTO rollout_devices(rollout_id, device_id, position, wave, state, job_id, "
        "progress, error_code, error_message, url_refreshes, started_at, finished_at) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(rollout_id, device_id) DO UPDATE SET "
        "state=excluded.state, job_id=excluded.job_id, progress=excluded.progress, "
        "error_code=excluded.error_code, error_message=excluded.error_message, "
        "url_refreshes=excluded.url_refreshes, started_at=excluded.started_at, "
        "finished_at=excluded.finished_at",
        [
            (
                rollout_id,
                d.device_id,
                d.position,
                d.wave,
                d.state.value,
                d.job_id,
                d.progress,
                d.error_code,
                d.error_message,
                d.url_refreshes,
                d.started_at,
                d.finished_at,
            )
            for d in devices
        ],
    )


# --- operator requests ---------------------------------------------------------------------------


def add_request(conn: sqlite3.Connection, rollout_id: str, action: str, now: float) -> int:
    if action not in ACTIONS:
        raise RolloutError(f"rollout: unknown action {action!r}")
    load_rollout(conn, rollout_id)  # a clear error for a typo in the id, before queueing
    cur = conn.execute(
        "INSERT INTO rollout_requests(rollout_id, action, requested_at) VALUES (?,?,?)",
        (rollout_id, action, now),
    )
    return int(cur.lastrowid or 0)


def pending_requests(conn: sqlite3.Connection) -> list[Request]:
    rows = conn.execute(
        "SELECT seq, rollout_id, action, requested_at FROM rollout_requests "
        "WHERE done_at IS NULL ORDER BY seq"
    ).fetchall()
    return [Request(*r) for r in rows]


def finish_request(conn: sqlite3.Connection, seq: int, result: str, now: float) -> None:
    conn.execute("UPDATE rollout_requests SET done_at=?, result=? WHERE seq=?", (now, result, seq))


def request_status(conn: sqlite3.Connection, seq: int) -> Request:
    row = conn.execute(
        "SELECT seq, rollout_id, action, requested_at, done_at, result "
        "FROM rollout_requests WHERE seq=?",
        (seq,),
    ).fetchone()
    if row is None:
        raise RolloutError(f"rollout request {seq} not found")
    return Request(*row)


# --- groups --------------------------------------------------------------------------------------


def add_to_group(conn: sqlite3.Connection, name: str, device_ids: Iterable[str]) -> int:
    check_group_name(name)
    ids = [check_device_id(d) for d in device_ids]
    before = conn.total_changes
    conn.executemany(
        "INSERT OR IGNORE INTO device_groups(name, device_id) VALUES (?, ?)",
        [(name, d) for d in ids],
    )
    return conn.total_changes - before


def remove_from_group(conn: sqlite3.Connection, name: str, device_ids: Iterable[str]) -> int:
    check_group_name(name)
    before = conn.total_changes
    conn.executemany(
        "DELETE FROM device_groups WHERE name=? AND device_id=?", [(name, d) for d in device_ids]
    )
    return conn.total_changes - before


def group_members(conn: sqlite3.Connection, name: str) -> list[str]:
    check_group_name(name)
    rows = conn.execute(
        "SELECT device_id FROM device_groups WHERE name=? ORDER BY device_id", (name,)
    ).fetchall()
    return [r[0] for r in rows]


def all_groups(conn: sqlite3.Connection) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, device_id in conn.execute(
        "SELECT name, device_id FROM device_groups ORDER BY name, device_id"
    ):
        out.setdefault(name, []).append(device_id)
    return out


# --- what devices last said ----------------------------------------------------------------------


def record_seen(conn: sqlite3.Connection, seen: Iterable[DeviceSeen]) -> None:
    conn.executemany(
        "INSERT INTO fleet_devices(device_id, version, slot, state, job_id, error_code, "
        "last_seen) VALUES (?,?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET "
        "version=excluded.version, slot=excluded.slot, state=excluded.state, "
        "job_id=excluded.job_id, error_code=excluded.error_code, last_seen=excluded.last_seen",
        [
            (s.device_id, s.version, s.slot, s.state, s.job_id, s.error_code, s.last_seen)
            for s in seen
        ],
    )


def seen_devices(conn: sqlite3.Connection) -> dict[str, DeviceSeen]:
    rows = conn.execute(
        "SELECT device_id, version, slot, state, job_id, error_code, last_seen "
        "FROM fleet_devices ORDER BY device_id"
    ).fetchall()
    return {r[0]: DeviceSeen(*r) for r in rows}


# --- runners -------------------------------------------------------------------------------------


class RolloutDB:
    """Its own connection to the shared database (CLI, tests); blocking calls.

    Not for use from two threads at once; :meth:`runner` gives the service an async form that
    runs every unit on one worker thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: an acknowledged operator command or wave start survives a power cut.
            self._conn.execute("PRAGMA synchronous=FULL")
            self.run(create_schema)
        except sqlite3.Error as exc:
            raise RolloutError(f"rollout db: cannot open {path}: {exc}") from exc
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._conn.close()

    def run(self, work: Work[T]) -> T:
        """Run ``work`` in one write transaction (BEGIN IMMEDIATE: the lock is taken up front,
        so two writers wait for each other instead of failing half way)."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise RolloutError(f"rollout db {self.path}: {exc}") from exc
        try:
            result = work(self._conn)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return result

    def runner(self) -> Runner:
        """An async runner over this connection, on one dedicated worker thread."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="rollout-db"
            )
        executor = self._executor

        async def run(work: Work[T]) -> T:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(executor, self.run, work)

        return run


def store_runner(store: SqliteStore) -> Runner:
    """Run units on the replica store's writer thread (inside the cloud process)."""

    async def run(work: Work[T]) -> T:
        return await store.transact(lambda txn: work(cast(Any, txn).connection))

    return run


def _write_rollout(conn: sqlite3.Connection, r: Rollout, *, insert: bool) -> None:
    values = (
        r.artifact_id,
        r.version,
        r.bundle_size,
        r.sha256,
        json.dumps(list(r.waves)),
        r.max_failure_rate,
        r.wave_timeout,
        r.state.value,
        r.reason,
        r.current_wave,
        r.wave_started_at,
        json.dumps(sorted(r.accepted_waves)),
        r.created_at,
        r.updated_at,
        r.finished_at,
        r.max_in_flight,
    )
    if insert:
        conn.execute(
            "INSERT INTO rollouts(artifact_id, version, bundle_size, sha256, waves, "
            "max_failure_rate, wave_timeout, state, reason, current_wave, wave_started_at, "
            "accepted_waves, created_at, updated_at, finished_at, max_in_flight, id) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (*values, r.id),
        )
        return
    cur = conn.execute(
        "UPDATE rollouts SET artifact_id=?, version=?, bundle_size=?, sha256=?, waves=?, "
        "max_failure_rate=?, wave_timeout=?, state=?, reason=?, current_wave=?, "
        "wave_started_at=?, accepted_waves=?, created_at=?, updated_at=?, finished_at=?, "
        "max_in_flight=? WHERE id=?",
        (*values, r.id),
    )
    if cur.rowcount != 1:
        raise RolloutError(f"rollout {r.id} not found")


def _rollout_from_row(row: Sequence[object]) -> Rollout:
    (
        rollout_id,
        artifact_id,
        version,
        bundle_size,
        sha256,
        waves,
        max_failure_rate,
        wave_timeout,
        state,
        reason,
        current_wave,
        wave_started_at,
        accepted_waves,
        created_at,
        updated_at,
        finished_at,
        max_in_flight,
    ) = row
    try:
        return Rollout(
            id=str(rollout_id),
            artifact_id=str(artifact_id),
            version=str(version),
            bundle_size=int(bundle_size),  # type: ignore[call-overload]
            sha256=str(sha256) if sha256 is not None else None,
            waves=tuple(int(w) for w in json.loads(str(waves))),
            max_failure_rate=float(max_failure_rate),  # type: ignore[arg-type]
            wave_timeout=float(wave_timeout),  # type: ignore[arg-type]
            state=RolloutState(str(state)),
            reason=str(reason),
            current_wave=int(current_wave),  # type: ignore[call-overload]
            wave_started_at=_opt_float(wave_started_at),
            accepted_waves=frozenset(int(w) for w in json.loads(str(accepted_waves))),
            created_at=float(created_at),  # type: ignore[arg-type]
            updated_at=float(updated_at),  # type: ignore[arg-type]
            finished_at=_opt_float(finished_at),
            max_in_flight=None if max_in_flight is None else int(max_in_flight),  # type: ignore[call-overload]
        )
    except (ValueError, TypeError) as exc:
        raise RolloutError(f"rollout db: rollout {rollout_id} has a corrupt row: {exc}") from exc


def _device_from_row(row: Sequence[object]) -> DeviceRecord:
    return DeviceRecord(
        device_id=str(row[0]),
        position=int(row[1]),  # type: ignore[call-overload]
        wave=int(row[2]),  # type: ignore[call-overload]
        state=DeviceState(str(row[3])),
        job_id=None if row[4] is None else str(row[4]),
        progress=None if row[5] is None else int(row[5]),  # type: ignore[call-overload]
        error_code=None if row[6] is None else str(row[6]),
        error_message=None if row[7] is None else str(row[7]),
        url_refreshes=int(row[8]),  # type: ignore[call-overload]
        started_at=_opt_float(row[9]),
        finished_at=_opt_float(row[10]),
    )


def _opt_float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]

"""Durable storage for the cloud side: shadow documents, the outbox, and other owners' tables.

The replica talks to a :class:`ShadowStore` (a Protocol), so a PostgreSQL implementation for a
multi-host deployment can follow without touching the replica. :class:`SqliteStore` is the
default, tuned for a single host:

* **One writer thread.** All writes run on one thread that owns the write connection, so the
  event loop never blocks on disk and SQLite never sees two writers from this process.
* **Group commit.** The writer takes every unit of work that is queued when it becomes free and
  runs them in ONE transaction, so one fsync covers many updates: throughput grows with load
  instead of dying on fsync latency. Each unit runs inside a SAVEPOINT: a unit that raises is
  rolled back alone and never leaves partial state; the others of the batch still commit.
* **Durable before acknowledged.** ``journal_mode=WAL`` with ``synchronous=FULL`` fsyncs the WAL
  at every commit; a unit's future resolves only after its batch committed.
* **Outbox.** Messages that must be published because of a write are inserted in the same
  transaction (:meth:`Transaction.add_outbox`). The publisher deletes them once the broker
  acknowledged them (:meth:`ShadowStore.outbox_done`); on start, whatever is left was committed
  but maybe not published and is published again (at least once).
* Several processes may share one database file (replicas splitting load with a shared
  subscription): every batch takes the write lock with ``BEGIN IMMEDIATE``; when
  ``PRAGMA data_version`` shows another connection committed, a cached document is used only
  after its stored version was checked (a cheap indexed read instead of parsing the row).

Other owners' tables (e.g. rollouts) live in the same database file::

    store = SqliteStore(path, schemas=["CREATE TABLE IF NOT EXISTS rollouts (...)"])
    await store.start()
    def create(txn: Transaction) -> int:
        cur = txn.connection.execute("INSERT INTO rollouts ... RETURNING id", (...))
        return int(cur.fetchone()[0])
    rollout_id = await store.transact(create)          # durable when it returns
    rows = await store.transact(lambda txn: txn.connection.execute("SELECT ...").fetchall())

``schemas`` run once at start, in one transaction, after otad's own tables; keep them
idempotent (``IF NOT EXISTS``). A unit of work must be quick and must not do I/O besides the
connection: it holds up every other writer. ``txn.connection`` is a :mod:`sqlite3` connection
inside an open transaction: never call ``commit``, ``rollback`` or ``executescript`` on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar, cast

import structlog

from otad.errors import ShadowError, ShadowInternal
from otad.shadow import ShadowDocument

__layer__ = "adapter"

log = structlog.get_logger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shadows (
    device_id TEXT PRIMARY KEY,
    version   INTEGER NOT NULL,
    document  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    messages BLOB NOT NULL,   -- the messages of one write, packed (see _pack)
    created  REAL NOT NULL
);
"""

# How many units one transaction takes at most: bounds the latency of the first unit of a batch
# and the memory of one batch; at ~20 us per unit this is well under the time of one fsync.
MAX_BATCH = 2000

# Documents the writer keeps in memory (a few KiB each); past this the cache starts over.
MAX_CACHED = 100_000


class OutboxMessage(NamedTuple):
    """A message that must reach the broker because a write committed.

    The messages of one :meth:`Transaction.add_outbox` call share one row and one ``id``; the
    row is done when its last message is acknowledged (a broker acknowledges the messages of
    one connection in order).
    """

    topic: str
    payload: bytes
    qos: int = 1
    id: int = 0  # assigned by the store


class Transaction(Protocol):
    """What a unit of work sees: the documents, the outbox (and, for SQLite, the connection)."""

    def load(self, device_id: str) -> ShadowDocument | None: ...

    def save(self, device_id: str, document: ShadowDocument) -> None: ...

    def add_outbox(self, messages: Sequence[OutboxMessage]) -> int:
        """Store the messages of one write as one outbox row; return the row's id."""
        ...


class ShadowStore(Protocol):
    """The storage interface of the replica (SQLite here; PostgreSQL can implement it too)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def transact(self, work: Callable[[Transaction], T]) -> T:
        """Run ``work`` in a transaction; return its result once it is durable.

        An exception from ``work`` rolls back exactly its own changes and is raised here.
        """
        ...

    def submit(self, work: Callable[[Transaction], T]) -> asyncio.Future[T]:
        """Like :meth:`transact`, returning the future at once (for pipelined callers)."""
        ...

    async def read(self, device_id: str) -> ShadowDocument | None: ...

    async def outbox_pending(self) -> list[OutboxMessage]:
        """Committed messages not yet acknowledged by the broker, oldest first."""
        ...

    def outbox_done(self, ids: Iterable[int]) -> None:
        """Forget published messages (batched with the next commit; not awaited)."""
        ...


class SqliteTransaction:
    """:class:`Transaction` over the writer's connection, with a per-writer document cache.

    Writes of a unit are collected and sent to SQLite in two ``executemany`` calls when the unit
    ends (:meth:`flush`): every ``execute`` releases and takes back the GIL, which measured as
    a large share of the writer's time when the event loop thread is busy too.
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        cache: dict[str, ShadowDocument],
        fresh: set[str] | None = None,
    ) -> None:
        self.connection = connection
        self._cache = cache
        # The cached documents known to match their rows. The writer empties it when another
        # process committed; a cached document not in it is used only after its stored version
        # was checked (a version names one document: every write of a shadow raises it).
        self._fresh: set[str] = fresh if fresh is not None else set(cache)
        # Cache entries a unit replaced, to put back if the unit is rolled back.
        self._undo: dict[str, ShadowDocument | None] = {}
        self._saves: dict[str, ShadowDocument] = {}
        self._rows: list[tuple[int, bytes, float]] = []
        self._next_id = 0  # the last outbox id handed out in this transaction (0: not read yet)
        self._unit_next_id = 0

    def begin_unit(self) -> None:
        self._undo = {}
        self._unit_next_id = self._next_id

    def rollback_unit(self) -> None:
        for device_id, previous in self._undo.items():
            self._fresh.discard(device_id)  # checked again if used: always safe
            if previous is None:
                self._cache.pop(device_id, None)
            else:
                self._cache[device_id] = previous
        self._undo = {}
        self._saves.clear()
        self._rows.clear()
        self._next_id = self._unit_next_id

    def flush(self) -> None:
        """Send the unit's collected writes to SQLite (still inside its transaction)."""
        try:
            if self._saves:
                self.connection.executemany(
                    "INSERT INTO shadows (device_id, version, document) VALUES (?, ?, ?) "
                    "ON CONFLICT (device_id) DO UPDATE SET version = excluded.version, "
                    "document = excluded.document",
                    [(d, doc.version, doc.to_storage()) for d, doc in self._saves.items()],
                )
            if self._rows:
                self.connection.executemany(
                    "INSERT INTO outbox (id, messages, created) VALUES (?, ?, ?)", self._rows
                )
        except sqlite3.Error as exc:
            raise ShadowInternal(f"db: cannot store shadows or outbox rows: {exc}") from exc
        finally:
            self._saves.clear()
            self._rows.clear()

    def load(self, device_id: str) -> ShadowDocument | None:
        doc = self._cache.get(device_id)
        if doc is not None:
            if device_id in self._fresh:
                return doc
            try:
                row = self.connection.execute(
                    "SELECT version FROM shadows WHERE device_id = ?", (device_id,)
                ).fetchone()
            except sqlite3.Error as exc:
                raise ShadowInternal(f"db: cannot read the shadow of {device_id}: {exc}") from exc
            if row is not None and row[0] == doc.version:
                self._fresh.add(device_id)
                return doc
            self._cache.pop(device_id, None)
        try:
            row = self.connection.execute(
                "SELECT document FROM shadows WHERE device_id = ?", (device_id,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise ShadowInternal(f"db: cannot read the shadow of {device_id}: {exc}") from exc
        if row is None:
            return None
        doc = ShadowDocument.from_storage(row[0])
        self._cache[device_id] = doc
        self._fresh.add(device_id)
        return doc

    def save(self, device_id: str, document: ShadowDocument) -> None:
        # The cache follows the transaction; a rolled-back unit restores it (rollback_unit).
        if device_id not in self._undo:
            self._undo[device_id] = self._cache.get(device_id)
        self._cache[device_id] = document
        self._fresh.add(device_id)  # ours: newer than the row until the unit is flushed
        self._saves[device_id] = document

    def add_outbox(self, messages: Sequence[OutboxMessage]) -> int:
        # One row per write, not per message. Ids are handed out here (the transaction holds the
        # write lock, so no other process inserts meanwhile) and never reused: they continue
        # from AUTOINCREMENT's high-water mark.
        if not self._next_id:
            try:
                self._next_id = self.connection.execute(
                    "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'),"
                    " 0), COALESCE((SELECT MAX(id) FROM outbox), 0))"
                ).fetchone()[0]
            except sqlite3.Error as exc:
                raise ShadowInternal(f"db: cannot read the outbox: {exc}") from exc
        self._next_id += 1
        self._rows.append((self._next_id, _pack(messages), time.time()))
        return self._next_id


def _pack(messages: Sequence[OutboxMessage]) -> bytes:
    out = bytearray()
    for m in messages:
        topic = m.topic.encode("utf-8")
        out += struct.pack(">BHI", m.qos, len(topic), len(m.payload)) + topic + m.payload
    return bytes(out)


def _unpack(row_id: int, blob: bytes) -> list[OutboxMessage]:
    out, pos = [], 0
    try:
        while pos < len(blob):
            qos, topic_len, payload_len = struct.unpack_from(">BHI", blob, pos)
            pos += 7
            topic = blob[pos : pos + topic_len].decode("utf-8")
            pos += topic_len
            payload = bytes(blob[pos : pos + payload_len])
            pos += payload_len
            if pos > len(blob):
                raise ValueError("truncated")
            out.append(OutboxMessage(topic, payload, qos, row_id))
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise ShadowInternal(f"db: outbox row {row_id} is corrupt: {exc}") from exc
    return out


@dataclass
class _Unit:
    work: Callable[[Transaction], Any]
    future: asyncio.Future[Any]


class _Stop:
    pass


_STOP = _Stop()


class SqliteStore:
    """SQLite implementation of :class:`ShadowStore` (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        schemas: Sequence[str] = (),
        max_batch: int = MAX_BATCH,
        max_cached: int = MAX_CACHED,
    ) -> None:
        self.path = Path(path)
        self.schemas = tuple(schemas)
        self.max_batch = max_batch
        self.max_cached = max_cached
        self._queue: queue.SimpleQueue[_Unit | _Stop] = queue.SimpleQueue()
        self._done_ids: list[int] = []
        self._done_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Counters for logs and benchmarks: commits, units, seconds the writer was busy and the
        # part of it spent in COMMIT (the fsync).
        self.batches = 0
        self.units = 0
        self.busy_seconds = 0.0
        self.commit_seconds = 0.0

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._writer, args=(ready,), name=f"sqlite-writer:{self.path.name}", daemon=True
        )
        self._thread.start()
        await ready

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(thread.join)

    async def __aenter__(self) -> SqliteStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the interface -----------------------------------------------------------------------

    async def transact(self, work: Callable[[Transaction], T]) -> T:
        if self._thread is None or self._loop is None:
            raise ShadowInternal(f"db: store {self.path} is not started")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Unit(work, future))
        return await future

    def submit(self, work: Callable[[Transaction], T]) -> asyncio.Future[T]:
        """Like :meth:`transact` but returns the future at once (for pipelined callers)."""
        if self._thread is None or self._loop is None:
            raise ShadowInternal(f"db: store {self.path} is not started")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Unit(work, future))
        return future

    async def read(self, device_id: str) -> ShadowDocument | None:
        return await self.transact(lambda txn: txn.load(device_id))

    async def outbox_pending(self) -> list[OutboxMessage]:
        def pending(txn: Transaction) -> list[OutboxMessage]:
            conn = cast(SqliteTransaction, txn).connection
            rows = conn.execute("SELECT id, messages FROM outbox ORDER BY id").fetchall()
            return [m for row_id, blob in rows for m in _unpack(row_id, bytes(blob))]

        return await self.transact(pending)

    def outbox_done(self, ids: Iterable[int]) -> None:
        with self._done_lock:
            self._done_ids.extend(ids)
        # Wake the writer even when no other work comes, so the outbox does not grow forever.
        if self._thread is not None and self._loop is not None:
            self._queue.put(_Unit(_noop, self._loop.create_future()))

    # --- the writer thread -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (the sqlite3 module's implicit
        # transactions would commit behind our back on DDL).
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ShadowInternal(f"db: {self.path} cannot use WAL (journal_mode is {mode})")
        # FULL: the WAL is fsync'd at every commit, so "committed" means "survives power loss".
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            for schema in self.schemas:
                for statement in _split_sql(schema):
                    conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return conn

    def _writer(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = self._connect()
        except (sqlite3.Error, OSError, ShadowError) as exc:
            error = (
                exc
                if isinstance(exc, ShadowError)
                else ShadowInternal(f"db: cannot open {self.path}: {exc}")
            )
            loop.call_soon_threadsafe(_set_exception, ready, error)
            self._thread = None
            return
        loop.call_soon_threadsafe(_set_result, ready, None)
        cache: dict[str, ShadowDocument] = {}
        fresh: set[str] = set()  # see SqliteTransaction
        data_version = conn.execute("PRAGMA data_version").fetchone()[0]
        stopping = False
        try:
            while not stopping:
                first = self._queue.get()
                batch: list[_Unit] = []
                item: _Unit | _Stop = first
                while True:
                    if isinstance(item, _Stop):
                        stopping = True
                    else:
                        batch.append(item)
                    if len(batch) >= self.max_batch:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                with self._done_lock:
                    done, self._done_ids = self._done_ids, []
                if not batch and not done:
                    continue
                data_version = self._run(conn, cache, fresh, batch, done, data_version)
        finally:
            conn.close()

    def _run(
        self,
        conn: sqlite3.Connection,
        cache: dict[str, ShadowDocument],
        fresh: set[str],
        batch: list[_Unit],
        done: list[int],
        data_version: int,
    ) -> int:
        loop = self._loop
        assert loop is not None
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        started = time.perf_counter()
        seen = data_version
        try:
            conn.execute("BEGIN IMMEDIATE")
            # Read under the write lock: no other connection can commit until our COMMIT, and
            # our own commit does not change it, so it is the right mark for the next batch.
            # (Read after the COMMIT instead, it would hide another process's commit that
            # slipped in between, and a stale cached document would be used.)
            seen = conn.execute("PRAGMA data_version").fetchone()[0]
            if seen != data_version:
                fresh.clear()  # another process committed: check cached documents on use
            if len(cache) > self.max_cached:
                cache.clear()  # a bound on memory; documents are read again when needed
                fresh.clear()
            if done:
                conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in done])
            txn = SqliteTransaction(conn, cache, fresh)
            for unit in batch:
                if unit.future.cancelled():
                    continue
                conn.execute("SAVEPOINT unit")
                txn.begin_unit()
                try:
                    result = unit.work(txn)
                    txn.flush()
                except Exception as exc:  # the unit's own failure: undo it alone
                    conn.execute("ROLLBACK TO unit")
                    conn.execute("RELEASE unit")
                    txn.rollback_unit()
                    results.append((unit.future, None, exc))
                    continue
                conn.execute("RELEASE unit")
                results.append((unit.future, result, None))
            committing = time.perf_counter()
            conn.execute("COMMIT")
            self.commit_seconds += time.perf_counter() - committing
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            cache.clear()
            fresh.clear()
            with self._done_lock:
                self._done_ids.extend(done)
            log.error("db_commit_failed", path=str(self.path), error=str(exc), units=len(batch))
            error = ShadowInternal(f"db: commit to {self.path} failed: {exc}")
            results = [(unit.future, None, error) for unit in batch]
        self.batches += 1
        self.units += len(batch)
        self.busy_seconds += time.perf_counter() - started
        loop.call_soon_threadsafe(_resolve, results)
        return int(seen)


def _split_sql(script: str) -> list[str]:
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements


def _noop(_txn: Transaction) -> None:
    return None


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _resolve(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, error in results:
        if future.done():
            continue
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)

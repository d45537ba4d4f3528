"""The SQLite store: group commit, per-unit rollback, durability, outbox, shared file, schemas."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import cast

import pytest

from otad import shadow
from otad.cloud.db import OutboxMessage, SqliteStore, SqliteTransaction, Transaction
from otad.errors import ShadowInternal, ShadowVersionConflict
from otad.shadow import ShadowDocument


def doc(version: int, **reported: shadow.JsonValue) -> ShadowDocument:
    return ShadowDocument({}, dict(reported), {}, {}, version, 1000 + version)


async def test_db_group_commit_batches_concurrent_units(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "s.db") as store:
        await store.transact(lambda txn: None)  # warm up: schema exists, writer idle
        before = store.batches

        def write(i: int):
            return lambda txn: txn.save(f"d{i}", doc(1, i=i))

        await asyncio.gather(*(store.transact(write(i)) for i in range(500)))
        commits = store.batches - before
        assert commits < 100, f"{commits} commits for 500 units: no batching"
        assert (await store.read("d499")) == doc(1, i=499)


async def test_db_failed_unit_is_rolled_back_alone(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "s.db") as store:

        def bad(txn: Transaction) -> None:
            txn.save("dev1", doc(5, x=1))
            txn.add_outbox([OutboxMessage("t", b"p")])
            raise ShadowVersionConflict("no")

        results = await asyncio.gather(
            store.transact(lambda txn: txn.save("dev2", doc(1, y=2))),
            store.transact(bad),
            store.transact(lambda txn: txn.load("dev1")),
            return_exceptions=True,
        )
        assert results[0] is None
        assert isinstance(results[1], ShadowVersionConflict)
        assert results[2] is None  # the cache was rolled back with the unit
        assert await store.read("dev1") is None
        assert await store.read("dev2") == doc(1, y=2)
        assert await store.outbox_pending() == []


async def test_db_is_durable_across_reopen_and_outbox_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with SqliteStore(path) as store:

        def write(txn: Transaction) -> int:
            txn.save("dev1", doc(3, a=[1, 2]))
            return txn.add_outbox(
                [
                    OutboxMessage("state/dev1/update/delta", b"\x00{}"),
                    OutboxMessage("state/dev1/update/accepted", b"{}", qos=0),
                ]
            )

        row = await store.transact(write)
        assert row > 0
    async with SqliteStore(path) as store:
        assert await store.read("dev1") == doc(3, a=[1, 2])
        pending = await store.outbox_pending()
        assert {m.id for m in pending} == {row}
        assert [(m.topic, m.payload, m.qos) for m in pending] == [
            ("state/dev1/update/delta", b"\x00{}", 1),
            ("state/dev1/update/accepted", b"{}", 0),
        ]
        store.outbox_done([pending[0].id])
        await store.transact(lambda txn: None)  # the delete rides on the next commit
        assert await store.outbox_pending() == []


async def test_db_two_stores_on_one_file_see_each_others_commits(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with SqliteStore(path) as one, SqliteStore(path) as two:
        await one.transact(lambda txn: txn.save("dev1", doc(1)))
        assert await two.read("dev1") == doc(1)  # now cached in two
        await one.transact(lambda txn: txn.save("dev1", doc(2)))
        # data_version moved: two checks the row's version and reads version 2.
        assert await two.read("dev1") == doc(2)


async def test_db_cached_document_checked_after_another_process_committed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    async with SqliteStore(path) as one, SqliteStore(path, max_cached=1) as two:
        await two.transact(lambda txn: txn.save("dev1", doc(1, a=1)))
        await one.transact(lambda txn: txn.save("dev2", doc(1)))  # data_version moves for two

        def update(txn: Transaction) -> list[ShadowDocument | None]:
            seen = [txn.load("dev1")]  # cached, version checked against the row: still 1
            txn.save("dev1", doc(2, a=2))
            seen.append(txn.load("dev1"))  # our own write, not yet in the row
            return seen

        assert await two.transact(update) == [doc(1, a=1), doc(2, a=2)]
        await one.transact(lambda txn: txn.save("dev1", doc(3, a=3)))
        # A transaction that reads nothing (an outbox delete, say) does not make the cached
        # dev1 fresh again.
        await two.transact(lambda txn: None)
        assert await two.read("dev1") == doc(3, a=3)  # the row moved on: read again
        # Past max_cached the cache starts over; reads stay right.
        assert await two.read("dev2") == doc(1)
        assert await two.read("dev1") == doc(3, a=3)


async def test_db_other_owners_tables_share_the_file(tmp_path: Path) -> None:
    schema = "CREATE TABLE IF NOT EXISTS rollouts (id INTEGER PRIMARY KEY, name TEXT NOT NULL);"
    async with SqliteStore(tmp_path / "s.db", schemas=[schema]) as store:

        def create(txn: Transaction) -> int:
            conn = cast(SqliteTransaction, txn).connection
            cur = conn.execute("INSERT INTO rollouts (name) VALUES (?) RETURNING id", ("wave",))
            return int(cur.fetchone()[0])

        rollout_id = await store.transact(create)
    async with SqliteStore(tmp_path / "s.db", schemas=[schema]) as store:
        rows = await store.transact(
            lambda txn: (
                cast(SqliteTransaction, txn)
                .connection.execute("SELECT id, name FROM rollouts")
                .fetchall()
            )
        )
    assert rows == [(rollout_id, "wave")]


async def test_db_uses_wal_and_full_sync(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "s.db") as store:
        modes = await store.transact(
            lambda txn: [
                cast(SqliteTransaction, txn).connection.execute(f"PRAGMA {p}").fetchone()[0]
                for p in ("journal_mode", "synchronous")
            ]
        )
    assert modes == ["wal", 2]  # 2 = FULL


async def test_db_cannot_open_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(ShadowInternal, match="cannot open"):
        await SqliteStore(tmp_path / "dir.db").start()


async def test_db_not_started_refuses_work(tmp_path: Path) -> None:
    with pytest.raises(ShadowInternal, match="not started"):
        await SqliteStore(tmp_path / "s.db").transact(lambda txn: None)


async def test_db_corrupt_rows_are_reported_not_crashing(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with SqliteStore(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO shadows VALUES ('dev1', 1, 'not json')")
        conn.execute("INSERT INTO outbox (messages, created) VALUES (x'01ff', 0)")
    async with SqliteStore(path) as store:
        with pytest.raises(ShadowInternal, match="corrupt"):
            await store.read("dev1")
        with pytest.raises(ShadowInternal, match="corrupt"):
            await store.outbox_pending()
        # The store keeps working for everything else.
        await store.transact(lambda txn: txn.save("dev2", doc(1)))
        assert await store.read("dev2") == doc(1)


async def test_db_replica_processing_rejects_a_corrupt_document_with_500(tmp_path: Path) -> None:
    from otad.cloud.replica import process_request

    path = tmp_path / "s.db"
    async with SqliteStore(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO shadows VALUES ('dev1', 1, '{broken')")
    payload = b'{"state": {"reported": {"a": 1}}, "clientToken": "t"}'
    async with SqliteStore(path) as store:
        bad = await store.transact(
            lambda txn: process_request(txn, "state/{device_id}", "state/dev1/update", payload, 5)
        )
        good = await store.transact(
            lambda txn: process_request(txn, "state/{device_id}", "state/dev2/update", payload, 5)
        )
    (messages, outcome) = bad
    assert outcome == "rejected" and messages[0].topic == "state/dev1/update/rejected"
    body = shadow.parse_json_object(messages[0].payload)
    assert body["code"] == 500 and body["clientToken"] == "t"
    assert good[1] == "accepted"
    assert [m.topic for m in good[0]] == [
        "state/dev2/update/documents",
        "state/dev2/update/accepted",
    ]


async def test_db_replica_unit_stores_one_outbox_row_closed_by_its_last_accepted(
    tmp_path: Path,
) -> None:
    from otad.cloud.replica import _process_batch, _Request

    requests = [
        _Request(
            "state/dev1/fleet/update", b'{"state": {"desired": {"a": 1}}, "clientToken": "1"}'
        ),
        _Request("state/dev1/update", b"{nope"),
        _Request("state/dev2/update", b'{"state": {"reported": {"b": 2}}, "clientToken": "2"}'),
        _Request("state/dev2/get", b""),
    ]
    async with SqliteStore(tmp_path / "s.db") as store:
        results = await store.transact(
            lambda txn: _process_batch(txn, "state/{device_id}", requests, 5)
        )
        pending = await store.outbox_pending()
    assert [outcome for _, outcome in results] == ["accepted", "rejected", "accepted", "get"]
    # One row: dev1's delta and accepted, dev2's accepted, in order.
    assert len({m.id for m in pending}) == 1
    assert [m.topic for m in pending] == [
        "state/dev1/update/delta",
        "state/dev1/update/accepted",
        "state/dev2/update/accepted",
    ]
    # Only the unit's last accepted closes the row when its PUBACK comes.
    ids = [(m.topic, m.outbox_id) for messages, _ in results for m in messages]
    assert [i for _, i in ids if i] == [pending[0].id]
    assert ids[-2] == ("state/dev2/update/accepted", pending[0].id)

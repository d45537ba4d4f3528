"""The rollout tables on a real SQLite file, the status view, and the fault plan."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from otad.cloud import rollout_db as db
from otad.cloud import rollout_plan as rp
from otad.cloud import rollout_view as view
from otad.cloud.rollout_plan import DeviceState, RolloutState
from otad.errors import RolloutError
from otad.fleet.simulator import plan_faults


def new(
    rollout_id: str = "r-1", devices: tuple[str, ...] = ("a", "b", "c")
) -> tuple[rp.Rollout, tuple[rp.DeviceRecord, ...]]:
    return rp.new_rollout(
        rollout_id=rollout_id,
        artifact_id="art",
        version="2.0",
        bundle_size=10,
        devices=devices,
        waves=rp.parse_waves("1,100%"),
        max_failure_rate=0.1,
        wave_timeout=60,
        now=100.0,
    )


@pytest.fixture
def store(tmp_path: Path) -> db.RolloutDB:
    s = db.RolloutDB(tmp_path / "state" / "shadow.db")
    yield s
    s.close()


def test_rollout_db_round_trips_rollouts_and_devices(store: db.RolloutDB) -> None:
    rollout, records = new()
    store.run(lambda c: db.create_rollout(c, rollout, records))
    changed = replace(
        rollout,
        state=RolloutState.PAUSED,
        reason="why",
        current_wave=1,
        wave_started_at=5.0,
        accepted_waves=frozenset({0}),
    )
    failed = replace(records[0], state=DeviceState.FAILED, error_code="x", error_message="m")
    store.run(lambda c: db.save(c, changed, [failed]))
    assert store.run(lambda c: db.load_rollout(c, "r-1")) == changed
    devices = store.run(lambda c: db.load_devices(c, "r-1"))
    assert devices["a"] == failed and devices["b"] == records[1]
    assert store.run(db.active_ids) == {"r-1"}
    assert [r.id for r in store.run(lambda c: db.load_rollouts(c, active_only=True))] == ["r-1"]


def test_rollout_db_refuses_a_device_in_two_active_rollouts(store: db.RolloutDB) -> None:
    rollout, records = new()
    store.run(lambda c: db.create_rollout(c, rollout, records))
    second, second_records = new("r-2", ("c", "d"))
    with pytest.raises(RolloutError, match=r"already in an active rollout: c \(r-1\)"):
        store.run(lambda c: db.create_rollout(c, second, second_records))
    # Nothing of the refused rollout was stored.
    assert [r.id for r in store.run(db.load_rollouts)] == ["r-1"]
    with pytest.raises(RolloutError, match="exists already"):
        store.run(lambda c: db.create_rollout(c, rollout, ()))
    done = replace(rollout, state=RolloutState.COMPLETED)
    store.run(lambda c: db.save(c, done))
    store.run(lambda c: db.create_rollout(c, second, second_records))


def test_rollout_db_requests_queue_and_finish(store: db.RolloutDB) -> None:
    rollout, records = new()
    store.run(lambda c: db.create_rollout(c, rollout, records))
    seq = store.run(lambda c: db.add_request(c, "r-1", "pause", 1.0))
    assert [r.action for r in store.run(db.pending_requests)] == ["pause"]
    store.run(lambda c: db.finish_request(c, seq, "ok", 2.0))
    assert store.run(db.pending_requests) == []
    assert store.run(lambda c: db.request_status(c, seq)).result == "ok"
    with pytest.raises(RolloutError, match="unknown action"):
        store.run(lambda c: db.add_request(c, "r-1", "explode", 1.0))
    with pytest.raises(RolloutError, match="not found"):
        store.run(lambda c: db.add_request(c, "r-404", "pause", 1.0))
    with pytest.raises(RolloutError, match="not found"):
        store.run(lambda c: db.request_status(c, 999))


def test_rollout_db_groups(store: db.RolloutDB) -> None:
    assert store.run(lambda c: db.add_to_group(c, "g", ["b", "a", "b"])) == 2
    assert store.run(lambda c: db.add_to_group(c, "g", ["a"])) == 0
    assert store.run(lambda c: db.group_members(c, "g")) == ["a", "b"]
    assert store.run(lambda c: db.remove_from_group(c, "g", ["a", "zz"])) == 1
    assert store.run(db.all_groups) == {"g": ["b"]}
    with pytest.raises(RolloutError):
        store.run(lambda c: db.add_to_group(c, "bad name", ["a"]))
    with pytest.raises(RolloutError):
        store.run(lambda c: db.add_to_group(c, "g", ["bad id"]))


def test_rollout_db_failed_unit_leaves_nothing(store: db.RolloutDB) -> None:
    def half(conn: sqlite3.Connection) -> None:
        db.add_to_group(conn, "g", ["a"])
        raise RolloutError("boom")

    with pytest.raises(RolloutError):
        store.run(half)
    assert store.run(db.all_groups) == {}


def test_rollout_db_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "shadow.db"
    db.RolloutDB(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE fleet_meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(RolloutError, match="schema version 99"):
        db.RolloutDB(path)


def test_rollout_db_keeps_max_in_flight(store: db.RolloutDB) -> None:
    rollout, records = new()
    paced = replace(rollout, max_in_flight=250)
    store.run(lambda c: db.create_rollout(c, paced, records))
    assert store.run(lambda c: db.load_rollout(c, "r-1")).max_in_flight == 250
    store.run(lambda c: db.save(c, replace(paced, max_in_flight=None)))
    assert store.run(lambda c: db.load_rollout(c, "r-1")).max_in_flight is None


def test_rollout_db_upgrades_a_version_1_database(tmp_path: Path) -> None:
    # A database written before rollouts could be paced: no max_in_flight column, version 1.
    path = tmp_path / "shadow.db"
    store = db.RolloutDB(path)
    rollout, records = new()
    store.run(lambda c: db.create_rollout(c, rollout, records))
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE rollouts DROP COLUMN max_in_flight")
    conn.execute("UPDATE fleet_meta SET value='1' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    store = db.RolloutDB(path)
    try:
        assert store.run(lambda c: db.load_rollout(c, "r-1")) == rollout
        assert store.run(lambda c: db.load_devices(c, "r-1"))["a"] == records[0]
    finally:
        store.close()
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("SELECT value FROM fleet_meta WHERE key='schema_version'")
        assert version.fetchone() == (str(db.SCHEMA_VERSION),)
    finally:
        conn.close()


def test_rollout_db_refuses_a_schema_version_that_is_not_a_number(tmp_path: Path) -> None:
    path = tmp_path / "shadow.db"
    db.RolloutDB(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE fleet_meta SET value='two' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(RolloutError, match="not a number"):
        db.RolloutDB(path)


def test_rollout_db_seen_devices_upsert(store: db.RolloutDB) -> None:
    seen = rp.DeviceSeen("a", "1.0", "A", "idle", None, None, 5.0)
    store.run(lambda c: db.record_seen(c, [seen]))
    newer = replace(seen, version="2.0", slot="B", last_seen=9.0)
    store.run(lambda c: db.record_seen(c, [newer]))
    assert store.run(db.seen_devices) == {"a": newer}


def test_view_summarizes_and_renders_a_rollout() -> None:
    rollout, records = new()
    devices = {r.device_id: r for r in records}
    devices["a"] = replace(
        devices["a"],
        state=DeviceState.ROLLED_BACK,
        error_code="health_check_failed",
        error_message="unit x failed",
    )
    devices["b"] = replace(devices["b"], state=DeviceState.SUCCEEDED)
    rollout = replace(rollout, current_wave=1, state=RolloutState.PAUSED, reason="wave 1: ...")
    summary = view.summarize(rollout, devices, 160.0)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["counts"] == {"pending": 1, "rolled_back": 1, "succeeded": 1}
    assert summary["waves"][0]["failure_rate"] == 1.0 and summary["waves"][1]["size"] == 2
    assert summary["failures"] == [
        {
            "device": "a",
            "wave": 1,
            "state": "rolled_back",
            "code": "health_check_failed",
            "message": "unit x failed",
        }
    ]
    assert summary["elapsed"] == 60.0
    console = Console(width=120, record=True)
    console.print(view.render_rollout(rollout, devices, 160.0))
    text = console.export_text()
    assert "PAUSED" in text and "wave 1: ..." in text and "health_check_failed" in text
    assert view.outcome_counts(devices.values()) == {
        "updated": 1,
        "rolled_back": 1,
        "failed": 0,
        "not_done": 1,
        "skipped": 0,
    }


def test_view_device_rows_include_silent_devices() -> None:
    seen = {"a": rp.DeviceSeen("a", "2.0", "B", "succeeded", "r-1", None, 90.0)}
    rows = view.device_rows(["a", "b"], seen, 100.0)
    assert rows[0]["version"] == "2.0" and rows[0]["seen_ago"] == 10.0
    assert rows[1] == {
        "device": "b",
        "version": None,
        "slot": None,
        "state": None,
        "job": None,
        "error": None,
        "last_seen": None,
        "seen_ago": None,
    }
    console = Console(width=120, record=True)
    console.print(view.render_devices(rows))
    assert "never reported" in console.export_text()


def test_plan_faults_spares_the_first_devices_and_is_repeatable() -> None:
    ids = [f"d{i}" for i in range(20)]
    faults = plan_faults(ids, fail_health=0.1, fail_boot=0.05, seed=3, spare=1)
    assert len(faults.fail_health) == 2 and len(faults.fail_boot) == 1
    assert not faults.fail_health & faults.fail_boot
    assert "d0" not in faults.fail_health | faults.fail_boot
    assert plan_faults(ids, fail_health=0.1, fail_boot=0.05, seed=3, spare=1) == faults
    with pytest.raises(ValueError, match="between 0 and 1"):
        plan_faults(ids, fail_health=1.5)
    with pytest.raises(ValueError, match="more failing devices"):
        plan_faults(ids, fail_health=1.0, spare=1)

"""The journal: atomic records, schema checks, boot ids, and the one-agent lock."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otad.agent.journal import Journal, decode_record, encode_record, read_boot_id
from otad.agent.machine import Event, JobRecord, State
from otad.errors import AgentLocked, JournalCorrupt, JournalError, TransitionError


def test_journal_begin_advance_and_reload(tmp_path: Path) -> None:
    with Journal(tmp_path, boot_id="boot-1", clock=lambda: 100.0) as j:
        assert j.load() is None
        rec = j.begin("j1", target_slot="B", version="2.0", bundle_url="https://h/a?sig=x")
        assert rec.state == State.DOWNLOADING and rec.transitions == 1
        rec = j.update(rec, runtime={"offset": 4096, "etag": '"abc"'})
        assert rec.transitions == 1
        rec = j.advance(rec, Event.PAYLOAD_VERIFIED)
        loaded = j.load()
    assert loaded == rec
    assert loaded is not None and loaded.runtime == {"offset": 4096, "etag": '"abc"'}
    assert loaded.boot_id == "boot-1" and loaded.transitions == 2


def test_journal_rebooted_compares_boot_ids(tmp_path: Path) -> None:
    with Journal(tmp_path, boot_id="boot-1") as j:
        rec = j.begin("j1", target_slot="B", version="2", bundle_url="u")
        assert not j.rebooted(rec)
    with Journal(tmp_path, boot_id="boot-2") as j:
        loaded = j.load()
        assert loaded is not None and j.rebooted(loaded)
        # update() keeps the stored boot id: it never hides a reboot
        loaded = j.update(loaded, runtime={"x": 1})
        assert j.rebooted(loaded)
        assert not j.rebooted(j.advance(loaded, Event.DOWNLOAD_RESUMED))


def test_journal_real_boot_id_is_read() -> None:
    assert len(read_boot_id()) == 36


def test_journal_missing_boot_id_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="boot id"):
        read_boot_id(tmp_path / "nope")


def test_journal_begin_refuses_over_an_unfinished_job(tmp_path: Path) -> None:
    with Journal(tmp_path, boot_id="b") as j:
        j.begin("j1", target_slot="B", version="2", bundle_url="u")
        with pytest.raises(JournalError, match="still downloading"):
            j.begin("j2", target_slot="B", version="3", bundle_url="u")


def test_journal_begin_replaces_a_final_job(tmp_path: Path) -> None:
    with Journal(tmp_path, boot_id="b") as j:
        rec = j.begin("j1", target_slot="B", version="2", bundle_url="u")
        j.advance(rec, Event.FAILED, error={"code": "x", "message": "m"})
        rec2 = j.begin("j2", target_slot="B", version="3", bundle_url="u")
        assert rec2.job_id == "j2" and rec2.transitions == 1 and rec2.error is None


def test_journal_illegal_event_changes_nothing(tmp_path: Path) -> None:
    with Journal(tmp_path, boot_id="b") as j:
        rec = j.begin("j1", target_slot="B", version="2", bundle_url="u")
        before = j.path.read_bytes()
        with pytest.raises(TransitionError):
            j.advance(rec, Event.HEALTH_PASSED)
        assert j.path.read_bytes() == before


def test_journal_write_without_lock_is_refused(tmp_path: Path) -> None:
    j = Journal(tmp_path, boot_id="b")
    with pytest.raises(JournalError, match="not locked"):
        j.begin("j1", target_slot="B", version="2", bundle_url="u")


def test_journal_update_cannot_forge_transitions(tmp_path: Path) -> None:
    with Journal(tmp_path, boot_id="b") as j:
        rec = j.begin("j1", target_slot="B", version="2", bundle_url="u")
        with pytest.raises(ValueError, match="cannot change"):
            j.update(rec, state=State.SUCCEEDED)


def test_journal_second_agent_in_another_process_gets_agent_locked(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from otad.agent.journal import Journal\n"
        "from otad.errors import AgentLocked\n"
        "try:\n"
        f"    Journal(__import__('pathlib').Path({str(tmp_path)!r}), boot_id='b').acquire()\n"
        "except AgentLocked as e:\n"
        "    print(e.code, e); sys.exit(3)\n"
    )
    with Journal(tmp_path, boot_id="b"):
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
    assert proc.returncode == 3, proc.stderr
    assert "agent_locked" in proc.stdout and f"pid {os.getpid()}" in proc.stdout
    # released: a new agent gets it
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 0


def test_journal_second_lock_in_the_same_process_is_refused(tmp_path: Path) -> None:
    with Journal(tmp_path, boot_id="b"), pytest.raises(AgentLocked, match="already uses"):
        Journal(tmp_path, boot_id="b").acquire()


def test_journal_crash_leaves_no_stale_lock(tmp_path: Path) -> None:
    code = (
        "import os, pathlib\n"
        "from otad.agent.journal import Journal\n"
        f"Journal(pathlib.Path({str(tmp_path)!r}), boot_id='b').acquire()\n"
        "os._exit(9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=60, check=False)
    assert proc.returncode == 9
    with Journal(tmp_path, boot_id="b") as j:
        assert j.locked


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "not valid JSON"),
        (b"{not json", "not valid JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"schema": 2}', "schema 2"),
        (b'{"schema": 1}', "missing or mistyped"),
    ],
)
def test_journal_corrupt_file_raises_journal_corrupt(
    tmp_path: Path, content: bytes, match: str
) -> None:
    (tmp_path / "journal.json").write_bytes(content)
    with Journal(tmp_path, boot_id="b") as j:
        with pytest.raises(JournalCorrupt, match=match):
            j.load()
        aside = j.quarantine()
        assert aside is not None and aside.read_bytes() == content
        assert j.load() is None


def sample() -> JobRecord:
    return JobRecord(job_id="j", state=State.REBOOTING, target_slot="A", version="1", boot_id="b")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("transitions", True),
        ("transitions", -1),
        ("transitions", "3"),
        ("state", "bogus"),
        ("target_slot", "C"),
        ("error", {"code": 1}),
        ("runtime", []),
        ("reported", 1),
    ],
)
def test_journal_mistyped_field_is_corrupt(field: str, value: object) -> None:
    doc = json.loads(encode_record(sample()))
    doc[field] = value
    with pytest.raises(JournalCorrupt):
        decode_record(json.dumps(doc).encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_journal_garbage_never_crashes_the_parser(data: bytes) -> None:
    with contextlib.suppress(JournalCorrupt):
        decode_record(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=80, deadline=None)
@given(
    job_id=st.text(min_size=1, max_size=30),
    state=st.sampled_from(list(State)),
    slot=st.sampled_from(["A", "B"]),
    version=st.text(max_size=20),
    url=st.text(max_size=60),
    transitions=st.integers(0, 1000),
    reported=st.booleans(),
    runtime=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
)
def test_journal_records_round_trip(
    job_id: str,
    state: State,
    slot: str,
    version: str,
    url: str,
    transitions: int,
    reported: bool,
    runtime: dict[str, object],
) -> None:
    rec = JobRecord(
        job_id=job_id,
        state=state,
        target_slot=slot,
        version=version,
        bundle_url=url,
        transitions=transitions,
        reported=reported,
        runtime=runtime,
        error={"code": "c", "message": "m"},
        created=1.5,
        updated=2.0,
    )
    assert decode_record(encode_record(rec)) == rec


def test_journal_lock_survives_a_failing_pid_write(tmp_path: Path) -> None:
    # a full data partition (a tiny tmpfs, filled): creating the lock file still works, the
    # pid write fails with ENOSPC; the lock is held anyway, released, and taken again
    mnt = tmp_path / "full"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]
    if subprocess.run(mount, check=False, timeout=30).returncode:
        pytest.fail("mounting a tmpfs is required for the full-partition test")
    try:
        with (mnt / "filler").open("wb") as f, contextlib.suppress(OSError):
            f.write(b"x" * 65536 * 2)
        state = mnt / "state"
        state.mkdir()
        j = Journal(state, boot_id="b")
        j.acquire()
        assert j.locked and (state / "agent.lock").read_bytes() == b""
        with pytest.raises(AgentLocked, match="another process"):
            Journal(state, boot_id="b").acquire()
        j.release()
        j.acquire()  # no fd leaked with the lock: it can be taken again
        j.release()
    finally:
        subprocess.run(["umount", str(mnt)], check=False, timeout=30)

"""GRUB env block codec and the two-copy GRUB backend, against the real grub-editenv."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plugins.threads import assert_concurrent_marks_lose_nothing

from otad.agent.bootloader import Bootloader, grubenv
from otad.agent.bootloader.grub import (
    COPY_NAMES,
    SCHEME_KEYS,
    EnvCopy,
    GrubBootloader,
    current_copy,
    initial_values,
    read_copy,
    render,
    seq_numbers_seen,
    write_initial,
)
from otad.errors import BootloaderEnvCorrupt, BootloaderError

REPO = Path(__file__).resolve().parents[2]
GRUB_CFG = REPO / "boot" / "grub" / "grub.cfg"

names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="=\n\\\0"),
    min_size=1,
    max_size=12,
).filter(lambda n: not n.startswith("#"))
values = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40
)
env_dicts = st.dictionaries(names, values, max_size=8)


def editenv(path: Path, *args: str) -> str:
    out = subprocess.run(
        ["grub-editenv", str(path), *args], check=True, capture_output=True, timeout=30
    ).stdout
    return out.decode("utf-8", "surrogateescape")  # bytes: no newline translation of \r


# --- the codec -----------------------------------------------------------------------------


def test_grubenv_block_layout() -> None:
    data = grubenv.encode({"ORDER": "A B", "A_OK": "1"})
    assert len(data) == 1024
    assert data.startswith(b"# GRUB Environment Block\nORDER=A B\nA_OK=1\n#")
    assert data.endswith(b"#" * 900)


@settings(max_examples=200, deadline=None)
@given(env_dicts)
def test_grubenv_round_trips(env: dict[str, str]) -> None:
    try:
        data = grubenv.encode(env)
    except BootloaderError:
        return  # does not fit 1024 bytes
    decoded = grubenv.decode(data)
    assert dict(decoded.values) == env and not decoded.truncated
    assert decoded.names == tuple(env)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=1100))
def test_grubenv_garbage_never_crashes_the_parser(data: bytes) -> None:
    with contextlib.suppress(BootloaderEnvCorrupt):
        grubenv.decode(data)
    grubenv.decode(grubenv.SIGNATURE + data)  # with the signature it always parses


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=1100))
def test_grubenv_reading_a_garbage_copy_never_raises(data: bytes) -> None:
    # a copy is either invalid (with a reason) or has SEQ == SEQ_END: never an exception
    env_copy = read_copy_bytes(data)
    if env_copy.seq is None:
        assert env_copy.problem
    else:
        assert env_copy.values["SEQ"] == env_copy.values["SEQ_END"]
        assert int(env_copy.values["SEQ"]) == env_copy.seq


def read_copy_bytes(data: bytes) -> EnvCopy:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "g"
        p.write_bytes(data)
        return read_copy(p)


@pytest.mark.parametrize(
    ("data", "expected", "truncated"),
    [
        (b"# GRUB Environment Block\nA=1\nB", {"A": "1"}, True),  # no '=' : GRUB stops
        (b"# GRUB Environment Block\nA=1\nB=2", {"A": "1"}, True),  # unterminated value
        (b"# GRUB Environment Block\n#A=1\nB=2\n###", {"B": "2"}, False),  # comment line
        (b"# GRUB Environment Block\nA=x\\\ny\nA=2\n", {"A": "2"}, False),  # last wins
        (b"# GRUB Environment Block\nA=a\\\\b\\\nc\n", {"A": "a\\b\nc"}, False),
    ],
)
def test_grubenv_decodes_like_grub(data: bytes, expected: dict[str, str], truncated: bool) -> None:
    env = grubenv.decode(data)
    assert dict(env.values) == expected and env.truncated == truncated


@pytest.mark.parametrize("data", [b"", b"# GRUB Environment Block", b"#GRUB", b"\0" * 1024])
def test_grubenv_missing_signature_is_corrupt(data: bytes) -> None:
    with pytest.raises(BootloaderEnvCorrupt, match="signature"):
        grubenv.decode(data)


@pytest.mark.parametrize("name", ["", "#x", "a=b", "a\nb", "a\\b", "a\0"])
def test_grubenv_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(BootloaderError, match="invalid variable name"):
        grubenv.encode({name: "1"})


def test_grubenv_too_much_data_is_refused() -> None:
    with pytest.raises(BootloaderError, match="do not fit"):
        grubenv.encode({"X": "y" * 1000})
    with pytest.raises(BootloaderError, match="NUL"):
        grubenv.encode({"X": "a\0"})


# --- against the real grub-editenv -------------------------------------------------------


def test_grubenv_editenv_reads_what_we_write(tmp_path: Path) -> None:
    f = tmp_path / "env"
    env = {"ORDER": "B A", "A_OK": "1", "otad_extra": "quiet otad.x=1", "empty": "", "bs": "a\\b"}
    f.write_bytes(grubenv.encode(env))
    listed = editenv(f, "list").splitlines()
    assert listed == [f"{k}={v}" for k, v in env.items()]


def test_grubenv_we_read_what_editenv_writes(tmp_path: Path) -> None:
    f = tmp_path / "env"
    editenv(f, "create")
    editenv(f, "set", "ORDER=A B", "A_OK=1", "nl=one\ntwo", "bs=c:\\x\\", "eq=a=b")
    data = f.read_bytes()
    assert len(data) == 1024
    env = grubenv.decode(data)
    assert dict(env.values) == {
        "ORDER": "A B",
        "A_OK": "1",
        "nl": "one\ntwo",
        "bs": "c:\\x\\",
        "eq": "a=b",
    }
    # Debian's grub-editenv adds a "# WARNING" comment line; apart from it, the same bytes
    ours = grubenv.encode(env.values)
    stripped = data.replace(
        b"# WARNING: Do not edit this file by tools other than grub-editenv!!!\n", b""
    )
    assert ours[: ours.index(b"\n#")] == stripped[: stripped.index(b"\n#")]
    editenv(f, "unset", "A_OK")
    assert "A_OK" not in grubenv.decode(f.read_bytes()).values


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
        # no newline: `grub-editenv list` prints values raw, one per line (newlines: see above)
        st.text(
            alphabet=st.characters(min_codepoint=1, max_codepoint=0x7F, blacklist_characters="\n"),
            max_size=30,
        ),
        max_size=5,
    )
)
def test_grubenv_editenv_agrees_on_random_env(tmp_path: Path, env: dict[str, str]) -> None:
    f = tmp_path / "env"
    f.unlink(missing_ok=True)
    editenv(f, "create")
    if env:
        editenv(f, "set", *(f"{k}={v}" for k, v in env.items()))
    assert dict(grubenv.decode(f.read_bytes()).values) == env
    ours = tmp_path / "ours"
    ours.write_bytes(grubenv.encode(env))
    assert editenv(ours, "list").split("\n")[:-1] == [f"{k}={v}" for k, v in env.items()]


# --- the two-copy backend ------------------------------------------------------------------


@pytest.fixture
def grub(tmp_path: Path) -> GrubBootloader:
    write_initial(tmp_path)
    return GrubBootloader(tmp_path)


def test_grub_is_a_bootloader_and_starts_with_both_slots_good(grub: GrubBootloader) -> None:
    assert isinstance(grub, Bootloader)
    st_ = grub.state()
    assert st_.order == ("A", "B") and st_.next_boot() == "A"
    assert st_.slot("A").good and st_.slot("B").good and st_.slot("A").tries_left == 1


def test_grub_operations_follow_the_rauc_scheme(grub: GrubBootloader) -> None:
    grub.mark_bad("B")
    v = grub.values()
    assert (v["B_OK"], v["B_TRY"]) == ("0", "0") and grub.state().slot("B").bad
    grub.try_once("B")
    v = grub.values()
    assert (v["ORDER"], v["B_OK"], v["B_TRY"], v["otad_trial"]) == ("B A", "1", "0", "B")
    assert grub.state().slot("B").on_trial and grub.state().slot("A").good
    assert grub.primary() == "B"
    grub.mark_good("B")
    v = grub.values()
    assert (v["ORDER"], v["B_OK"], v["B_TRY"], v["otad_trial"]) == ("B A", "1", "0", "")
    assert grub.state().slot("B").good


def test_grub_writes_both_copies_with_increasing_seq(grub: GrubBootloader) -> None:
    before = [read_copy(p).seq for p in grub.paths]
    assert before == [1, 2]
    grub.mark_bad("B")
    after = [read_copy(p) for p in grub.paths]
    assert [c.seq for c in after] == [3, 4]  # copy 0 was the older one: written first
    assert after[0].values["B_OK"] == after[1].values["B_OK"] == "0"
    grub.mark_good("A")
    assert [read_copy(p).seq for p in grub.paths] == [5, 6]


def test_grub_editenv_lists_our_copies(grub: GrubBootloader) -> None:
    grub.try_once("B")
    for p in grub.paths:
        listed = dict(line.split("=", 1) for line in editenv(p, "list").splitlines())
        assert listed["ORDER"] == "B A" and listed["SEQ"] == listed["SEQ_END"]


def test_grub_save_env_like_change_in_the_current_copy_is_seen(grub: GrubBootloader) -> None:
    # what GRUB does at boot: X_TRY=1 in the current copy, SEQ unchanged (grub-editenv set
    # rewrites the same way: in the block, variable replaced in place)
    grub.try_once("B")
    _, _, current = grub.read()
    editenv(current.path, "set", "B_TRY=1")
    st_ = grub.state()
    assert st_.slot("B").tries_left == 0 and not st_.slot("B").bootable
    assert st_.next_boot() == "A"
    grub.mark_good("A")  # the fallback slot confirms itself: the B_TRY=1 mark is kept
    assert grub.values()["B_TRY"] == "1"


def test_grub_extra_variables_are_kept(grub: GrubBootloader) -> None:
    grub.write({"otad_extra": "otad.test=1", "otad_noinitrd": "1"})
    grub.mark_bad("A")
    assert grub.values()["otad_extra"] == "otad.test=1"


def test_grub_missing_copy_is_created(tmp_path: Path) -> None:
    (tmp_path / COPY_NAMES[0]).write_bytes(render({"ORDER": "A B", "A_OK": "1", "B_OK": "1"}, 7))
    g = GrubBootloader(tmp_path)
    assert g.state().next_boot() == "A"
    g.mark_bad("B")
    assert [read_copy(p).seq for p in g.paths] == [9, 8]


def test_grub_no_valid_copy_is_env_corrupt(tmp_path: Path) -> None:
    (tmp_path / COPY_NAMES[0]).write_bytes(b"junk")
    with pytest.raises(BootloaderEnvCorrupt, match=r"grubenv\.0: .*signature.*grubenv\.1: missing"):
        GrubBootloader(tmp_path).state()


def test_grub_unwritable_env_is_a_bootloader_error(grub: GrubBootloader) -> None:
    grub.paths[1].unlink()
    grub.paths[1].mkdir()  # a directory where the copy should be: open fails with EISDIR
    with pytest.raises(BootloaderError, match="cannot write grubenv"):
        grub.mark_bad("B")


def test_grub_current_copy_rule() -> None:
    def mk(seq: int | None) -> EnvCopy:
        return EnvCopy(Path(f"/x/{seq}"), seq, {})

    assert current_copy((mk(None), mk(None))) is None
    assert current_copy((mk(3), mk(None))) == mk(3)
    assert current_copy((mk(None), mk(2))) == mk(2)
    assert current_copy((mk(3), mk(4))) == mk(4)
    a, b = mk(5), EnvCopy(Path("/y"), 5, {})
    assert current_copy((a, b)) is a  # a tie: copy 0, as in grub.cfg


# --- torn writes: a power cut at every byte of each copy write ---------------------------


@pytest.mark.parametrize("phase", ["first_copy", "second_copy"])
@pytest.mark.parametrize("shape", ["in_place", "truncated", "zero_filled"])
def test_grub_torn_write_reads_a_complete_state(tmp_path: Path, phase: str, shape: str) -> None:
    write_initial(tmp_path)
    g = GrubBootloader(tmp_path)
    g.try_once("B")
    g.write({"otad_extra": "x" * 40})  # old content longer than the new: remnants can survive
    old_state = g.state()
    snapshot = {p: p.read_bytes() for p in g.paths}
    # the write under test: mark B bad; record what each copy would become
    # the write under test marks B bad and drops otad_extra: the new content is shorter, so
    # an in-place tear can leave old bytes after the new SEQ_END
    g.write({"B_OK": "0", "B_TRY": "0", "otad_trial": "", "otad_extra": ""})
    new_state = g.state()
    new_bytes = {p: p.read_bytes() for p in g.paths}
    first, second = sorted(g.paths, key=lambda p: read_copy(p).seq or 0)
    torn = first if phase == "first_copy" else second
    content_end = max(
        b.index(b"\n", b.index(b"SEQ_END=")) + 1 for b in (*new_bytes.values(), *snapshot.values())
    )
    # every byte where content lives, then a sample of the padding, and the end
    for cut in [*range(0, content_end + 2), *range(content_end + 2, 1024, 61), 1024]:
        for p in g.paths:
            p.write_bytes(snapshot[p])
        if phase == "second_copy":
            first.write_bytes(new_bytes[first])
        new, old = new_bytes[torn], snapshot[torn]
        if shape == "in_place":
            torn.write_bytes(new[:cut] + old[cut:])
        elif shape == "truncated":
            torn.write_bytes(new[:cut])
        else:
            torn.write_bytes(new[:cut] + bytes(1024 - cut))
        got = g.state()
        # never a mix: the old or the new state. Cut before the new SEQ_END line: the old
        # one; once the first copy is whole (second phase, or a full write): the new one.
        new_end = new.index(b"\n", new.index(b"SEQ_END=")) + 1
        if phase == "second_copy" or cut == 1024:
            assert got == new_state, f"cut at {cut}"
        elif cut < new_end:
            assert got == old_state, f"cut at {cut}"
        else:
            assert got in (old_state, new_state), f"cut at {cut}"
    assert old_state != new_state


def test_grub_torn_write_then_next_write_recovers(tmp_path: Path) -> None:
    write_initial(tmp_path)
    g = GrubBootloader(tmp_path)
    data = render({"ORDER": "B A", "A_OK": "1", "B_OK": "1", "B_TRY": "0", "A_TRY": "0"}, 3)
    g.paths[0].write_bytes(data[:40] + g.paths[0].read_bytes()[40:])  # torn inside ORDER
    assert g.state().next_boot() == "A"  # copy 0 torn: copy 1 (seq 2) is current
    g.mark_good("A")
    assert all(read_copy(p).seq is not None for p in g.paths)


# --- the shipped grub.cfg ------------------------------------------------------------------


def test_grub_cfg_passes_grub_script_check() -> None:
    proc = subprocess.run(
        ["grub-script-check", str(GRUB_CFG)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grub_cfg_script_check_catches_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cfg"
    bad.write_text(GRUB_CFG.read_text().replace("    done\n", "", 1))
    proc = subprocess.run(
        ["grub-script-check", str(bad)], capture_output=True, timeout=30, check=False
    )
    assert proc.returncode != 0


def test_grub_cfg_reads_the_copies_and_variables_the_backend_writes() -> None:
    cfg = GRUB_CFG.read_text()
    for name in COPY_NAMES:
        assert f'load_env --file "${{otad_envdir}}/{name}" SEQ SEQ_END' in cfg
    load = next(line for line in cfg.splitlines() if 'load_env --file "${otad_env}"' in line)
    for key in (*SCHEME_KEYS, "otad_extra", "otad_noinitrd"):
        assert f" {key}" in load
    assert 'save_env --file "${otad_env}" A_TRY B_TRY' in cfg
    assert "otad.slot=${otad_slot}" in cfg and cfg.rstrip().endswith("reboot")


def test_grub_repair_rewrites_both_copies(tmp_path: Path) -> None:
    write_initial(tmp_path, {**initial_values(), "otad_extra": "quiet"})
    g = GrubBootloader(tmp_path)
    for p in g.paths:
        p.write_bytes(b"\0" * 1024)
    with pytest.raises(BootloaderEnvCorrupt):
        g.state()
    g.repair("B")
    st_ = g.state()
    assert st_.order == ("B", "A") and st_.slot("B").good and st_.slot("A").bad
    assert [read_copy(p).seq for p in g.paths] == [1, 2]
    # a readable env keeps its otad_* settings through a repair
    g.write({"otad_extra": "quiet"})
    g.repair("A")
    assert g.values()["otad_extra"] == "quiet" and g.values()["otad_trial"] == ""


class Crash(Exception):
    """Stands for os._exit in the crash matrix: the process ends in the middle of a write."""


@pytest.mark.parametrize("crash_on_copy", [1, 2])
def test_grub_fault_hook_tears_a_real_write(tmp_path: Path, crash_on_copy: int) -> None:
    write_initial(tmp_path)
    calls: list[str] = []

    def fault(point: str) -> None:
        calls.append(point)
        if len(calls) == crash_on_copy:
            raise Crash(point)

    g = GrubBootloader(tmp_path, fault=fault)
    before = g.state()
    with pytest.raises(Crash, match="bootloader_env_half_written"):
        g.mark_bad("B")
    after = GrubBootloader(tmp_path).state()
    # a torn first copy leaves the old state; once the first copy is whole, the new one
    assert after == before if crash_on_copy == 1 else after.slot("B").bad


def test_grub_missing_env_dir_is_an_error_and_repair_creates_nothing(tmp_path: Path) -> None:
    # the ESP is not mounted: not a corrupt env, and repair must not make a directory there
    env_dir = tmp_path / "efi" / "EFI" / "otad"
    g = GrubBootloader(env_dir)
    for call in (g.state, lambda: g.mark_bad("B"), lambda: g.repair("A")):
        with pytest.raises(BootloaderError, match=r"otad does not exist") as e:
            call()
        assert not isinstance(e.value, BootloaderEnvCorrupt)
    assert not (tmp_path / "efi").exists()


def test_grub_no_copies_at_all_is_an_error_and_repair_creates_nothing(tmp_path: Path) -> None:
    g = GrubBootloader(tmp_path)
    with pytest.raises(BootloaderError, match=r"grubenv\.0 and grubenv\.1 do not exist") as e:
        g.state()
    assert not isinstance(e.value, BootloaderEnvCorrupt)
    with pytest.raises(BootloaderError, match=r"do not exist"):
        g.repair("A")
    assert not any(p.exists() for p in g.paths)


def test_grub_interrupted_writes_never_reuse_a_seq(tmp_path: Path) -> None:
    # the reviewer's case: two interrupted writes of copy 0; with a reused SEQ the first
    # sector of write 1 and the second of write 2 combined into a "valid", newer copy
    write_initial(tmp_path, {**initial_values(), "otad_extra": "console=ttyS0 " + "x" * 450})
    g = GrubBootloader(tmp_path)
    snap = [p.read_bytes() for p in g.paths]
    before = g.state()
    g.mark_bad("B")  # power cut: only copy 0's first sector reached the disk
    w1 = g.paths[0].read_bytes()
    g.paths[0].write_bytes(w1[:512] + snap[0][512:])
    g.paths[1].write_bytes(snap[1])
    assert read_copy(g.paths[0]).seq is None and g.state() == before
    mid = [p.read_bytes() for p in g.paths]
    g.try_once("B")  # power cut again: only copy 0's second sector reached the disk
    w2 = g.paths[0].read_bytes()
    g.paths[0].write_bytes(mid[0][:512] + w2[512:])
    g.paths[1].write_bytes(mid[1])
    assert read_copy(g.paths[0]).seq is None, "halves of two writes must not form a valid copy"
    assert g.state() == before


def test_grub_new_seq_is_above_every_number_on_disk() -> None:
    torn = render(initial_values(), 40)[:512] + render(initial_values(), 7)[512:]
    assert seq_numbers_seen(torn) == 40
    assert seq_numbers_seen(b"junk SEQ=99\nSEQ_END=12\n") == 12  # only whole variables count
    assert seq_numbers_seen(b"# GRUB\nSEQ=99999999999\n") == 0  # beyond SEQ_LIMIT: not ours


def test_grub_concurrent_writers_never_lose_an_update(tmp_path: Path) -> None:
    # the daemon and `otad agent mark-bad`: separate instances, real flock on separate fds
    write_initial(tmp_path)
    assert_concurrent_marks_lose_nothing(GrubBootloader(tmp_path), GrubBootloader(tmp_path))
    assert (tmp_path / "grubenv.lock").exists() and len(list(tmp_path.glob("grubenv.[01]"))) == 2

"""The simulated bootloader: power-on picks, consumes attempts, falls back; state in a file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from plugins.threads import assert_concurrent_marks_lose_nothing

from otad.agent.bootloader import Bootloader
from otad.agent.bootloader.sim import SimBootloader
from otad.errors import BootloaderEnvCorrupt, BootloaderError


def test_sim_fresh_device_boots_initial_slot_and_keeps_booting_it(tmp_path: Path) -> None:
    sim = SimBootloader(tmp_path / "sim.json")
    assert isinstance(sim, Bootloader)
    for _ in range(10):
        assert sim.power_on() == "A"
        sim.mark_good("A")  # the running system confirms each boot
    assert sim.state().slot("A").good


def test_sim_unconfirmed_good_slot_falls_back_after_its_attempts(tmp_path: Path) -> None:
    sim = SimBootloader(tmp_path / "sim.json", attempts=3)
    assert [sim.power_on() for _ in range(4)] == ["A", "A", "A", "B"]


def test_sim_try_once_boots_target_once_then_falls_back(tmp_path: Path) -> None:
    sim = SimBootloader(tmp_path / "sim.json")
    sim.mark_bad("B")
    assert sim.primary() == "A"
    sim.try_once("B")
    st = sim.state()
    assert st.order == ("B", "A") and st.slot("B").tries_left == 1 and st.slot("B").on_trial
    assert st.slot("A").good  # the other slot keeps its state
    assert sim.power_on() == "B"
    assert sim.state().slot("B").tries_left == 0
    assert sim.power_on() == "A"  # not confirmed: falls back


def test_sim_committed_target_stays(tmp_path: Path) -> None:
    sim = SimBootloader(tmp_path / "sim.json")
    sim.try_once("B")
    assert sim.power_on() == "B"
    sim.mark_good("B")
    assert sim.power_on() == "B"
    assert sim.state().slot("B").good


def test_sim_failing_slot_falls_back_within_one_power_on(tmp_path: Path) -> None:
    sim = SimBootloader(tmp_path / "sim.json")
    sim.try_once("B")
    sim.fail_boot("B")
    assert sim.power_on() == "A"
    assert sim.state().slot("B").tries_left == 0


def test_sim_fails_n_times_then_boots(tmp_path: Path) -> None:
    sim = SimBootloader(tmp_path / "sim.json", attempts=3)
    sim.mark_good("B")
    sim.fail_boot("B", 2)
    assert sim.power_on() == "B"  # two failed attempts, the third comes up
    assert sim.state().slot("B").tries_left == 0


def test_sim_no_bootable_slot_raises(tmp_path: Path) -> None:
    sim = SimBootloader(tmp_path / "sim.json")
    sim.fail_boot("A")
    sim.fail_boot("B")
    with pytest.raises(BootloaderError, match="no bootable slot"):
        sim.power_on()
    assert sim.booted() is None


def test_sim_last_resort_boots_the_committed_slot_whose_confirmation_was_lost(
    tmp_path: Path,
) -> None:
    # B committed earlier; an update to A failed and A was marked bad; B's attempts ran out
    # because its confirmations were lost (power cuts): B, not A, must boot
    sim = SimBootloader(tmp_path / "sim.json", attempts=1, initial="B")
    sim.mark_bad("A")
    assert sim.power_on() == "B" and not sim.rescued()
    assert sim.state().next_boot() is None  # B's one attempt is used, not confirmed
    assert sim.power_on() == "B" and sim.rescued()
    sim.mark_good("B")
    assert sim.power_on() == "B" and not sim.rescued()


def test_sim_last_resort_never_boots_a_slot_on_trial(tmp_path: Path) -> None:
    sim = SimBootloader(tmp_path / "sim.json", attempts=1)
    sim.try_once("B")
    sim.fail_boot("B")
    assert sim.power_on() == "A"  # B's try fails, A's attempt is used now
    assert sim.power_on() == "A" and sim.rescued()  # last resort: A (committed), never B


def test_sim_state_survives_a_new_instance(tmp_path: Path) -> None:
    path = tmp_path / "sim.json"
    SimBootloader(path).try_once("B")
    again = SimBootloader(path)
    assert again.state().order == ("B", "A")
    assert again.power_on() == "B"


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"[]", b'{"format": 2}', b'{"format": 1, "order": ["C"]}', b"\xff\xfe"],
)
def test_sim_corrupt_state_file_raises_env_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "sim.json"
    path.write_bytes(content)
    with pytest.raises(BootloaderEnvCorrupt):
        SimBootloader(path).state()


def test_sim_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="attempts"):
        SimBootloader(tmp_path / "s.json", attempts=0)
    sim = SimBootloader(tmp_path / "s.json")
    with pytest.raises(ValueError, match="unknown slot"):
        sim.mark_bad("C")


def test_sim_state_file_is_plain_json(tmp_path: Path) -> None:
    path = tmp_path / "sim.json"
    SimBootloader(path, durable=False).mark_bad("B")
    raw = json.loads(path.read_text())
    assert raw["slots"]["B"] == {"bad": True, "good": False, "tries": 0}


def test_sim_repair_rewrites_a_corrupt_state(tmp_path: Path) -> None:
    path = tmp_path / "sim.json"
    sim = SimBootloader(path)
    sim.fail_boot("B", 2)
    path.write_bytes(b"{garbage")
    sim.repair("A")
    st_ = sim.state()
    assert st_.next_boot() == "A" and st_.slot("A").good and st_.slot("B").bad
    sim.mark_good("B")
    assert sim.power_on() == "B"  # the fail counter was lost with the file: B boots


def test_sim_last_resort_boots_only_the_first_committed_slot(tmp_path: Path) -> None:
    # grub.cfg and boot.cmd save nothing on the last-resort path: the same (first committed)
    # slot is picked at every power-on; they never go on to the second committed slot
    sim = SimBootloader(tmp_path / "sim.json", attempts=1)
    sim.fail_boot("A")
    sim.fail_boot("B", 1)
    for _ in range(3):
        with pytest.raises(BootloaderError, match=r"A \(last resort\)") as e:
            sim.power_on()
        assert "B (last resort)" not in str(e.value)
    assert sim.booted() is None


def test_sim_concurrent_writers_never_lose_an_update(tmp_path: Path) -> None:
    # the daemon and `otad agent mark-bad` each with their own instance (own lock fd)
    path = tmp_path / "sim.json"
    assert_concurrent_marks_lose_nothing(
        SimBootloader(path, durable=False), SimBootloader(path, durable=False)
    )

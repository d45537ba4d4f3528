"""systemd/: the agent unit, the health check wired to boot-complete.target, the tmpfiles entry.

`systemd-analyze verify` checks a unit's ExecStart= binary exists. The units name the installed
path /usr/bin/otad, which does not exist on a build or CI machine, so the test verifies a copy in
which only that path is rewritten to the real `otad` of this checkout's virtualenv (the test
asserts nothing else differs). Every other line is verified exactly as shipped.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from integration_files.layerfiles import SYSTEMD, UnitEntry, parse_unit, unit_values

UNITS = ("otad.service", "otad-health.service")
INSTALLED_OTAD = "/usr/bin/otad"
VENV_OTAD = Path(sys.executable).with_name("otad")
TIMEOUT = 60


def entries(name: str) -> list[UnitEntry]:
    return parse_unit((SYSTEMD / name).read_text())


def service(name: str, key: str) -> list[str]:
    return unit_values(entries(name), "Service", key)


def unit(name: str, key: str) -> list[str]:
    return unit_values(entries(name), "Unit", key)


def rewritten_copy(src: Path, dest_dir: Path) -> Path:
    """The unit with /usr/bin/otad replaced by this checkout's otad; nothing else changes."""
    text = src.read_text()
    assert INSTALLED_OTAD in text
    copy = text.replace(INSTALLED_OTAD, str(VENV_OTAD))
    assert copy.replace(str(VENV_OTAD), INSTALLED_OTAD) == text
    dest = dest_dir / src.name
    dest.write_text(copy)
    return dest


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: run scripts/install-system-deps test"
    return subprocess.run(
        [tool, *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def test_units_verify_clean(tmp_path: Path) -> None:
    assert VENV_OTAD.is_file() and os.access(VENV_OTAD, os.X_OK)
    copies = [rewritten_copy(SYSTEMD / name, tmp_path) for name in UNITS]
    result = analyze("verify", "--man=no", *[c.name for c in copies], cwd=tmp_path)
    # Unknown keys and bad values are warnings with exit code 0: any output is a failure.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr


def test_units_verify_catches_a_typo(tmp_path: Path) -> None:
    """The check above is not vacuous: the same command flags a misspelt key."""
    copy = rewritten_copy(SYSTEMD / "otad.service", tmp_path)
    copy.write_text(copy.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    result = analyze("verify", "--man=no", copy.name, cwd=tmp_path)
    assert "Unknown key" in result.stderr and "WatchdogSecs" in result.stderr


def test_units_verify_catches_a_missing_binary(tmp_path: Path) -> None:
    """Why the copies are rewritten: the shipped path does not exist here."""
    (tmp_path / "otad.service").write_text((SYSTEMD / "otad.service").read_text())
    result = analyze("verify", "--man=no", "otad.service", cwd=tmp_path)
    assert result.returncode != 0 and INSTALLED_OTAD in result.stderr


@pytest.mark.parametrize("name", UNITS)
def test_units_security_exposure_is_low(tmp_path: Path, name: str) -> None:
    copy = rewritten_copy(SYSTEMD / name, tmp_path)
    # --threshold is the overall exposure x10: 30 means "3.0 OK" or better (0 best, 10 worst).
    result = analyze(
        "security", "--offline=yes", "--threshold=30", "--no-pager", str(copy), cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def enabled_unit_dir(dest: Path, edit: dict[str, tuple[str, str]] | None = None) -> Path:
    """The units as `systemctl enable` leaves them: copies plus the .wants/.requires links."""
    dest.mkdir()
    for name in UNITS:
        copy = rewritten_copy(SYSTEMD / name, dest)
        if edit and name in edit:
            old, new = edit[name]
            assert old in copy.read_text()
            copy.write_text(copy.read_text().replace(old, new))
        for entry in entries(name):
            if entry.section == "Install" and entry.key in ("WantedBy", "RequiredBy"):
                suffix = ".wants" if entry.key == "WantedBy" else ".requires"
                for target in entry.value.split():
                    links = dest / f"{target}{suffix}"
                    links.mkdir(exist_ok=True)
                    (links / name).symlink_to(f"../{name}")
    return dest


def verify_boot_targets(unit_dir: Path) -> subprocess.CompletedProcess[str]:
    """Verify the targets the units hook into, as a boot would start them (vendor units + ours)."""
    tool = shutil.which("systemd-analyze")
    assert tool
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{unit_dir}:/lib/systemd/system")
    targets = ["/lib/systemd/system/multi-user.target", "/lib/systemd/system/boot-complete.target"]
    return subprocess.run(
        [tool, "verify", "--man=no", *targets],
        cwd=unit_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_units_enabled_make_no_ordering_cycle(tmp_path: Path) -> None:
    result = verify_boot_targets(enabled_unit_dir(tmp_path / "units"))
    assert result.returncode == 0, result.stderr
    assert "cycle" not in result.stderr and "otad" not in result.stderr, result.stderr


def test_units_cycle_check_is_not_vacuous(tmp_path: Path) -> None:
    """Ordering the health check after multi-user.target (which wants it) is caught."""
    edit = {"otad-health.service": ("After=network-online.target", "After=multi-user.target")}
    result = verify_boot_targets(enabled_unit_dir(tmp_path / "units", edit))
    assert "ordering cycle" in result.stderr


def test_agent_unit_is_notify_with_watchdog() -> None:
    assert service("otad.service", "Type") == ["notify"]
    assert service("otad.service", "NotifyAccess") == ["main"]
    assert service("otad.service", "ExecStart") == [
        "/usr/bin/otad agent run --config /etc/otad/otad.toml"
    ]
    watchdog = service("otad.service", "WatchdogSec")
    assert len(watchdog) == 1 and watchdog[0].endswith("s") and int(watchdog[0][:-1]) >= 10
    assert service("otad.service", "Restart") == ["on-failure"]
    assert unit("otad.service", "StartLimitIntervalSec") == ["0"]


def test_agent_unit_orders_after_network_online_without_requiring_it() -> None:
    assert "network-online.target" in " ".join(unit("otad.service", "After"))
    assert "network-online.target" in " ".join(unit("otad.service", "Wants"))
    assert unit("otad.service", "Requires") == []
    assert unit("otad.service", "Requisite") == []
    assert unit("otad.service", "BindsTo") == []


def test_agent_unit_hardening_keys_present() -> None:
    expected = {
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "ProtectHome": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "DevicePolicy": "closed",
        "SystemCallArchitectures": "native",
        "UMask": "0077",
    }
    for key, value in expected.items():
        assert service("otad.service", key) == [value], key
    assert service("otad.service", "CapabilityBoundingSet") == ["CAP_SYS_BOOT"]
    assert service("otad.service", "PrivateDevices") == []  # would hide the slot devices


def test_agent_unit_writes_only_state_boot_env_and_lock() -> None:
    writable = " ".join(service("otad.service", "ReadWritePaths")).split()
    assert writable == ["/data/otad", "-/boot/efi", "-/run/lock"]
    allowed = service("otad.service", "DeviceAllow")
    assert allowed and all(a.startswith("block-") and a.endswith(" rw") for a in allowed)


def test_agent_unit_every_sandbox_weakening_has_a_reason() -> None:
    """Settings that open the sandbox carry a comment right above them (or above their group)."""
    weakening = {"ReadWritePaths", "CapabilityBoundingSet", "DeviceAllow", "SystemCallFilter"}
    seen: set[str] = set()
    previous_key = ""
    reason: tuple[str, ...] = ()
    for entry in entries("otad.service"):
        if entry.comment:
            reason = entry.comment
        elif entry.key != previous_key:
            reason = ()
        if entry.key in weakening:
            assert reason, f"{entry.key} (line {entry.line}) has no reason comment above it"
            seen.add(entry.key)
        previous_key = entry.key
    assert seen == weakening


def test_agent_unit_needs_data_partition_and_follows_health_check() -> None:
    assert unit("otad.service", "RequiresMountsFor") == ["/data/otad"]
    assert "otad-health.service" in " ".join(unit("otad.service", "After"))
    assert "boot-complete.target" in " ".join(unit("otad.service", "Wants"))
    # Ordering after boot-complete.target's check but never Requires: a failed check must still
    # let the agent start and roll back.
    assert "otad-health.service" not in " ".join(unit("otad.service", "Requires"))


def test_health_unit_fails_boot_complete_when_check_fails() -> None:
    assert service("otad-health.service", "Type") == ["oneshot"]
    assert service("otad-health.service", "RemainAfterExit") == ["yes"]
    assert service("otad-health.service", "ExecStart") == [
        "/usr/bin/otad agent health-check --config /etc/otad/otad.toml"
    ]
    assert unit("otad-health.service", "Before") == ["boot-complete.target"]
    install = unit_values(entries("otad-health.service"), "Install", "RequiredBy")
    assert install == ["boot-complete.target"]
    assert service("otad-health.service", "TimeoutStartSec")  # bounded, never infinite
    # No ordering cycle: the check must not wait for the boot the agent is part of.
    assert "multi-user.target" not in " ".join(unit("otad-health.service", "After"))


def test_tmpfiles_creates_state_dirs_mode_0700(tmp_path: Path) -> None:
    tool = shutil.which("systemd-tmpfiles")
    assert tool, "systemd-tmpfiles is missing (package systemd)"
    result = subprocess.run(
        [tool, "--create", f"--root={tmp_path}", str(SYSTEMD / "otad.tmpfiles")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for sub in ("data/otad", "data/otad/state", "data/otad/identity"):
        mode = stat.S_IMODE((tmp_path / sub).stat().st_mode)
        assert mode == 0o700, f"{sub}: {oct(mode)}"


def test_tmpfiles_dir_is_the_units_state_dir() -> None:
    lines = [
        line.split()
        for line in (SYSTEMD / "otad.tmpfiles").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    top = lines[0][1]
    assert unit("otad.service", "RequiresMountsFor") == [top]
    assert top in " ".join(service("otad.service", "ReadWritePaths")).split()
    assert all(line[1].startswith(top) for line in lines)

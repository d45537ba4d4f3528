"""`otad --version`, and what building the command line costs every process that does it."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def test_version_prints_the_installed_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "otad", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"otad {importlib.metadata.version('otad')}\n"


def test_building_the_parser_does_not_load_package_metadata() -> None:
    # importlib.metadata (with zipfile, csv, email) stays out of the agent's resident memory
    code = (
        "import sys\n"
        "from otad.cli import build_parser\n"
        "build_parser().parse_args(['agent', 'status'])\n"
        "print('importlib.metadata' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "False\n"

"""The tests that docs/failure-modes.md names as proof of each failure mode exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `dir/file.py::test_name[param]`, or `::test_name` meaning the file named just before it
_REFERENCE = re.compile(r"`((?:[\w./-]+\.py)?)(?:::(\w+)(?:\[[^\]`]*\])?)?`")


def references(text: str) -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []
    current = ""
    for path, name in _REFERENCE.findall(text):
        if path:
            current = path
        elif not name:
            continue
        if current:
            found.append((current, name or None))
    return found


def test_docs_failure_modes_name_tests_that_exist() -> None:
    text = (ROOT / "docs" / "failure-modes.md").read_text()
    refs = references(text)
    assert len(refs) > 40  # the table is there and parsed
    missing = []
    for path, name in refs:
        file = ROOT / "tests" / path
        if not file.is_file():
            missing.append(path)
            continue
        if name and not re.search(rf"def {name}\(", file.read_text()):
            missing.append(f"{path}::{name}")
    assert not missing, f"docs/failure-modes.md names tests that do not exist: {missing}"

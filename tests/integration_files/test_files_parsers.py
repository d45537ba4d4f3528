"""Property tests for the readers in layerfiles.py: round trips, and garbage never crashes them
with anything but FileFormatError (a reader that crashed differently, or accepted garbage
silently, could make a file check pass for the wrong reason)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integration_files.layerfiles import (
    FileFormatError,
    bitbake_assignments,
    expand,
    format_env,
    parse_env,
    parse_unit,
    parse_wks,
)

KEYS = st.from_regex(r"[A-Z][A-Z0-9_]{0,15}", fullmatch=True)
VALUES = st.text(
    alphabet=st.characters(blacklist_characters='"\\$`\n\r', blacklist_categories=("Cs",)),
    max_size=30,
)


@given(st.dictionaries(KEYS, VALUES, max_size=8))
def test_env_round_trip(values: dict[str, str]) -> None:
    assert parse_env(format_env(values)) == values


@given(st.text(max_size=300))
def test_env_garbage_raises_only_format_error(text: str) -> None:
    with contextlib.suppress(FileFormatError):
        parse_env(text)


def test_env_rejects_shell_expansion_and_duplicates() -> None:
    with pytest.raises(FileFormatError):
        parse_env('A="$(reboot)"\n')
    with pytest.raises(FileFormatError):
        parse_env('A="x"\nA="y"\n')
    with pytest.raises(FileFormatError):
        parse_env("A=unquoted\n")


@given(st.text(max_size=300))
def test_unit_garbage_raises_only_format_error(text: str) -> None:
    with contextlib.suppress(FileFormatError):
        parse_unit(text)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["Unit", "Service", "Install"]),
            st.from_regex(r"[A-Z][A-Za-z]{0,12}", fullmatch=True),
            st.text(alphabet="abc /-=.@:", max_size=20).map(str.strip),
        ),
        max_size=10,
    )
)
def test_unit_round_trip(entries: list[tuple[str, str, str]]) -> None:
    text = "".join(f"[{s}]\n# why\n{k}={v}\n" for s, k, v in entries)
    parsed = parse_unit(text)
    assert [(e.section, e.key, e.value) for e in parsed] == entries
    assert all(e.comment == ("why",) for e in parsed)


def test_unit_rejects_key_outside_section() -> None:
    with pytest.raises(FileFormatError):
        parse_unit("Type=notify\n")


@given(st.text(max_size=300))
def test_wks_garbage_raises_only_format_error(text: str) -> None:
    with contextlib.suppress(FileFormatError):
        parse_wks(text)


def test_wks_rejects_unknown_directive_and_missing_value() -> None:
    with pytest.raises(FileFormatError):
        parse_wks("bootloader --ptable gpt\nparitition /\n")
    with pytest.raises(FileFormatError):
        parse_wks("bootloader --ptable gpt\npart / --fstype\n")
    with pytest.raises(FileFormatError):
        parse_wks("part / --fstype ext4\n")


@given(st.text(max_size=300))
def test_bitbake_garbage_raises_only_format_error(text: str) -> None:
    with contextlib.suppress(FileFormatError):
        bitbake_assignments(text)


def test_bitbake_joins_continued_lists() -> None:
    text = 'A ?= "x"\nB = "\\\n    one \\\n    two \\\n"\n'
    found = bitbake_assignments(text)
    assert found["A"] == [("?=", "x")]
    assert found["B"] == [("=", "one two")]


def test_expand_refuses_unknown_and_inline_python() -> None:
    assert expand("${A}-${B}", {"A": "${B}x", "B": "y"}) == "yx-y"
    with pytest.raises(FileFormatError):
        expand("${MISSING}", {})
    with pytest.raises(FileFormatError):
        expand("${@d.getVar('A')}", {"A": "x"})
    with pytest.raises(FileFormatError):
        expand("${A}", {"A": "${A}"})

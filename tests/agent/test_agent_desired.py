"""The desired `software` entry parser: every field checked, garbage never crashes it."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otad.agent.update import DesiredSoftware
from otad.errors import DesiredStateInvalid, InsecureUrl

GOOD = {"version": "2.0", "url": "https://store:8443/v1/artifacts/abc?sig=x", "jobId": "j1"}


def test_desired_parses_a_good_entry() -> None:
    d = DesiredSoftware.parse({**GOOD, "sha256": "a" * 64, "size": 10})
    assert (d.version, d.job_id, d.sha256, d.size, d.auth) == ("2.0", "j1", "a" * 64, 10, None)


def test_desired_relative_url_needs_token_auth_and_a_store() -> None:
    entry = {**GOOD, "url": "/v1/artifacts/abc", "auth": "token"}
    d = DesiredSoftware.parse(entry, store_url="https://store:8443")
    assert d.url == "https://store:8443/v1/artifacts/abc" and d.auth == "token"
    with pytest.raises(DesiredStateInvalid):
        DesiredSoftware.parse(entry)
    with pytest.raises(DesiredStateInvalid):
        DesiredSoftware.parse({**entry, "auth": None}, store_url="https://store:8443")


@pytest.mark.parametrize(
    "change",
    [
        {"version": ""},
        {"version": 2},
        {"version": "v" * 65},
        {"jobId": None},
        {"jobId": "j" * 129},
        {"jobId": "j1\nWATCHDOG_USEC=1"},
        {"jobId": "j 1"},
        {"jobId": "j\u00e9"},
        {"url": 5},
        {"auth": "basic"},
        {"sha256": "A" * 64},
        {"sha256": "a" * 63},
        {"size": 0},
        {"size": True},
        {"size": "10"},
    ],
)
def test_desired_rejects_bad_fields(change: dict[str, Any]) -> None:
    with pytest.raises(DesiredStateInvalid):
        DesiredSoftware.parse({**GOOD, **change})


@pytest.mark.parametrize("url", ["http://store/b", "ftp://store/b", "https:///b", "store/b"])
def test_desired_rejects_insecure_urls(url: str) -> None:
    with pytest.raises(InsecureUrl):
        DesiredSoftware.parse({**GOOD, "url": url})


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        _json,
        st.fixed_dictionaries(
            {}, optional={k: _json for k in ("version", "url", "jobId", "sha256", "size", "auth")}
        ),
    )
)
def test_desired_garbage_never_crashes_the_parser(entry: Any) -> None:
    with contextlib.suppress(DesiredStateInvalid, InsecureUrl):
        DesiredSoftware.parse(entry, store_url="https://store")


def test_desired_version_file_forms(tmp_path: Any) -> None:
    from otad.agent.update import read_version_file

    os_release = tmp_path / "os-release"
    os_release.write_text('NAME="Poky"\nVERSION_ID="4.0.2"\n')
    assert read_version_file(os_release) == "4.0.2"
    plain = tmp_path / "version"
    plain.write_text("2.1\n")
    assert read_version_file(plain) == "2.1"
    (tmp_path / "empty").write_text("")
    assert read_version_file(tmp_path / "empty") is None
    assert read_version_file(tmp_path / "missing") is None
    assert read_version_file(None) is None

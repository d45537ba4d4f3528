"""The agent config: defaults, relative paths, a ConfigError naming the key for bad values."""

from __future__ import annotations

import contextlib
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from plugins.agent_env import deep_merge, to_toml

from otad.agent.config import AgentConfig, load, parse
from otad.errors import ConfigError

MINIMAL: dict[str, Any] = {
    "device_id": "dev1",
    "compatible": "board-x",
    "broker": {"host": "broker.example"},
    "slots": {"A": {"path": "/dev/vda2"}, "B": {"label": "rootfs_b"}},
}


def cfg(**extra: Any) -> AgentConfig:
    return parse(deep_merge(MINIMAL, extra))


def test_config_defaults() -> None:
    c = cfg()
    assert c.broker.port == 8883 and c.broker.keepalive == 30
    assert c.broker.topic_template == "state/{device_id}" and c.broker.client_id == "dev1"
    assert c.reboot_command == ("systemctl", "reboot")
    assert c.bootloader.type == "grub" and c.state_dir == Path("/var/lib/otad")
    assert c.health.broker == "required" and c.download.retries == 8
    assert c.download.chunk_size == 256 * 1024 and c.testing.crash_points == frozenset()
    assert c.slots.a.path == Path("/dev/vda2") and c.slots.b.label == "rootfs_b"


def test_config_load_resolves_relative_paths(tmp_path: Path) -> None:
    doc = deep_merge(MINIMAL, {"state_dir": "state", "broker": {"ca": "pki/ca.pem"}})
    path = tmp_path / "otad.toml"
    path.write_text(to_toml(doc))
    c = load(path)
    assert c.state_dir == tmp_path / "state" and c.broker.ca == tmp_path / "pki" / "ca.pem"
    assert c.store_ca == tmp_path / "pki" / "ca.pem"


def test_config_reboot_command_as_string() -> None:
    assert cfg(reboot_command="/sbin/reboot -f").reboot_command == ("/sbin/reboot", "-f")


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"broker": {"port": 0}}, "broker.port"),
        ({"broker": {"port": "1883"}}, "broker.port"),
        ({"broker": {"hots": "x"}}, "broker.hots"),
        ({"broker": {"topic_template": "state/x"}}, "broker.topic_template"),
        ({"broker": {"cert": "/c.pem"}}, "broker.cert"),
        ({"slots": {"A": {"path": "/a", "label": "x"}}}, "slots.A"),
        ({"slots": {"booted": "C"}}, "slots.booted"),
        ({"bootloader": {"type": "lilo"}}, "bootloader.type"),
        ({"health": {"broker": "maybe"}}, "health.broker"),
        ({"health": {"required_units": "a.service"}}, "health.required_units"),
        ({"download": {"chunk_size": 10}}, "download.chunk_size"),
        ({"download": {"backoff_initial": 5.0, "backoff_max": 1.0}}, "download.backoff_max"),
        ({"store": {"url": "http://store"}}, "store.url"),
        ({"testing": {"crash_points": [1]}}, "testing.crash_points"),
        ({"reboot_command": []}, "reboot_command"),
        ({"reboot_timeout": 0}, "reboot_timeout"),
        ({"download": {"url_refresh_timeout": "1h"}}, "download.url_refresh_timeout"),
        ({"device_id": "dev 1"}, "device_id"),
        ({"device_id": "d\u00e9v1"}, "device_id"),
        ({"device_id": "d" * 129}, "device_id"),
        ({"broker": {"topic_template": "state/x{device_id}"}}, "broker.topic_template"),
        ({"broker": {"topic_template": "state/+/{device_id}"}}, "broker.topic_template"),
        ({"broker": {"topic_template": "state//{device_id}"}}, "broker.topic_template"),
        ({"health": {"script_timeout": float("nan")}}, "health.script_timeout"),
        ({"health": {"total_timeout": float("inf")}}, "health.total_timeout"),
        ({"reboot_timeout": float("nan")}, "reboot_timeout"),
        ({"download": {"sock_read": float("inf")}}, "download.sock_read"),
        ({"unknown_top": 1}, "unknown_top"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(extra: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg(**extra)
    assert f"otad.toml: {key}" in str(info.value)


@pytest.mark.parametrize("missing", ["device_id", "compatible", "broker", "slots"])
def test_config_requires_key(missing: str) -> None:
    doc = {k: v for k, v in MINIMAL.items() if k != missing}
    with pytest.raises(ConfigError, match=missing):
        parse(doc)


def test_config_load_reports_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("device_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)


_toml_scalars = st.one_of(
    st.integers(-(2**40), 2**40), st.text(max_size=8), st.booleans(), st.floats(allow_nan=False)
)
_toml_values = st.recursive(
    _toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["host", "port", "A", "B", "path", "x"]), inner, max_size=3
        )
    ),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["device_id", "compatible", "broker", "slots", "health", "download", "store", "y"]
        ),
        _toml_values,
        max_size=6,
    )
)
def test_config_garbage_never_crashes_the_parser(doc: dict[str, Any]) -> None:
    with contextlib.suppress(ConfigError):
        parse(doc)


def test_config_example_in_docs_parses() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "agent.md"
    text = docs.read_text()
    start = text.index("```toml\n") + len("```toml\n")
    example = tomllib.loads(text[start : text.index("```", start)])
    parsed = parse(example)
    assert parsed.device_id


def test_config_device_id_from_file(tmp_path: Path) -> None:
    (tmp_path / "device-id").write_text("dev7\n")
    doc = {k: v for k, v in MINIMAL.items() if k != "device_id"}
    c = parse({**doc, "device_id_file": str(tmp_path / "device-id")})
    assert c.device_id == "dev7" and c.broker.client_id == "dev7"
    with pytest.raises(ConfigError, match="not both"):
        parse({**MINIMAL, "device_id_file": str(tmp_path / "device-id")})
    with pytest.raises(ConfigError, match="cannot read"):
        parse({**doc, "device_id_file": str(tmp_path / "missing")})

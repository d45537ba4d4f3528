"""otad-cloud.toml: init output parses back; bad fields are named; garbage never crashes."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otad.cloud.config import CloudConfig, load_config, parse_config, render_config
from otad.errors import ConfigError

ROOT = Path("/srv/cloud")


def test_config_rendered_text_parses_back() -> None:
    text = render_config(
        broker_port=1883,
        store_port=9443,
        topic_template="$aws/things/{device_id}/shadow",
        uploaders=("otad-svc-fleet", 'we"ird\\name'),
        presign_binding="id",
    )
    config = parse_config(text, root=ROOT)
    assert config.broker_port == 1883 and config.store_port == 9443
    assert config.store_public_url == "https://127.0.0.1:9443"
    assert config.topic_template == "$aws/things/{device_id}/shadow"
    assert config.uploaders == ("otad-svc-fleet", 'we"ird\\name')
    assert config.presign_binding == "id"
    assert config.db_path == ROOT / "state/shadow.db"
    assert config.artifacts_dir == ROOT / "artifacts"
    assert config.presign_secret_file == ROOT / "secrets/presign.key"


def test_config_defaults_for_an_empty_file() -> None:
    config = parse_config("", root=ROOT)
    assert config == CloudConfig(
        root=ROOT,
        presign_secret_file=ROOT / "secrets/presign.key",
        db_path=ROOT / "state/shadow.db",
        artifacts_dir=ROOT / "artifacts",
    )


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[broker]\nport = 70000", "broker.port"),
        ("[broker]\nport = true", "broker.port"),
        ('[broker]\nport = "8883"', "broker.port"),
        ('[broker]\nhost = "example.org"', "broker.host"),
        ('[broker]\ntopic_template = "state/+/x/{device_id}"', "topic_template"),
        ('[broker]\ntopic_template = "state"', "topic_template"),
        ('[broker]\ntopic_template = "{device_id}/{device_id}"', "topic_template"),
        ('[broker]\ntopic_template = "state/{device_id}/"', "topic_template"),
        ('[store]\npresign_binding = "none"', "presign_binding"),
        ('[store]\npublic_url = "http://x"', "public_url"),
        ("[store]\ntoken_ttl = 0", "store.token_ttl"),
        ("[store]\nmax_upload_bytes = -1", "store.max_upload_bytes"),
        ("[store]\ndownload_buffer_bytes = 0", "store.download_buffer_bytes"),
        ("[store]\nuploaders = [1]", "store.uploaders"),
        ('[store]\nuploaders = "otad-svc-fleet"', "store.uploaders"),
        ('[replica]\ndb = ""', "replica.db"),
        ("broker = 5", "[broker]"),
        ("[broker\n", "not valid TOML"),
    ],
)
def test_config_bad_fields_are_named(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, root=ROOT)
    assert field in str(info.value)


@settings(deadline=None)  # shared CI machine: no per-example wall-clock limit
@given(st.text(max_size=300))
def test_config_garbage_only_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(text, root=ROOT)


scalars = st.one_of(
    st.integers(-(2**70), 2**70),
    st.text(max_size=20),
    st.booleans(),
    st.floats(allow_nan=False),
    st.lists(st.text(max_size=5), max_size=3),
)


@settings(deadline=None)  # shared CI machine: no per-example wall-clock limit
@given(
    section=st.sampled_from(["broker", "store", "replica", "paths"]),
    key=st.sampled_from(
        [
            "host",
            "port",
            "topic_template",
            "public_url",
            "presign_binding",
            "token_ttl",
            "uploaders",
            "db",
            "artifacts",
            "max_upload_bytes",
            "download_buffer_bytes",
            "presign_secret_file",
            "mosquitto",
        ]
    ),
    value=scalars,
)
def test_config_wrong_types_only_raise_config_error(section: str, key: str, value: object) -> None:
    literal = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return
    with contextlib.suppress(ConfigError):
        parse_config(f"[{section}]\n{key} = {literal}\n", root=ROOT)


def test_config_missing_file_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="otad cloud init"):
        load_config(tmp_path)


def test_config_short_or_missing_secret_is_refused(tmp_path: Path) -> None:
    config = parse_config("", root=tmp_path)
    with pytest.raises(ConfigError, match="cannot read pre-sign secret"):
        config.read_presign_secret()
    config.presign_secret_file.parent.mkdir(parents=True)
    fd = os.open(config.presign_secret_file, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"short\n")
    os.close(fd)
    with pytest.raises(ConfigError, match="shorter than 32 bytes"):
        config.read_presign_secret()

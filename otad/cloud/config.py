"""The cloud configuration file (``otad-cloud.toml`` in a cloud dir): parse, validate, render.

One TOML file is the single source of truth for the backend processes: the broker listener,
the store listener, the topic template, where the pre-sign secret, the shadow database and the
artifacts live. Relative paths are resolved against the cloud dir, so a cloud dir can be moved
or copied as a whole. The pre-sign secret is never in this file: it lives in its own file with
mode 0600 that the config names.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import string
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from otad.errors import ConfigError

__layer__ = "adapter"

CONFIG_NAME = "otad-cloud.toml"

PresignBinding = Literal["certificate", "id"]
_BINDINGS: tuple[str, ...] = ("certificate", "id")


@dataclass(frozen=True)
class CloudConfig:
    """Everything the cloud processes need, with absolute paths."""

    root: Path
    broker_host: str = "127.0.0.1"
    broker_port: int = 8883
    topic_template: str = "state/{device_id}"
    store_host: str = "127.0.0.1"
    store_port: int = 8443
    # Base of the URLs handed to devices; differs from host:port behind a proxy or NAT.
    store_public_url: str = "https://127.0.0.1:8443"
    presign_secret_file: Path = Path("secrets/presign.key")
    # "certificate": a pre-signed URL or token is only honoured over mTLS with the device's
    # own certificate. "id": the URL itself is the credential (a presented certificate must
    # still match).
    presign_binding: PresignBinding = "certificate"
    presign_default_ttl: int = 3600
    token_ttl: int = 900
    max_upload_bytes: int = 8 * 1024**3
    # Memory the store may hold in download buffers across all downloads; with many downloads
    # in flight each reads smaller chunks (1 MiB down to 64 KiB) to stay within it.
    download_buffer_bytes: int = 256 * 1024**2
    uploaders: tuple[str, ...] = ()
    db_path: Path = Path("state/shadow.db")
    artifacts_dir: Path = Path("artifacts")
    mosquitto_bin: str = "/usr/sbin/mosquitto"

    def with_overrides(self, **changes: Any) -> CloudConfig:
        """A copy with some fields replaced (tests use it for per-test ports and databases)."""
        return dataclasses.replace(self, **changes)

    def read_presign_secret(self) -> bytes:
        """The HMAC key for pre-signed URLs and tokens (at least 32 bytes)."""
        try:
            secret = self.presign_secret_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                f"cloud config: cannot read pre-sign secret {self.presign_secret_file}: "
                f"{exc.strerror}"
            ) from exc
        if len(secret) < 32:
            raise ConfigError(
                f"cloud config: pre-sign secret {self.presign_secret_file} is shorter than 32 bytes"
            )
        return secret

    def replica_share_group(self) -> str:
        """The MQTT shared-subscription group of this cloud's replicas.

        Not a well-known name: Mosquitto lets any client join a shared subscription whatever
        its ACL, and then drops the messages it hands to a member that may not read them, so a
        device that joined a guessable group would silently eat a share of every device's and
        the fleet's requests. Derived from the pre-sign secret, so every replica process of
        one cloud dir finds the same group and nobody else can name it."""
        digest = hmac.new(self.read_presign_secret(), b"otad replica share group", "sha256")
        return f"otad-replica-{digest.hexdigest()[:24]}"


def load_config(root: Path) -> CloudConfig:
    """Read ``<root>/otad-cloud.toml``; raise :class:`ConfigError` naming the bad field."""
    path = root / CONFIG_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cloud config: cannot read {path}: {exc.strerror} (run `otad cloud init {root}`)"
        ) from exc
    return parse_config(text, root=root, origin=str(path))


def parse_config(text: str, *, root: Path, origin: str = CONFIG_NAME) -> CloudConfig:
    """Parse the TOML text of a cloud config; paths resolve against ``root``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cloud config {origin}: not valid TOML: {exc}") from exc
    root = root.resolve()
    reader = _Reader(data, origin)
    broker = reader.table("broker")
    store = reader.table("store")
    replica = reader.table("replica")
    paths = reader.table("paths")
    defaults = CloudConfig(root=root)

    template = reader.string(broker, "broker", "topic_template", defaults.topic_template)
    _check_template(template, origin)
    binding = reader.string(store, "store", "presign_binding", defaults.presign_binding)
    if binding not in _BINDINGS:
        raise ConfigError(
            f"cloud config {origin}: store.presign_binding must be one of {_BINDINGS}, "
            f"not {binding!r}"
        )
    store_host = reader.host(store, "store", "host", defaults.store_host)
    store_port = reader.port(store, "store", "port", defaults.store_port)
    public_url = reader.string(
        store, "store", "public_url", f"https://{_url_host(store_host)}:{store_port}"
    )
    if not public_url.startswith("https://"):
        raise ConfigError(f"cloud config {origin}: store.public_url must be an https:// URL")
    uploaders = store.get("uploaders", [])
    if not isinstance(uploaders, list) or not all(isinstance(u, str) for u in uploaders):
        raise ConfigError(f"cloud config {origin}: store.uploaders must be a list of strings")
    return CloudConfig(
        root=root,
        broker_host=reader.host(broker, "broker", "host", defaults.broker_host),
        broker_port=reader.port(broker, "broker", "port", defaults.broker_port),
        topic_template=template,
        store_host=store_host,
        store_port=store_port,
        store_public_url=public_url.rstrip("/"),
        presign_secret_file=root
        / reader.string(store, "store", "presign_secret_file", str(defaults.presign_secret_file)),
        presign_binding=binding,  # type: ignore[arg-type]
        presign_default_ttl=reader.positive(
            store, "store", "presign_default_ttl", defaults.presign_default_ttl
        ),
        token_ttl=reader.positive(store, "store", "token_ttl", defaults.token_ttl),
        max_upload_bytes=reader.positive(
            store, "store", "max_upload_bytes", defaults.max_upload_bytes
        ),
        download_buffer_bytes=reader.positive(
            store, "store", "download_buffer_bytes", defaults.download_buffer_bytes
        ),
        uploaders=tuple(uploaders),
        db_path=root / reader.string(replica, "replica", "db", str(defaults.db_path)),
        artifacts_dir=root
        / reader.string(paths, "paths", "artifacts", str(defaults.artifacts_dir)),
        mosquitto_bin=reader.string(broker, "broker", "mosquitto", defaults.mosquitto_bin),
    )


def render_config(
    *,
    broker_port: int,
    store_port: int,
    topic_template: str = "state/{device_id}",
    uploaders: tuple[str, ...] = (),
    presign_binding: PresignBinding = "certificate",
) -> str:
    """The text ``otad cloud init`` writes; every field commented for the operator."""
    _check_template(topic_template, "init")
    uploader_list = ", ".join(_toml_str(u) for u in uploaders)
    return f"""\
# otad cloud configuration, written by `otad cloud init`. Relative paths are relative to this
# directory. `otad cloud broker` regenerates broker/mosquitto.conf and broker/acl from here.

[broker]
host = "127.0.0.1"          # the TLS listener of mosquitto (loopback only by default)
port = {broker_port}
# Shadow topic prefix; {{device_id}} is replaced by the device id (the certificate CN).
# "$aws/things/{{device_id}}/shadow" gives the AWS IoT layout.
topic_template = {_toml_str(topic_template)}
mosquitto = "/usr/sbin/mosquitto"

[store]
host = "127.0.0.1"          # the HTTPS listener of the artifact store
port = {store_port}
public_url = "https://127.0.0.1:{store_port}"   # base of URLs handed to devices
presign_secret_file = "secrets/presign.key"     # HMAC key, mode 0600
# "certificate": pre-signed URLs and tokens work only over mTLS with the device's own certificate.
# "id": the URL alone is the credential (a presented client certificate must still match).
presign_binding = {_toml_str(presign_binding)}
presign_default_ttl = 3600  # seconds
token_ttl = 900             # seconds, for POST /v1/credentials
max_upload_bytes = {8 * 1024**3}
# Download buffers of all downloads together; many downloads at once read smaller chunks.
download_buffer_bytes = {256 * 1024**2}
uploaders = [{uploader_list}]   # client certificate CNs allowed to PUT bundles

[replica]
db = "state/shadow.db"

[paths]
artifacts = "artifacts"
"""


def _toml_str(value: str) -> str:
    # A TOML basic string: escape backslash, quote and control characters.
    out = []
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _check_template(template: str, origin: str) -> None:
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if fields != ["device_id"]:
        raise ConfigError(
            f"cloud config {origin}: topic_template must contain {{device_id}} exactly once, "
            f"got {template!r}"
        )
    if any(ch in template for ch in "+#") or template.startswith("/") or template.endswith("/"):
        raise ConfigError(
            f"cloud config {origin}: topic_template {template!r} must not contain MQTT "
            "wildcards or leading/trailing '/'"
        )


class _Reader:
    """Typed field access that names the field in every error."""

    def __init__(self, data: dict[str, Any], origin: str) -> None:
        self.data = data
        self.origin = origin

    def table(self, name: str) -> dict[str, Any]:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"cloud config {self.origin}: [{name}] must be a table")
        return value

    def string(self, table: dict[str, Any], section: str, key: str, default: str) -> str:
        value = table.get(key, default)
        if not isinstance(value, str) or not value:
            raise ConfigError(
                f"cloud config {self.origin}: {section}.{key} must be a non-empty string"
            )
        return value

    def host(self, table: dict[str, Any], section: str, key: str, default: str) -> str:
        value = self.string(table, section, key, default)
        if value != "localhost":
            try:
                ipaddress.ip_address(value)
            except ValueError as exc:
                raise ConfigError(
                    f"cloud config {self.origin}: {section}.{key} must be an IP address or "
                    f"localhost, not {value!r}"
                ) from exc
        return value

    def port(self, table: dict[str, Any], section: str, key: str, default: int) -> int:
        value = table.get(key, default)
        if type(value) is not int or not 0 <= value <= 65535:
            raise ConfigError(f"cloud config {self.origin}: {section}.{key} must be a port number")
        return value

    def positive(self, table: dict[str, Any], section: str, key: str, default: int) -> int:
        value = table.get(key, default)
        if type(value) is not int or value <= 0:
            raise ConfigError(
                f"cloud config {self.origin}: {section}.{key} must be a positive integer"
            )
        return value

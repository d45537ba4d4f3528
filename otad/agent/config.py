"""The agent's configuration: one TOML file (``/etc/otad/otad.toml``) into frozen dataclasses.

Every key, its type and its default is documented in ``docs/agent.md``; keep the two in step.
Parsing is strict: an unknown key, a wrong type or a missing required key is a
:class:`~otad.errors.ConfigError` whose message names the key (``otad.toml: broker.port: ...``),
because a typo in a device's config must not silently fall back to a default.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otad.errors import ConfigError, ShadowBadRequest
from otad.shadow import check_device_id, check_template

__layer__ = "adapter"

DEFAULT_PATH = Path("/etc/otad/otad.toml")
BOOTLOADERS = ("grub", "uboot", "sim")
BROKER_POLICIES = ("required", "ignore")
SLOT_NAMES = ("A", "B")


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int = 8883
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    keepalive: int = 30
    topic_template: str = "state/{device_id}"
    client_id: str | None = None  # default: the device id
    report_timeout: float = 5.0  # seconds to wait for update/accepted before re-sending
    connect_timeout: float = 10.0  # seconds to wait for CONNACK; then the broker counts as down
    reconnect_initial: float = 0.5
    reconnect_max: float = 30.0


@dataclass(frozen=True)
class StoreConfig:
    url: str | None = None  # base URL for the temporary-credential flow (POST <url>/v1/credentials)
    ca: Path | None = None  # default: broker.ca
    cert: Path | None = None  # client certificate for mTLS; default: broker.cert
    key: Path | None = None


@dataclass(frozen=True)
class SlotConfig:
    name: str
    path: Path | None = None
    label: str | None = None


@dataclass(frozen=True)
class SlotsConfig:
    a: SlotConfig
    b: SlotConfig
    booted: str | None = None  # override the kernel command line (sim and tests)

    def by_name(self, name: str) -> SlotConfig:
        return {"A": self.a, "B": self.b}[name]


@dataclass(frozen=True)
class BootloaderConfig:
    type: str = "grub"
    grub_env_dir: Path = Path("/boot/efi/EFI/otad")  # holds grubenv.0 and grubenv.1
    fw_env_config: Path = Path("/etc/fw_env.config")
    # U-Boot's default env as text: an env rewritten from scratch starts from it (bootcmd...)
    uboot_default_env: Path = Path("/etc/u-boot-initial-env")
    sim_state: Path | None = None  # default: <state_dir>/sim-bootloader.json
    tries: int = 3  # boot attempts per committed slot (U-Boot, sim); GRUB's scheme has one


@dataclass(frozen=True)
class HealthConfig:
    required_units: tuple[str, ...] = ()
    health_d: Path = Path("/etc/otad/health.d")
    script_timeout: float = 30.0
    total_timeout: float = 120.0
    check_systemd: bool = True
    broker: str = "required"  # required | ignore
    broker_timeout: float = 60.0


@dataclass(frozen=True)
class DownloadConfig:
    chunk_size: int = 256 * 1024
    retries: int = 8
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    sock_connect: float = 30.0
    sock_read: float = 60.0
    # bytes/s averaged over rate_window (0: off). A server trickling a byte now and then stays
    # under sock_read forever (a slow-retrieval attack); no real link is this slow for minutes.
    min_rate: int = 1024
    rate_window: float = 300.0
    max_bundle_size: int = 16 * 1024**3
    # after an expired URL (403) the job waits this long for the cloud to hand out a fresh one,
    # then fails (download_url_expired): a device must not sit in a job nobody will finish
    url_refresh_timeout: float = 3600.0
    block_size: int = 256 * 1024  # bytes handed to the disk thread at once
    queue_chunks: int = 2  # blocks between the network and the disk thread (memory bound)
    # image bytes between flushes of the slot, each followed by the re-read of what it made
    # durable; a restarted agent resumes the download from the last flushed frame end
    read_back_step: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class TestingConfig:
    """Test-only fault injection; never set on a real device."""

    crash_points: frozenset[str] = frozenset()
    exit_code: int = 137


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    compatible: str
    broker: BrokerConfig
    slots: SlotsConfig
    store: StoreConfig = field(default_factory=StoreConfig)
    bootloader: BootloaderConfig = field(default_factory=BootloaderConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    testing: TestingConfig = field(default_factory=TestingConfig)
    state_dir: Path = Path("/var/lib/otad")
    keyring: Path = Path("/etc/otad/keyring")
    reboot_command: tuple[str, ...] = ("systemctl", "reboot")
    # the system still up this long after a reboot command that succeeded: the reboot failed
    reboot_timeout: float = 600.0
    progress_interval: float = 1.0
    version_file: Path | None = None  # e.g. /etc/os-release (VERSION_ID=) of the running rootfs
    config_dir: Path | None = None  # where relative paths were resolved from

    @property
    def store_ca(self) -> Path | None:
        return self.store.ca or self.broker.ca

    @property
    def store_cert(self) -> tuple[Path, Path] | None:
        cert = self.store.cert or self.broker.cert
        key = self.store.key or self.broker.key
        return (cert, key) if cert and key else None

    @property
    def sim_state_path(self) -> Path:
        return self.bootloader.sim_state or self.state_dir / "sim-bootloader.json"


class _Table:
    """One TOML table being read: typed getters that name the key in every error."""

    def __init__(self, data: Mapping[str, Any], where: str, base: Path | None) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"otad.toml: {where or 'top level'}: must be a table")
        self.data = dict(data)
        self.where = where
        self.base = base
        self.used: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _fail(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"otad.toml: {self._key(key)}: {why}", key=self._key(key))

    def raw(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def has(self, key: str) -> bool:
        return key in self.data

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> Any:
        value = self.raw(key)
        if value is None:
            if required:
                raise self._fail(key, "is required")
            return default
        if not isinstance(value, str) or not value:
            raise self._fail(key, f"must be a non-empty string, got {value!r}")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(key, default)
        if value not in choices:
            raise self._fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return str(value)

    def integer(
        self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, f"must be an integer, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise self._fail(key, f"must be {bound}, got {value}")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, f"must be a number, got {value!r}")
        if not math.isfinite(value):  # TOML has nan and inf; every comparison with nan is false
            raise self._fail(key, f"must be a finite number, got {value}")
        if value < minimum:
            raise self._fail(key, f"must be >= {minimum}, got {value}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._fail(key, f"must be true or false, got {value!r}")
        return value

    def path(self, key: str, default: Path | None = None, *, required: bool = False) -> Any:
        value = self.text(key, None, required=required)
        if value is None:
            return default
        path = Path(value)
        # Relative paths are relative to the config file, so a test or a demo dir is relocatable.
        if not path.is_absolute() and self.base is not None:
            path = self.base / path
        return path

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self._fail(key, f"must be a list of non-empty strings, got {value!r}")
        return tuple(value)

    def table(self, key: str, *, required: bool = False) -> _Table:
        value = self.raw(key)
        if value is None:
            if required:
                raise self._fail(key, "is required (a table)")
            value = {}
        if not isinstance(value, Mapping):
            raise self._fail(key, "must be a table")
        return _Table(value, self._key(key), self.base)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self._fail(unknown[0], "unknown key (check the spelling against docs/agent.md)")


def _broker(t: _Table, device_id: str) -> BrokerConfig:
    template = t.text("topic_template", "state/{device_id}")
    try:
        check_template(template)
    except ShadowBadRequest as exc:
        raise ConfigError(
            f"otad.toml: broker.topic_template: {exc.message.removeprefix('shadow: ')}",
            key="broker.topic_template",
        ) from exc
    cert, key = t.path("cert"), t.path("key")
    if (cert is None) != (key is None):
        raise ConfigError(
            "otad.toml: broker.cert/broker.key: set both or neither", key="broker.cert"
        )
    cfg = BrokerConfig(
        host=t.text("host", required=True),
        port=t.integer("port", 8883, minimum=1, maximum=65535),
        ca=t.path("ca"),
        cert=cert,
        key=key,
        keepalive=t.integer("keepalive", 30, minimum=5, maximum=3600),
        topic_template=template,
        client_id=t.text("client_id", None) or device_id,
        report_timeout=t.number("report_timeout", 5.0, minimum=0.1),
        connect_timeout=t.number("connect_timeout", 10.0, minimum=0.1),
        reconnect_initial=t.number("reconnect_initial", 0.5, minimum=0.01),
        reconnect_max=t.number("reconnect_max", 30.0, minimum=0.01),
    )
    t.done()
    return cfg


def _store(t: _Table) -> StoreConfig:
    url = t.text("url", None)
    if url is not None and not url.startswith("https://"):
        raise ConfigError(f"otad.toml: store.url: must be an https:// URL, got {url!r}")
    cert, key = t.path("cert"), t.path("key")
    if (cert is None) != (key is None):
        raise ConfigError("otad.toml: store.cert/store.key: set both or neither", key="store.cert")
    cfg = StoreConfig(url=url.rstrip("/") if url else None, ca=t.path("ca"), cert=cert, key=key)
    t.done()
    return cfg


def _slot(t: _Table, name: str) -> SlotConfig:
    path, label = t.path("path"), t.text("label", None)
    if (path is None) == (label is None):
        raise ConfigError(
            f"otad.toml: {t.where}: set exactly one of path or label", key=f"{t.where}.path"
        )
    t.done()
    return SlotConfig(name=name, path=path, label=label)


def _slots(t: _Table) -> SlotsConfig:
    booted = t.text("booted", None)
    if booted is not None and booted not in SLOT_NAMES:
        raise ConfigError(f"otad.toml: slots.booted: must be A or B, got {booted!r}")
    cfg = SlotsConfig(
        a=_slot(t.table("A", required=True), "A"),
        b=_slot(t.table("B", required=True), "B"),
        booted=booted,
    )
    t.done()
    if cfg.a.path is not None and cfg.a.path == cfg.b.path:
        raise ConfigError("otad.toml: slots.B.path: must differ from slots.A.path")
    if cfg.a.label is not None and cfg.a.label == cfg.b.label:
        raise ConfigError("otad.toml: slots.B.label: must differ from slots.A.label")
    return cfg


def _bootloader(t: _Table) -> BootloaderConfig:
    d = BootloaderConfig()
    cfg = BootloaderConfig(
        type=t.choice("type", d.type, BOOTLOADERS),
        grub_env_dir=t.path("grub_env_dir", d.grub_env_dir),
        fw_env_config=t.path("fw_env_config", d.fw_env_config),
        uboot_default_env=t.path("uboot_default_env", d.uboot_default_env),
        sim_state=t.path("sim_state"),
        tries=t.integer("tries", d.tries, minimum=1, maximum=9),
    )
    t.done()
    return cfg


def _health(t: _Table) -> HealthConfig:
    d = HealthConfig()
    cfg = HealthConfig(
        required_units=t.strings("required_units", d.required_units),
        health_d=t.path("health_d", d.health_d),
        script_timeout=t.number("script_timeout", d.script_timeout, minimum=0.1),
        total_timeout=t.number("total_timeout", d.total_timeout, minimum=0.1),
        check_systemd=t.flag("check_systemd", d.check_systemd),
        broker=t.choice("broker", d.broker, BROKER_POLICIES),
        broker_timeout=t.number("broker_timeout", d.broker_timeout, minimum=0.1),
    )
    t.done()
    return cfg


def _download(t: _Table) -> DownloadConfig:
    d = DownloadConfig()
    cfg = DownloadConfig(
        chunk_size=t.integer("chunk_size", d.chunk_size, minimum=4096, maximum=16 * 1024**2),
        retries=t.integer("retries", d.retries, minimum=0, maximum=1000),
        backoff_initial=t.number("backoff_initial", d.backoff_initial, minimum=0.0),
        backoff_max=t.number("backoff_max", d.backoff_max, minimum=0.0),
        sock_connect=t.number("sock_connect", d.sock_connect, minimum=0.1),
        sock_read=t.number("sock_read", d.sock_read, minimum=0.1),
        min_rate=t.integer("min_rate", d.min_rate, minimum=0),
        rate_window=t.number("rate_window", d.rate_window, minimum=1.0),
        max_bundle_size=t.integer("max_bundle_size", d.max_bundle_size, minimum=1),
        url_refresh_timeout=t.number("url_refresh_timeout", d.url_refresh_timeout, minimum=1.0),
        block_size=t.integer("block_size", d.block_size, minimum=4096, maximum=64 * 1024**2),
        queue_chunks=t.integer("queue_chunks", d.queue_chunks, minimum=1, maximum=64),
        read_back_step=t.integer(
            "read_back_step", d.read_back_step, minimum=1024**2, maximum=1024**4
        ),
    )
    t.done()
    if cfg.backoff_max < cfg.backoff_initial:
        raise ConfigError("otad.toml: download.backoff_max: must be >= download.backoff_initial")
    return cfg


def _testing(t: _Table) -> TestingConfig:
    cfg = TestingConfig(
        crash_points=frozenset(t.strings("crash_points", ())),
        exit_code=t.integer("exit_code", 137, minimum=1, maximum=255),
    )
    t.done()
    return cfg


def parse(data: Mapping[str, Any], *, base: Path | None = None) -> AgentConfig:
    """Build the config from an already-decoded TOML document (the tests use this directly)."""
    top = _Table(data, "", base)
    device_id_file = top.path("device_id_file")
    if device_id_file is not None:
        if top.has("device_id"):
            raise ConfigError(
                "otad.toml: device_id_file: set device_id or device_id_file, not both",
                key="device_id_file",
            )
        try:
            device_id = device_id_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"otad.toml: device_id_file: cannot read {device_id_file}: {exc.strerror}",
                key="device_id_file",
            ) from exc
        if not device_id:
            raise ConfigError(f"otad.toml: device_id_file: {device_id_file} is empty")
    else:
        device_id = top.text("device_id", required=True)
    try:
        check_device_id(device_id)  # it is a topic level and the broker's client id
    except ShadowBadRequest as exc:
        raise ConfigError(
            f"otad.toml: device_id: 1-128 of A-Z a-z 0-9 : _ . -, got {device_id!r}",
            key="device_id",
        ) from exc
    reboot = top.raw("reboot_command")
    if reboot is None:
        reboot_command: tuple[str, ...] = ("systemctl", "reboot")
    elif isinstance(reboot, str) and reboot:
        reboot_command = tuple(reboot.split())
    elif isinstance(reboot, list) and reboot and all(isinstance(a, str) and a for a in reboot):
        reboot_command = tuple(reboot)
    else:
        raise ConfigError(
            f"otad.toml: reboot_command: must be a string or a list of strings, got {reboot!r}",
            key="reboot_command",
        )
    cfg = AgentConfig(
        device_id=device_id,
        compatible=top.text("compatible", required=True),
        broker=_broker(top.table("broker", required=True), device_id),
        slots=_slots(top.table("slots", required=True)),
        store=_store(top.table("store")),
        bootloader=_bootloader(top.table("bootloader")),
        health=_health(top.table("health")),
        download=_download(top.table("download")),
        testing=_testing(top.table("testing")),
        state_dir=top.path("state_dir", Path("/var/lib/otad")),
        keyring=top.path("keyring", Path("/etc/otad/keyring")),
        reboot_command=reboot_command,
        reboot_timeout=top.number("reboot_timeout", 600.0, minimum=1.0),
        progress_interval=top.number("progress_interval", 1.0, minimum=0.0),
        version_file=top.path("version_file"),
        config_dir=base,
    )
    top.done()
    return cfg


def load(path: Path = DEFAULT_PATH) -> AgentConfig:
    """Read and validate the config file at ``path``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"otad.toml: cannot read {path}: {exc.strerror}", path=str(path)) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"otad.toml: {path}: not valid TOML: {exc}", path=str(path)) from exc
    return parse(data, base=path.resolve().parent)

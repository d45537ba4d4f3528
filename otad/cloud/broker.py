"""Running the system Mosquitto with a cloud dir's generated config.

Two ways: :func:`exec_broker` replaces the current process (``otad cloud broker DIR``: signals
go straight to mosquitto, which shuts down cleanly on SIGTERM/SIGINT), and
:class:`BrokerProcess` supervises it as a child (test fixtures, fault tests that bounce the
broker). Both regenerate ``broker/mosquitto.conf`` and ``broker/acl`` from ``otad-cloud.toml``
first, so the TOML file stays the single source of truth.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, NoReturn

import structlog

from otad.cloud.config import CloudConfig
from otad.cloud.pki import CloudDir, write_broker_files
from otad.errors import BrokerError, ConfigError

__layer__ = "adapter"

log = structlog.get_logger(__name__)


def mosquitto_path(config: CloudConfig) -> str:
    """The mosquitto binary: the configured path, else whatever ``mosquitto`` is on PATH."""
    if os.access(config.mosquitto_bin, os.X_OK):
        return config.mosquitto_bin
    found = shutil.which("mosquitto")
    if found is None:
        raise ConfigError(
            f"broker: mosquitto not found at {config.mosquitto_bin} or on PATH "
            "(install the mosquitto package)"
        )
    return found


def exec_broker(cloud: CloudDir) -> NoReturn:
    """Regenerate the broker files and become mosquitto (foreground, logs on stderr)."""
    config = cloud.config()
    write_broker_files(cloud, config)
    binary = mosquitto_path(config)
    log.info("broker_starting", binary=binary, host=config.broker_host, port=config.broker_port)
    os.execv(binary, [binary, "-c", str(cloud.mosquitto_conf)])  # noqa: S606 - no shell wanted


def wait_port(host: str, port: int, timeout: float) -> bool:
    """True once a TCP connect to host:port succeeds, False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


class BrokerProcess:
    """Mosquitto as a supervised child process, restartable on the same port.

    ``log_path`` receives mosquitto's stderr (appended across restarts, so a failing fault test
    can show the whole story). Methods block briefly (tens of milliseconds); they are meant for
    fixtures and tests, not for a serving event loop.
    """

    def __init__(self, cloud: CloudDir, *, log_path: Path | None = None) -> None:
        self.cloud = cloud
        self.config = cloud.config()
        self.host = self.config.broker_host
        self.port = self.config.broker_port
        self.log_path = log_path or cloud.broker_dir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 10.0) -> None:
        """Start mosquitto; return once it has loaded its config and TLS files and listens."""
        if self.running:
            return
        if wait_port(self.host, self.port, 0):
            # Something else listens there: waiting for "the port accepts" would mistake it
            # for our broker.
            raise BrokerError(f"broker: {self.host}:{self.port} is already in use")
        write_broker_files(self.cloud, self.config)
        binary = mosquitto_path(self.config)
        self._log = self.log_path.open("ab")
        offset = self._log.tell()
        self._proc = subprocess.Popen(
            [binary, "-c", str(self.cloud.mosquitto_conf)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        # Mosquitto opens its socket before it loads the TLS files, so an accepting port alone
        # is not "ready": wait for its "running" line too (written once everything loaded).
        deadline = time.monotonic() + timeout
        while not (self._logged_running(offset) and wait_port(self.host, self.port, 0.1)):
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                self._close_log()
                raise BrokerError(
                    f"broker: mosquitto exited with {code} before serving on "
                    f"{self.host}:{self.port}; log {self.log_path}:\n{self.log_tail(2048)}"
                )
            if time.monotonic() >= deadline:
                self.stop()
                raise BrokerError(
                    f"broker: mosquitto did not serve on {self.host}:{self.port} within "
                    f"{timeout} s; log: {self.log_path}"
                )
            time.sleep(0.02)
        log.info("broker_started", pid=self._proc.pid, host=self.host, port=self.port)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence file and exits), SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        log.info("broker_stopped", pid=proc.pid, returncode=proc.returncode)
        self._proc = None
        self._close_log()

    def kill(self) -> None:
        """SIGKILL: a crash, no persistence written."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        self._proc = None
        self._close_log()

    def restart(self, timeout: float = 10.0) -> None:
        self.stop(timeout)
        self.start(timeout)

    def _logged_running(self, offset: int) -> bool:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return b" running" in f.read()
        except OSError:
            return False

    def log_tail(self, max_bytes: int = 8192) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, self.log_path.stat().st_size - max_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> BrokerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

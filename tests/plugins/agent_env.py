"""Fixtures for the device agent: file-backed slots, the sim bootloader, agents, power cycles.

Fixtures
--------
``make_device`` (function)
    ``make_device(device_id="dev1", **options) -> SimDevice``: a simulated device under the
    test's tmp dir, wired to the session's ``cloud_dir`` and ``broker``: two slot files (A holds
    the factory image "1.0" and is booted), a sim bootloader, a state dir, a health.d dir and an
    ``otad.toml`` (also usable by ``otad agent run --config`` in a subprocess). Options:
    ``slot_size``, ``version`` (of slot A), ``attempts`` (sim tries per committed slot),
    ``config`` (a dict merged into the TOML document, e.g. ``{"download": {"retries": 2}}``).

``SimDevice`` (importable: ``from plugins.agent_env import SimDevice``)
    ``await dev.start()`` runs an :class:`otad.agent.daemon.Agent` in this event loop (the
    rebooter only records the request); ``await dev.stop()``; ``await dev.power_cycle()`` =
    stop + ``SimBootloader.power_on()`` + a new boot id, returns the booted slot;
    ``await dev.reboot()`` = power cycle + start; ``await dev.wait_reboot_requested()``;
    ``dev.slot_sha(slot)``, ``dev.slot_bytes(slot)``, ``dev.sim``, ``dev.config``.

Helpers
    ``await wait_reported(cloud, device_id, predicate, timeout=...)``: poll the replica until
    ``predicate(reported_software)`` is true, return that entry (AssertionError on timeout).
    ``to_toml(dict) -> str``: the tiny TOML writer the fixture uses.
    ``await run_agent_process(config_path)``: ``otad agent run`` as a child process (for tests
    that kill it or that need it to end at a crash point with ``os._exit``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from otad.agent.bootloader.sim import SimBootloader
from otad.agent.config import AgentConfig, load
from otad.agent.daemon import Agent
from otad.agent.download import Downloader
from otad.agent.journal import Journal
from otad.agent.update import DeviceState, HealthResult, UpdateRunner
from otad.agent.wiring import make_layout
from otad.bundle import Keyring
from otad.bundle.openssl import ED25519_SPKI_PREFIX
from otad.errors import BrokerError, ShadowNotFound

SLOT_SIZE = 4 * 1024 * 1024
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(doc: Mapping[str, Any], prefix: str = "") -> str:
    """Plain keys first, then one [table] per nested mapping."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, Mapping)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in doc.items():
        if isinstance(value, Mapping):
            name = f"{prefix}{key}"
            out += f"\n[{name}]\n" + to_toml(value, f"{name}.")
    return out


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def fill(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


class ListReporter:
    """The Reporter protocol in memory: every report is kept and accepted at once."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def report(self, reported: Mapping[str, Any], *, client_token: str | None = None) -> int:
        self.reports.append(dict(reported))
        return len(self.reports)

    async def flush(self, within: float) -> bool:
        return True


async def runner_on_file_slots(config: AgentConfig) -> UpdateRunner:
    """An UpdateRunner of ``config`` (file slots, the sim bootloader) without the daemon around
    it: slot A runs version 1.0 and is booted, the journal is locked, recovery has run. Its
    reporter is a :class:`ListReporter`, its health check passes; close ``runner.downloader``
    and release ``runner.journal`` after use."""
    DeviceState(config.state_dir / "device.json", {"A": "1.0"}).save()
    journal = Journal(config.state_dir, boot_id="boot-1")
    await asyncio.to_thread(journal.acquire)

    async def healthy() -> HealthResult:
        return HealthResult(True, "")

    runner = UpdateRunner(
        config,
        bootloader=SimBootloader(config.sim_state_path, durable=False),
        journal=journal,
        booted_slot="A",
        layout=make_layout(config),
        downloader=Downloader(config),
        reporter=ListReporter(),
        rebooter=lambda: None,
        health=healthy,
        keyring=Keyring.load(config.keyring),
    )
    await runner.recover()
    return runner


class SimDevice:
    """One simulated device (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        device_id: str,
        cloud_dir: Any,
        broker: Any,
        *,
        slot_size: int = SLOT_SIZE,
        version: str = "1.0",
        attempts: int = 3,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = root
        self.device_id = device_id
        root.mkdir(parents=True, exist_ok=True)
        self.slot_paths = {"A": root / "slot-a.img", "B": root / "slot-b.img"}
        self.factory = {
            "A": fill(self.slot_paths["A"], slot_size, seed=0xA),
            "B": fill(self.slot_paths["B"], slot_size, seed=0xB),
        }
        self.state_dir = root / "state"
        self.state_dir.mkdir()
        self.health_d = root / "health.d"
        self.health_d.mkdir()
        ident = cloud_dir.device(device_id)
        doc: dict[str, Any] = {
            "device_id": device_id,
            "compatible": "qemu-x86_64",
            "state_dir": str(self.state_dir),
            "keyring": str(cloud_dir.keyring_dir),
            "reboot_command": ["true"],
            "progress_interval": 0.2,
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "ca": str(cloud_dir.ca_cert),
                "cert": str(ident.cert),
                "key": str(ident.key),
                "keepalive": 10,
                "report_timeout": 2.0,
                "reconnect_initial": 0.1,
                "reconnect_max": 1.0,
            },
            "store": {"ca": str(cloud_dir.ca_cert)},
            "slots": {
                "A": {"path": str(self.slot_paths["A"])},
                "B": {"path": str(self.slot_paths["B"])},
            },
            "bootloader": {"type": "sim", "sim_state": str(root / "sim.json")},
            "health": {
                "check_systemd": False,
                "health_d": str(self.health_d),
                "script_timeout": 5.0,
                "broker": "required",
                "broker_timeout": 10.0,
            },
            "download": {
                "retries": 5,
                "backoff_initial": 0.05,
                "backoff_max": 0.5,
                "sock_connect": 5.0,
                "sock_read": 5.0,
            },
        }
        self.document = deep_merge(doc, config or {})
        self.config_path = root / "otad.toml"
        self.config_path.write_text(to_toml(self.document))
        self.config: AgentConfig = load(self.config_path)
        self.sim = SimBootloader(root / "sim.json", attempts=attempts, initial="A")
        self.sim.power_on()
        state = DeviceState(self.state_dir / "device.json", {"A": version})
        state.save()
        self.boot_id = uuid.uuid4().hex
        self.agent: Agent | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self.reboot_requests = 0
        self._reboot_requested = asyncio.Event()

    # --- slots -------------------------------------------------------------------------------

    def slot_bytes(self, slot: str) -> bytes:
        return self.slot_paths[slot].read_bytes()

    def slot_sha(self, slot: str, size: int | None = None) -> str:
        data = self.slot_bytes(slot)
        return hashlib.sha256(data if size is None else data[:size]).hexdigest()

    # --- lifecycle -----------------------------------------------------------------------------

    def _rebooter(self) -> None:
        self.reboot_requests += 1
        self._reboot_requested.set()

    async def start(self, **kwargs: Any) -> Agent:
        """Start an agent for the slot the sim booted last; returns once it is ready."""
        if self._task is not None:
            raise RuntimeError("agent already running")
        self._reboot_requested = asyncio.Event()
        booted = self.sim.booted()
        assert booted is not None, "the sim booted no slot"
        kwargs.setdefault("bootloader", self.sim)
        kwargs.setdefault("rebooter", self._rebooter)
        kwargs.setdefault("booted_slot", booted)
        kwargs.setdefault("boot_id", self.boot_id)
        agent = Agent(self.config, **kwargs)
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(agent.run(self._stop), name=f"agent-{self.device_id}")
        self.agent = agent
        ready = asyncio.create_task(agent.ready.wait())
        done, _ = await asyncio.wait(
            [ready, self._task], timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if self._task in done:
            ready.cancel()
            self._task.result()
            raise AssertionError("agent ended before it was ready")
        if ready not in done:
            ready.cancel()
            raise AssertionError("agent not ready in time")
        return agent

    async def stop(self) -> None:
        if self._task is None or self._stop is None:
            return
        self._stop.set()
        task, self._task = self._task, None
        try:
            await asyncio.wait_for(task, STOP_TIMEOUT)
        finally:
            self.agent = None

    async def power_cycle(self) -> str:
        """Stop the agent, run the sim bootloader's power-on, new boot id; the booted slot."""
        await self.stop()
        self.boot_id = uuid.uuid4().hex
        return self.sim.power_on()

    async def reboot(self, **kwargs: Any) -> str:
        booted = await self.power_cycle()
        await self.start(**kwargs)
        return booted

    async def wait_reboot_requested(self, within: float = 30.0) -> None:
        task = self._task
        waiter = asyncio.create_task(self._reboot_requested.wait())
        tasks: list[asyncio.Task[Any]] = [waiter] + ([task] if task is not None else [])
        done, _ = await asyncio.wait(tasks, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task is not None and task in done:
            task.result()
            raise AssertionError("agent ended instead of asking for a reboot")
        if waiter not in done and not self._reboot_requested.is_set():
            raise AssertionError(f"no reboot requested within {within}s")


async def wait_reported(
    cloud: Any,
    device_id: str,
    predicate: Callable[[dict[str, Any]], bool],
    within: float = 30.0,
) -> dict[str, Any]:
    """Poll the replica's document until ``predicate(reported.software)``; returns the entry."""
    deadline = asyncio.get_running_loop().time() + within
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            doc = await cloud.get_document(device_id)
        except (ShadowNotFound, BrokerError):
            doc = None
        state = (doc or {}).get("state") or {}
        last = (state.get("reported") or {}).get("software")
        if isinstance(last, dict) and predicate(last):
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{device_id}: reported software never matched; last: {last}")


def otad_cli(unimportable: Sequence[str] = ()) -> list[str]:
    """argv that runs the ``otad`` command line with these top-level modules unimportable
    (``sys.modules[name] = None``): the libraries a device image or a build host lacks."""
    code = (
        "import sys\n"
        f"for name in {sorted(unimportable)!r}: sys.modules[name] = None\n"
        "from otad.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return [sys.executable, "-c", code]


async def run_agent_process(
    config: Path, *, unimportable: Sequence[str] = (), stderr: Path | None = None
) -> asyncio.subprocess.Process:
    """``otad agent run --config config`` as a child process, its output discarded.

    ``unimportable``: see :func:`otad_cli`. ``stderr``: a file for the child's log instead.
    """
    argv = [*otad_cli(unimportable), "--log-json", "agent", "run", "--config", str(config)]
    log: Any = contextlib.nullcontext(asyncio.subprocess.DEVNULL)
    if stderr is not None:
        log = stderr.open("ab")
    with log as err:
        return await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=err
        )


async def stop_agent_process(process: asyncio.subprocess.Process, within: float = 20.0) -> None:
    """SIGTERM and wait; a process that does not stop is killed and the test fails."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), within)
    except TimeoutError:
        process.kill()  # never leave a process behind, but a hung stop is a failure
        await process.wait()
        raise AssertionError(f"the agent did not stop within {within:.0f} s of SIGTERM") from None


def weak_keyring(root: Path) -> tuple[Path, Path]:
    """A keyring trusting the Ed25519 identity point (any signature would verify under it):
    refused when loaded. Returns (keyring dir, the offending file)."""
    keyring = root / "weak-keyring"
    keyring.mkdir()
    body = base64.b64encode(ED25519_SPKI_PREFIX + b"\x01" + bytes(31)).decode()
    weak = keyring / "0000000000000000.pem"
    weak.write_text(f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n")
    return keyring, weak


def fix_keyring(keyring: Path, source: Path) -> None:
    """Make ``keyring`` (a :func:`weak_keyring`) trust the keys of the keyring ``source``."""
    for pem in keyring.glob("*.pem"):
        pem.unlink()
    for pem in source.glob("*.pem"):
        (keyring / pem.name).write_bytes(pem.read_bytes())


async def wait_for_path(path: Path, within: float = 10.0) -> bool:
    """Whether ``path`` exists within ``within`` seconds (polled every 0.1 s)."""
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(path.exists):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


@pytest.fixture
async def make_device(tmp_path: Path, cloud_dir: Any, broker: Any) -> Any:
    devices: list[SimDevice] = []

    def factory(device_id: str = "dev1", **options: Any) -> SimDevice:
        dev = SimDevice(tmp_path / f"device-{device_id}", device_id, cloud_dir, broker, **options)
        devices.append(dev)
        return dev

    yield factory
    for dev in devices:
        with contextlib.suppress(Exception):
            await dev.stop()


class FaultProxy:
    """A TCP proxy on loopback in front of the store, for network faults at the byte level.

    TLS passes through untouched (the client still verifies the store's certificate); the proxy
    only counts and cuts. ``cut_after(n)``: the next connection is closed once ``n`` bytes went
    from the server to the client (one shot). ``down_bytes``/``connections`` count everything;
    ``rate`` throttles server -> client (bytes/s).
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self.down_bytes = 0
        self.cuts = 0
        self.rate: float | None = None  # bytes/s server -> client (None: unthrottled)
        self._cut: int | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def cut_after(self, nbytes: int) -> None:
        self._cut = nbytes

    def url(self, url: str) -> str:
        """``url`` with the store's port replaced by the proxy's."""
        return url.replace(f":{self.target_port}/", f":{self.port}/", 1)

    async def start(self, port: int = 0) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        cut, self._cut = self._cut, None
        try:
            up_r, up_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, down: bool) -> None:
            sent = 0
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    if down and cut is not None and sent + len(data) >= cut:
                        data = data[: max(0, cut - sent)]
                        dst.write(data)
                        self.down_bytes += len(data)
                        self.cuts += 1
                        return
                    dst.write(data)
                    await dst.drain()
                    sent += len(data)
                    if down:
                        self.down_bytes += len(data)
                        if self.rate:
                            await asyncio.sleep(len(data) / self.rate)

        try:
            a = asyncio.create_task(pipe(reader, up_w, False))
            b = asyncio.create_task(pipe(up_r, writer, True))
            await asyncio.wait([a, b], return_when=asyncio.FIRST_COMPLETED)
            a.cancel()
            b.cancel()
        finally:
            for w in (writer, up_w):
                with contextlib.suppress(Exception):
                    w.transport.abort()
            self._tasks.discard(task)


async def offer_bundle(
    cloud: Any,
    cloud_dir: Any,
    workdir: Path,
    *,
    version: str = "2.0",
    job: str = "j1",
    image_size: int = 3 * 1024 * 1024,
    device: str = "dev1",
    seed: int = 2,
    proxy: FaultProxy | None = None,
    expires_in: float = 3600,
    publish: bool = True,
    **bundle_kwargs: Any,
) -> tuple[bytes, dict[str, Any]]:
    """Build + upload a bundle, set it as the device's desired software; (image, entry)."""
    from plugins.cloud_env import make_bundle

    bundle = make_bundle(
        cloud_dir,
        workdir / f"{job}.otb",
        version=version,
        image_size=image_size,
        seed=seed,
        **bundle_kwargs,
    )
    image = bundle.with_suffix(".img").read_bytes()
    artifact = await cloud.upload(bundle)
    url = cloud.presign(artifact, device, expires_in=expires_in)
    entry = {"version": version, "url": proxy.url(url) if proxy else url, "jobId": job}
    if publish:
        await cloud.set_desired(device, {"software": entry})
    return image, entry


def store_proxy(cloud: Any) -> FaultProxy:
    """A FaultProxy in front of the cloud fixture's store (call ``await proxy.start()``)."""
    return FaultProxy("127.0.0.1", int(cloud.store_url.rsplit(":", 1)[1]))


async def start_https_app(cloud_dir: Any, app: Any) -> tuple[Any, int]:
    """Serve an aiohttp ``app`` over TLS (the cloud CA's server certificate) on a free loopback
    port; (runner to clean up, port)."""
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=cloud_dir.server_context())
    await site.start()
    return runner, runner.addresses[0][1]


@contextlib.asynccontextmanager
async def serve_https(cloud_dir: Any, route: str, handler: Any) -> AsyncIterator[str]:
    """``handler`` answers GET ``route`` over TLS on loopback; yields the origin URL."""
    from aiohttp import web

    app = web.Application()
    app.router.add_get(route, handler)
    runner, port = await start_https_app(cloud_dir, app)
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class BlobServer:
    """An HTTPS server (the cloud CA's server certificate) serving exact bytes at ``/<name>``.

    For bundles the real store would refuse on upload (tampered, truncated, unknown key): the
    agent must refuse them itself. No Range support, no auth: only what a hostile mirror does.
    """

    def __init__(self, cloud_dir: Any) -> None:
        self.cloud_dir = cloud_dir
        self.blobs: dict[str, bytes] = {}
        self.requests = 0
        self._runner: Any = None
        self.port = 0

    def add(self, name: str, data: bytes) -> str:
        self.blobs[name] = data
        return f"https://127.0.0.1:{self.port}/{name}"

    async def start(self) -> BlobServer:
        from aiohttp import web

        async def handler(request: web.Request) -> web.StreamResponse:
            self.requests += 1
            data = self.blobs.get(request.match_info["name"])
            if data is None:
                return web.Response(status=404)
            return web.Response(body=data, content_type="application/octet-stream")

        app = web.Application()
        app.router.add_get("/{name}", handler)
        self._runner, self.port = await start_https_app(self.cloud_dir, app)
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def blob_server(cloud_dir: Any) -> Any:
    server = await BlobServer(cloud_dir).start()
    yield server
    await server.close()

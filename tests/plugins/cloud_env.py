"""Fixtures for the cloud side: PKI, a real Mosquitto with TLS and ACL, replica, store.

Fixtures
--------
``cloud_dir`` (session)
    A :class:`otad.cloud.pki.CloudDir` made by ``init_cloud`` with devices ``dev1`` .. ``dev4``,
    free loopback ports for the broker and the store, and the default topic template
    ``state/{device_id}``. Paths: ``cloud_dir.ca_cert``, ``cloud_dir.device("dev1").cert/.key``,
    ``cloud_dir.service("fleet")``, ``cloud_dir.signing_key``, ``cloud_dir.keyring_dir`` ...
    Read-only for tests: make your own with ``init_cloud(tmp_path)`` to change it.

``broker`` (function; one mosquitto per session behind it)
    A running :class:`otad.cloud.broker.BrokerProcess` (TLS, client certificates required,
    ACL on) with ``.host``, ``.port``, ``.stop()``, ``.start()``, ``.restart()``, ``.kill()``
    (SIGKILL) and ``.log_path``. A test may stop or kill it: the next test gets it running again.
    On a test failure the tail of the mosquitto log is attached to the report.

``cloud`` (function, async)
    A :class:`CloudEnv`: the artifact store (HTTPS on a free port) and the replica running in the
    test's event loop against ``broker``, each test with its own database and artifacts dir.
    Helpers: ``await upload(bundle_path) -> artifact_id``, ``presign(artifact_id, device_id,
    expires_in=3600) -> url``, ``store_url``, ``await set_desired(device_id, dict)``,
    ``await get_document(device_id)``, ``mqtt(who)``, ``http(who)`` (aiohttp session with that
    identity), ``server`` / ``store`` / ``replica`` (the running objects). The rollout service is
    not started here (fleet tests run their own). ``await target(device_id, artifact_id)`` sets
    the desired software of the token flow (relative artifact URL, ``"auth": "token"``): the
    store issues a device a token only for an artifact its desired state names.

Helpers (importable: ``from plugins.cloud_env import mqtt_client, identity``)
    ``identity(cloud_dir, who)``: the Identity of a device id or of a service ("replica", "fleet").
    ``mqtt_client(cloud_dir, who, broker, **kwargs) -> aiomqtt.Client``: a TLS client presenting
    that identity (kwargs go to aiomqtt, e.g. ``identifier``, ``protocol``, ``clean_session``).
    Use it as ``async with mqtt_client(cloud_dir, "dev1", broker) as client: ...``.
    ``free_port()``: a currently free loopback TCP port.
    ``make_bundle(cloud_dir, out, version="2.0", image_size=..., compatible="qemu-x86_64",
    seed=1, **build_bundle_kwargs) -> Path``: a bundle signed with the cloud dir's signing key
    (image: deterministic, half noise, half zeros). ``make_image(path, size, seed=1)``.
    ``await cloud.upload_bytes(data)`` uploads bytes already in memory.

The broker's and the cloud's ``set_desired``/``get_document`` survive a broker bounce: the
helper reconnects once; the replica reconnects by itself (wait for it before asserting).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from otad.cloud.broker import BrokerProcess
from otad.cloud.config import CloudConfig
from otad.cloud.pki import SERVICES, CloudDir, Identity, init_cloud
from otad.cloud.replica import ShadowClient
from otad.cloud.server import CloudServer
from otad.errors import BrokerError

DEVICES = ("dev1", "dev2", "dev3", "dev4")


# Below the kernel's ephemeral range (32768-60999): a port picked there can be taken by any
# outgoing connection on this busy, shared machine before the server binds it.
_PORTS = (20000, 32000)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, outside the ephemeral range."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(*_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS} after 200 tries")


def identity(cloud: CloudDir, who: str) -> Identity:
    """A device identity by id, or a service identity by name ("replica", "fleet")."""
    return cloud.service(who) if who in SERVICES else cloud.device(who)


def mqtt_client(cloud: CloudDir, who: str, broker: Any, **kwargs: Any) -> aiomqtt.Client:
    """An aiomqtt client over TLS presenting ``who``'s certificate (not yet connected)."""
    kwargs.setdefault("timeout", 10)
    return aiomqtt.Client(
        broker.host,
        broker.port,
        tls_context=cloud.client_context(identity(cloud, who)),
        **kwargs,
    )


@contextlib.contextmanager
def cloud_with_broker(
    root: Path, device_ids: list[str]
) -> Iterator[tuple[CloudDir, BrokerProcess]]:
    """A cloud dir of its own under ``root`` and its broker running (for a test's own fleet)."""
    cloud = init_cloud(root / "cloud", device_ids, broker_port=free_port(), store_port=free_port())
    with BrokerProcess(cloud, log_path=root / "mosquitto.log") as broker:
        yield cloud, broker


@pytest.fixture(scope="session")
def cloud_dir(tmp_path_factory: pytest.TempPathFactory) -> CloudDir:
    root = tmp_path_factory.mktemp("cloud")
    return init_cloud(root, DEVICES, broker_port=free_port(), store_port=free_port())


@pytest.fixture(scope="session")
def _broker_process(cloud_dir: CloudDir) -> Iterator[BrokerProcess]:
    process = BrokerProcess(cloud_dir, log_path=cloud_dir.broker_dir / "mosquitto.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def broker(_broker_process: BrokerProcess) -> BrokerProcess:
    # A previous test may have stopped or killed it on purpose.
    if not _broker_process.running:
        _broker_process.start()
    return _broker_process


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        process = getattr(item, "funcargs", {}).get("broker")
        if isinstance(process, BrokerProcess):
            report.sections.append(("mosquitto log (tail)", process.log_tail()))


def make_image(path: Path, size: int, *, seed: int = 1) -> Path:
    """A deterministic image file of ``size`` bytes, half compressible, half noise."""
    rng = random.Random(seed)
    block = bytearray()
    while len(block) < size:
        block += rng.randbytes(2048) + bytes(2048)
    path.write_bytes(bytes(block[:size]))
    return path


def make_bundle(
    cloud: CloudDir,
    out: Path,
    *,
    version: str = "2.0",
    image_size: int = 256 * 1024,
    compatible: str = "qemu-x86_64",
    seed: int = 1,
    **kwargs: Any,
) -> Path:
    """A bundle signed with the cloud dir's signing key (kwargs go to ``build_bundle``)."""
    from otad.bundle import build_bundle, load_private_key

    image = make_image(out.with_suffix(".img"), image_size, seed=seed)
    build_bundle(
        image,
        out,
        key=load_private_key(cloud.signing_key),
        version=version,
        compatible=compatible,
        **kwargs,
    )
    return out


class CloudEnv:
    """The cloud side of one test: :class:`CloudServer` in this event loop, helpers around it."""

    def __init__(self, cloud_dir: CloudDir, broker: BrokerProcess, config: CloudConfig) -> None:
        self.cloud_dir = cloud_dir
        self.broker = broker
        self.config = config
        self.server = CloudServer(
            cloud_dir, config, store_host="127.0.0.1", store_port=0, rollouts=False
        )
        self.store = self.server.store
        self.replica = self.server.replica
        self._shadows: ShadowClient | None = None

    async def __aenter__(self) -> CloudEnv:
        await self.server.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._shadows is not None:
            await self._shadows.__aexit__(None, None, None)
            self._shadows = None
        await self.server.__aexit__(*exc)

    @property
    def store_url(self) -> str:
        return self.store.url

    def presign(self, artifact_id: str, device_id: str, expires_in: float = 3600) -> str:
        return self.store.signer.presign(artifact_id, device_id, expires_in)

    def http(self, who: str | None = None) -> aiohttp.ClientSession:
        """An HTTPS session trusting the cloud CA, presenting ``who``'s certificate if given."""
        ctx = self.cloud_dir.client_context(identity(self.cloud_dir, who) if who else None)
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), auto_decompress=False)

    async def upload(self, bundle: Path, *, who: str = "fleet") -> str:
        """Upload over HTTPS as the fleet identity; returns the artifact id."""
        return await self.upload_bytes(await asyncio.to_thread(bundle.read_bytes), who=who)

    async def upload_bytes(self, data: bytes, *, who: str = "fleet") -> str:
        async with (
            self.http(who) as session,
            session.post(f"{self.store_url}/v1/artifacts", data=data) as resp,
        ):
            body = await resp.json()
            if resp.status != 201:
                raise AssertionError(f"upload refused: {resp.status} {body}")
            return str(body["id"])

    async def shadows(self) -> ShadowClient:
        """A connected ShadowClient with the fleet identity (shared within the test)."""
        if self._shadows is None:
            client = self.server.shadow_client_factory()()
            await client.__aenter__()
            self._shadows = client
        return self._shadows

    async def _shadow_call(self, call: Callable[[ShadowClient], Awaitable[Any]]) -> Any:
        # A test may bounce the broker: one fresh connection, then the error stands.
        try:
            return await call(await self.shadows())
        except BrokerError:
            if self._shadows is not None:
                await self._shadows.__aexit__(None, None, None)
                self._shadows = None
            return await call(await self.shadows())

    async def set_desired(self, device_id: str, desired: dict[str, Any]) -> dict[str, Any]:
        """Merge ``desired`` into the device's desired state; the update/accepted payload."""
        result: dict[str, Any] = await self._shadow_call(
            lambda shadows: shadows.update_desired(device_id, desired)
        )
        return result

    async def target(
        self, device_id: str, artifact_id: str, *, job_id: str = "j-token", version: str = "2.0"
    ) -> dict[str, Any]:
        """Target ``device_id`` by ``artifact_id`` for the token flow (what an operator sets)."""
        software = {
            "version": version,
            "url": f"/v1/artifacts/{artifact_id}",
            "auth": "token",
            "jobId": job_id,
        }
        return await self.set_desired(device_id, {"software": software})

    async def get_document(self, device_id: str) -> dict[str, Any]:
        """The device's full shadow document (ShadowNotFound if never written)."""
        result: dict[str, Any] = await self._shadow_call(lambda shadows: shadows.get(device_id))
        return result

    def mqtt(self, who: str, **kwargs: Any) -> aiomqtt.Client:
        return mqtt_client(self.cloud_dir, who, self.broker, **kwargs)


@pytest.fixture
async def cloud(
    cloud_dir: CloudDir, broker: BrokerProcess, tmp_path: Path
) -> AsyncIterator[CloudEnv]:
    config = cloud_dir.config().with_overrides(
        db_path=tmp_path / "cloud-state" / "shadow.db",
        artifacts_dir=tmp_path / "cloud-artifacts",
        broker_port=broker.port,
    )
    async with CloudEnv(cloud_dir, broker, config) as env:
        yield env

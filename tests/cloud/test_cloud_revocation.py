"""`otad cloud revoke-device`: the CRL, and a revoked device refused by the broker and the store."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import aiomqtt
import pytest
from cryptography import x509
from plugins.cloud_env import free_port, mqtt_client

from otad.bundle import Keyring
from otad.cloud.broker import BrokerProcess
from otad.cloud.pki import CloudDir, add_device, init_cloud, revoke_device
from otad.cloud.store import ArtifactStore
from otad.errors import ConfigError


@pytest.fixture
def own_cloud(tmp_path: Path) -> Iterator[tuple[CloudDir, BrokerProcess]]:
    cloud = init_cloud(tmp_path / "c", ["r1", "r2"], broker_port=free_port())
    with BrokerProcess(cloud) as process:
        yield cloud, process


def load_crl(cloud: CloudDir) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(cloud.crl.read_bytes())


def test_revocation_crl_is_signed_long_lived_and_numbered(tmp_path: Path) -> None:
    cloud = init_cloud(tmp_path, ["a", "b"])
    empty = load_crl(cloud)
    assert list(empty) == []
    ca = x509.load_pem_x509_certificate(cloud.ca_cert.read_bytes())
    # An expired CRL would lock every client out: it lives as long as the CA.
    assert empty.next_update_utc == ca.not_valid_after_utc
    serial_a = x509.load_pem_x509_certificate(cloud.device("a").cert.read_bytes()).serial_number
    archived = revoke_device(cloud.root, "a")
    crl = load_crl(cloud)
    assert [entry.serial_number for entry in crl] == [serial_a]
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == 2
    assert archived.exists() and not cloud.device("a").key.exists()
    assert cloud.device_ids() == ["b"]
    check = subprocess.run(
        ["openssl", "crl", "-in", str(cloud.crl), "-CAfile", str(cloud.ca_cert), "-noout"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0 and "verify OK" in check.stderr + check.stdout


def test_revocation_refuses_unknown_devices(tmp_path: Path) -> None:
    cloud = init_cloud(tmp_path, ["a"])
    with pytest.raises(ConfigError, match="no certificate"):
        revoke_device(cloud.root, "zz")
    with pytest.raises(ConfigError):
        revoke_device(cloud.root, "../a")
    assert list(load_crl(cloud)) == []


async def test_revocation_broker_refuses_the_device_after_restart(
    own_cloud: tuple[CloudDir, BrokerProcess],
) -> None:
    cloud, process = own_cloud
    async with mqtt_client(cloud, "r1", process, identifier="r1-before"):
        pass
    stolen = cloud.client_context(cloud.device("r1"))  # what an attacker copied off r1
    revoke_device(cloud.root, "r1")
    process.restart()
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(process.host, process.port, tls_context=stolen, timeout=2):
            pass
    async with mqtt_client(cloud, "r2", process, identifier="r2-after") as r2:
        await r2.publish("state/r2/update", b"{}", qos=1)
    # Enrolled again: a new key and serial, accepted.
    add_device(cloud.root, "r1")
    async with mqtt_client(cloud, "r1", process, identifier="r1-again") as r1:
        await r1.publish("state/r1/update", b"{}", qos=1)


async def test_revocation_store_refuses_the_device(tmp_path: Path) -> None:
    cloud = init_cloud(tmp_path / "c", ["r1", "r2"])
    stolen = cloud.client_context(cloud.device("r1"))
    revoke_device(cloud.root, "r1")
    store = ArtifactStore(
        cloud.config(),
        keyring=Keyring.load(cloud.keyring_dir),
        ssl_context=cloud.server_context(),
        host="127.0.0.1",
        port=0,
    )
    async with store:
        url = f"{store.url}/v1/credentials"
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=stolen)) as session,
        ):
            with pytest.raises(aiohttp.ClientError):
                async with session.post(url, json={}) as resp:
                    await resp.read()
        good = cloud.client_context(cloud.device("r2"))
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=good)) as session,
            session.post(url, json={}) as resp,
        ):
            assert resp.status == 200
            assert (await resp.json())["device"] == "r2"

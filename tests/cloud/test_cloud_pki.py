"""The cloud dir made by `otad cloud init`: certificates chain, SANs, CNs, key modes, refusals."""

from __future__ import annotations

import ipaddress
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otad.cloud.config import load_config
from otad.cloud.pki import (
    CloudDir,
    add_device,
    init_cloud,
    render_acl,
    service_acl_filter,
    validate_device_id,
    write_broker_files,
)
from otad.errors import ConfigError


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def openssl_verify(ca: Path, cert: Path, purpose: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-purpose", purpose, "-CAfile", str(ca), str(cert)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_pki_chain_verifies_with_openssl(cloud_dir: CloudDir) -> None:
    server = openssl_verify(cloud_dir.ca_cert, cloud_dir.server.cert, "sslserver")
    assert server.returncode == 0, server.stderr
    for who in [cloud_dir.device("dev1"), cloud_dir.service("replica"), cloud_dir.service("fleet")]:
        client = openssl_verify(cloud_dir.ca_cert, who.cert, "sslclient")
        assert client.returncode == 0, client.stderr
        # A client certificate is not usable as a server certificate.
        assert openssl_verify(cloud_dir.ca_cert, who.cert, "sslserver").returncode != 0


def test_pki_server_cert_has_loopback_sans(cloud_dir: CloudDir) -> None:
    cert = load(cloud_dir.server.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_pki_identities_have_expected_cns_and_p256_keys(cloud_dir: CloudDir) -> None:
    assert cloud_dir.device_ids() == ["dev1", "dev2", "dev3", "dev4"]
    for device_id in cloud_dir.device_ids():
        assert cn(load(cloud_dir.device(device_id).cert)) == device_id
    assert cn(load(cloud_dir.service("replica").cert)) == "otad-svc-replica"
    assert cn(load(cloud_dir.service("fleet").cert)) == "otad-svc-fleet"
    ca = load(cloud_dir.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)


def test_pki_private_files_are_mode_0600(cloud_dir: CloudDir) -> None:
    private = [
        cloud_dir.ca_key,
        cloud_dir.server.key,
        cloud_dir.signing_key,
        cloud_dir.presign_secret,
        cloud_dir.service("replica").key,
        cloud_dir.service("fleet").key,
        *(cloud_dir.device(d).key for d in cloud_dir.device_ids()),
    ]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(cloud_dir.presign_secret.parent.stat().st_mode) == 0o700
    assert not list(cloud_dir.root.rglob(".*.tmp")), "temporary files left behind"


def test_pki_keyring_holds_the_signing_public_key(cloud_dir: CloudDir) -> None:
    key = serialization.load_pem_private_key(cloud_dir.signing_key.read_bytes(), None)
    pems = list(cloud_dir.keyring_dir.glob("*.pem"))
    assert len(pems) == 1
    public = serialization.load_pem_public_key(pems[0].read_bytes())
    assert public == key.public_key()


def test_pki_tls_handshake_with_python_ssl(cloud_dir: CloudDir) -> None:
    # The contexts the store and the clients use accept each other (in memory, no sockets).
    server_ctx = cloud_dir.server_context(client_certs=ssl.CERT_REQUIRED)
    client_ctx = cloud_dir.client_context(cloud_dir.device("dev2"))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, conn in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    conn.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    peer = server.getpeercert()
    assert peer is not None
    assert ("commonName", "dev2") in [item for rdn in peer["subject"] for item in rdn]


def test_pki_init_writes_a_loadable_config(cloud_dir: CloudDir) -> None:
    config = load_config(cloud_dir.root)
    assert config.topic_template == "state/{device_id}"
    assert config.presign_secret_file == cloud_dir.presign_secret
    assert len(config.read_presign_secret()) >= 32
    assert config.uploaders == ("otad-svc-fleet",)
    assert config.artifacts_dir.is_dir()


def test_pki_init_refuses_an_existing_cloud_dir(cloud_dir: CloudDir) -> None:
    before = cloud_dir.ca_cert.read_bytes()
    with pytest.raises(ConfigError, match="already a cloud dir"):
        init_cloud(cloud_dir.root, ["dev9"])
    assert cloud_dir.ca_cert.read_bytes() == before


def test_pki_add_device_issues_a_verifiable_identity(tmp_path: Path) -> None:
    cloud = init_cloud(tmp_path / "c", ["a1"])
    identity = add_device(cloud.root, "b2")
    assert cn(load(identity.cert)) == "b2"
    assert openssl_verify(cloud.ca_cert, identity.cert, "sslclient").returncode == 0
    assert stat.S_IMODE(identity.key.stat().st_mode) == 0o600
    assert cloud.device_ids() == ["a1", "b2"]
    with pytest.raises(ConfigError, match="already has an identity"):
        add_device(cloud.root, "b2")


def test_pki_add_device_refuses_a_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a cloud dir"):
        add_device(tmp_path, "dev1")
    assert not (tmp_path / "pki").exists()


@pytest.mark.parametrize(
    "bad",
    ["", "a/b", "a+b", "dev#", "-dev", ".hidden", "x" * 65, "otad-svc-replica", "dév", "a b"],
)
def test_pki_validate_device_id_rejects_unsafe_ids(bad: str) -> None:
    with pytest.raises(ConfigError):
        validate_device_id(bad)


def test_pki_init_rejects_duplicate_devices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        init_cloud(tmp_path, ["d1", "d1"])
    assert not (tmp_path / "otad-cloud.toml").exists()


def test_pki_acl_follows_the_topic_template(tmp_path: Path) -> None:
    assert service_acl_filter("$aws/things/{device_id}/shadow") == "$aws/things/+/shadow/#"
    cloud = init_cloud(tmp_path, ["d1"], topic_template="$aws/things/{device_id}/shadow")
    acl = render_acl(cloud.config())
    assert "pattern write $aws/things/%u/shadow/update\n" in acl
    assert "pattern read $aws/things/%u/shadow/update/delta\n" in acl
    assert "/fleet/" not in acl and "pattern readwrite" not in acl
    assert "user otad-svc-replica\ntopic readwrite $aws/things/+/shadow/#" in acl
    assert cloud.acl_file.read_text() == acl


def test_pki_init_adds_extra_server_sans_once(tmp_path: Path) -> None:
    cloud = init_cloud(tmp_path, [], server_sans=["10.0.2.100", "ota.example.org", "127.0.0.1"])
    san = load(cloud.server.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    ips = san.value.get_values_for_type(x509.IPAddress)
    assert ips == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.2.100"),
    ]
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost", "ota.example.org"]


@pytest.mark.parametrize("bad", ["-bad", "a..b", "a b", "x/y", ""])
def test_pki_init_rejects_a_bad_san(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        init_cloud(tmp_path, [], server_sans=[bad])
    assert not (tmp_path / "otad-cloud.toml").exists()


def test_pki_signing_key_loads_into_the_bundle_keyring(cloud_dir: CloudDir) -> None:
    from otad.bundle import Keyring, key_id_of, load_private_key

    keyring = Keyring.load(cloud_dir.keyring_dir)
    assert keyring.key_ids == [key_id_of(load_private_key(cloud_dir.signing_key))]


def test_pki_mosquitto_conf_enforces_tls_identity_and_acl(cloud_dir: CloudDir) -> None:
    lines = set(cloud_dir.mosquitto_conf.read_text().splitlines())
    config = cloud_dir.config()
    for expected in [
        "allow_anonymous false",
        "require_certificate true",
        "use_identity_as_username true",
        f"acl_file {cloud_dir.acl_file}",
        f"listener {config.broker_port} 127.0.0.1",
        f"cafile {cloud_dir.ca_cert}",
        "max_queued_messages 100000",
        "max_inflight_messages 100",
    ]:
        assert expected in lines


@pytest.mark.parametrize(
    "kwargs",
    [
        {"topic_template": "state/+/{device_id}"},
        {"broker_port": 70000},
        {"signing_algorithm": "rsa"},
        {"server_sans": ["bad name"]},
        {"devices": ["ok", "not ok"]},
    ],
)
def test_pki_init_checks_everything_before_writing(
    tmp_path: Path, kwargs: dict[str, object]
) -> None:
    root = tmp_path / "c"
    with pytest.raises(ConfigError):
        init_cloud(root, **kwargs)  # type: ignore[arg-type]
    assert not root.exists()


def test_pki_ed25519_signing_key_is_supported(tmp_path: Path) -> None:
    from otad.bundle import Keyring, algorithm_of, load_private_key

    cloud = init_cloud(tmp_path, [], signing_algorithm="ed25519")
    assert algorithm_of(load_private_key(cloud.signing_key)) == "ed25519"
    assert len(Keyring.load(cloud.keyring_dir).key_ids) == 1


def test_pki_broker_files_follow_an_edited_config(tmp_path: Path) -> None:
    cloud = init_cloud(tmp_path, ["d1"], broker_port=18883)
    text = cloud.config_file.read_text().replace("port = 18883", "port = 28883")
    text = text.replace('topic_template = "state/{device_id}"', 'topic_template = "t/{device_id}"')
    cloud.config_file.write_text(text)
    write_broker_files(cloud, cloud.config())
    assert "listener 28883 127.0.0.1" in cloud.mosquitto_conf.read_text()
    assert "pattern write t/%u/update\n" in cloud.acl_file.read_text()

"""Batch issuing of device identities (`pki.add_devices`): what a fleet of simulated devices, or
an enrolment of a production batch, needs. Each identity must be as good as one issued alone,
and a bad batch must leave nothing behind."""

from __future__ import annotations

import os
import resource
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from otad.cli.fleet import ensure_identities
from otad.cloud import pki
from otad.cloud.pki import CloudDir, add_device, add_devices, init_cloud
from otad.errors import ConfigError


def cn(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def leftovers(cloud: CloudDir) -> list[Path]:
    return [p for p in cloud.root.rglob(".*.tmp")]


@pytest.fixture
def cloud(tmp_path: Path) -> CloudDir:
    return init_cloud(tmp_path / "c", ["a1"])


def test_pki_add_devices_issues_verifiable_distinct_identities(cloud: CloudDir) -> None:
    ids = [f"batch-{n}" for n in range(40)]
    identities = add_devices(cloud.root, ids)
    assert [i.name for i in identities] == ids
    assert cloud.device_ids() == sorted(["a1", *ids])
    serials = set()
    for identity in identities:
        assert cn(identity.cert) == identity.name
        assert stat.S_IMODE(identity.key.stat().st_mode) == 0o600
        assert stat.S_IMODE(identity.cert.stat().st_mode) == 0o644
        serials.add(x509.load_pem_x509_certificate(identity.cert.read_bytes()).serial_number)
        # The key belongs to the certificate: a TLS context accepts the pair.
        ssl.create_default_context().load_cert_chain(str(identity.cert), str(identity.key))
    assert len(serials) == len(ids)
    verify = subprocess.run(
        ["openssl", "verify", "-purpose", "sslclient", "-CAfile", str(cloud.ca_cert)]
        + [str(i.cert) for i in identities[:5]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert leftovers(cloud) == []


def test_pki_add_devices_refuses_a_taken_id_before_writing_anything(cloud: CloudDir) -> None:
    with pytest.raises(ConfigError, match="'a1' already has an identity"):
        add_devices(cloud.root, ["n1", "a1", "n2"])
    assert cloud.device_ids() == ["a1"]
    assert leftovers(cloud) == []


def test_pki_add_devices_counts_the_taken_ids_it_does_not_name(cloud: CloudDir) -> None:
    add_devices(cloud.root, [f"t{n}" for n in range(5)])
    with pytest.raises(ConfigError, match="and 2 more already has"):
        add_devices(cloud.root, [f"t{n}" for n in range(5)])


def test_pki_add_devices_refuses_a_key_without_certificate(cloud: CloudDir) -> None:
    # A half-enrolled device (key left behind) is not silently re-keyed.
    cloud.device("k1").key.write_bytes(b"old key")
    with pytest.raises(ConfigError, match="already has an identity"):
        add_devices(cloud.root, ["k1"])
    assert cloud.device("k1").key.read_bytes() == b"old key"


@pytest.mark.parametrize("bad", [["ok1", "bad/id"], ["ok1", "otad-svc-fleet"], ["d", "d"]])
def test_pki_add_devices_refuses_a_bad_batch_whole(cloud: CloudDir, bad: list[str]) -> None:
    with pytest.raises(ConfigError):
        add_devices(cloud.root, bad)
    assert cloud.device_ids() == ["a1"]


def test_pki_add_devices_refuses_a_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a cloud dir"):
        add_devices(tmp_path, ["dev1", "dev2"])
    assert not (tmp_path / "pki").exists()


def test_pki_add_devices_of_nothing_writes_nothing(cloud: CloudDir) -> None:
    before = sorted(p.name for p in cloud.devices_dir.iterdir())
    assert add_devices(cloud.root, []) == []
    assert sorted(p.name for p in cloud.devices_dir.iterdir()) == before


def test_pki_add_device_is_a_batch_of_one(cloud: CloudDir) -> None:
    identity = add_device(cloud.root, "single")
    assert cn(identity.cert) == "single"
    assert leftovers(cloud) == []


def test_pki_add_devices_replaces_a_stale_temp_file(cloud: CloudDir) -> None:
    # A batch interrupted before its renames leaves temp files only; the next one overwrites them.
    stale = cloud.devices_dir / ".s1.key.tmp"
    stale.write_bytes(b"partial")
    stale.chmod(0o644)
    (identity,) = add_devices(cloud.root, ["s1"])
    assert stat.S_IMODE(identity.key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in identity.key.read_bytes()
    assert leftovers(cloud) == []


def test_fleet_ensure_identities_issues_only_the_missing(cloud: CloudDir) -> None:
    assert ensure_identities(cloud, ["a1", "m1", "m2"]) == 2
    assert ensure_identities(cloud, ["a1", "m1", "m2"]) == 0
    assert cloud.device_ids() == ["a1", "m1", "m2"]


def test_pki_add_devices_keeps_few_files_open(
    cloud: CloudDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 10,000 devices are 20,000 files: a batch must not hold a descriptor per file.
    monkeypatch.setattr(pki, "_OPEN_AT_ONCE", 16)
    in_use = len(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 48, hard))
    try:
        identities = add_devices(cloud.root, [f"many-{n}" for n in range(100)])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(identities) == 100
    assert all(i.cert.exists() and i.key.exists() for i in identities)
    assert leftovers(cloud) == []

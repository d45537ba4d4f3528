"""The cloud dir: a private CA, server/device/service identities, the broker ACL, the config.

``otad cloud init DIR`` creates everything a backend needs on one host::

    DIR/
      otad-cloud.toml              the cloud config (see otad.cloud.config)
      pki/ca.pem, ca.key           the CA (ECDSA P-256); ca.key never leaves this dir
      pki/server.pem, server.key   broker + store TLS identity (SAN 127.0.0.1, ::1, localhost)
      pki/devices/<id>.pem, .key   one client identity per device, CN = device id
      pki/services/<name>.pem,.key service identities: replica, fleet (CN otad-svc-<name>)
      pki/crl.pem                  the CA's revocation list (empty at first)
      pki/revoked/                 certificates of revoked devices, for the record
      keys/signing.key             the bundle signing key (ECDSA P-256, PKCS#8)
      keys/keyring/<key id>.pem    its public key, as the keyring devices and the store trust
      broker/mosquitto.conf, acl   generated from otad-cloud.toml (see render_mosquitto_conf)
      broker/data/                 mosquitto persistence
      secrets/presign.key          HMAC key for pre-signed URLs and tokens
      state/                       the replica's database
      artifacts/                   uploaded bundles

Private keys and secrets are written with mode 0600 (created that way, never chmod'ed after a
window in which they were readable). Every file is written to a temporary name, fsync'd and
renamed, so an interrupted init never leaves a half-written key behind a valid name.

Device identities are issued in batches (:func:`add_devices`, and ``init`` with many devices):
the CA is loaded once and the files are written as one group (every temp file fsync'd, then all
renamed, then each directory fsync'd once). One fsync'd rename per file made 10,000 devices take
minutes here, while the key and certificate take under a millisecond per device (so they are
made in this process: a pool of two workers would save a few seconds per 10,000).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
import re
import secrets
import ssl
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otad.bundle import generate_private_key, key_id_of, private_key_pem, public_key_pem
from otad.bundle.keys import ALGORITHMS, P256
from otad.cloud.config import CONFIG_NAME, CloudConfig, load_config, parse_config, render_config
from otad.errors import ConfigError

__layer__ = "adapter"

SERVICE_PREFIX = "otad-svc-"
SERVICES = ("replica", "fleet")
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

CA_DAYS = 3650
SERVER_DAYS = 825
CLIENT_DAYS = 1825
# Concurrent fsyncs of one batch: the file system commits them together.
_FSYNC_THREADS = 16
# Temp files of a batch open at the same time (a batch of 10,000 devices is 20,000 files).
_OPEN_AT_ONCE = 256
# Certificates start 5 minutes in the past: a device whose clock is slightly behind still
# accepts them.
_BACKDATE = dt.timedelta(minutes=5)


def validate_device_id(device_id: str) -> str:
    """A device id is a certificate CN, an MQTT user name and a topic level: keep it plain."""
    if not _DEVICE_ID.fullmatch(device_id):
        raise ConfigError(
            f"pki: invalid device id {device_id!r}: use 1-64 characters of letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    if device_id.startswith(SERVICE_PREFIX):
        raise ConfigError(
            f"pki: device id {device_id!r} uses the reserved prefix {SERVICE_PREFIX!r}"
        )
    return device_id


def service_cn(name: str) -> str:
    """The certificate CN (= MQTT user name) of a backend service identity."""
    if name not in SERVICES:
        raise ConfigError(f"pki: unknown service {name!r}; known: {', '.join(SERVICES)}")
    return SERVICE_PREFIX + name


@dataclass(frozen=True)
class Identity:
    """A TLS identity: certificate, private key, and the CN the broker uses as user name."""

    name: str
    cert: Path
    key: Path


class CloudDir:
    """The paths of a cloud dir (nothing is read or created by constructing one)."""

    def __init__(self, path: Path | str) -> None:
        self.root = Path(path).resolve()

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        return self.pki_dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.pki_dir / "ca.key"

    @property
    def server(self) -> Identity:
        return Identity("server", self.pki_dir / "server.pem", self.pki_dir / "server.key")

    @property
    def devices_dir(self) -> Path:
        return self.pki_dir / "devices"

    def device(self, device_id: str) -> Identity:
        validate_device_id(device_id)
        return Identity(
            device_id,
            self.devices_dir / f"{device_id}.pem",
            self.devices_dir / f"{device_id}.key",
        )

    def device_ids(self) -> list[str]:
        """Ids of the devices that have an identity here, sorted."""
        if not self.devices_dir.is_dir():
            return []
        return sorted(p.stem for p in self.devices_dir.glob("*.pem"))

    def service(self, name: str) -> Identity:
        cn = service_cn(name)
        base = self.pki_dir / "services"
        return Identity(cn, base / f"{name}.pem", base / f"{name}.key")

    @property
    def signing_key(self) -> Path:
        return self.root / "keys" / "signing.key"

    @property
    def keyring_dir(self) -> Path:
        return self.root / "keys" / "keyring"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def mosquitto_conf(self) -> Path:
        return self.broker_dir / "mosquitto.conf"

    @property
    def acl_file(self) -> Path:
        return self.broker_dir / "acl"

    @property
    def broker_data_dir(self) -> Path:
        return self.broker_dir / "data"

    @property
    def presign_secret(self) -> Path:
        return self.root / "secrets" / "presign.key"

    def config(self) -> CloudConfig:
        return load_config(self.root)

    def client_context(self, identity: Identity | None = None) -> ssl.SSLContext:
        """A TLS client context trusting only this CA, presenting ``identity`` if given."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_cert))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if identity is not None:
            ctx.load_cert_chain(str(identity.cert), str(identity.key))
        return ctx

    @property
    def crl(self) -> Path:
        return self.pki_dir / "crl.pem"

    @property
    def revoked_dir(self) -> Path:
        return self.pki_dir / "revoked"

    def server_context(self, *, client_certs: ssl.VerifyMode = ssl.CERT_OPTIONAL) -> ssl.SSLContext:
        """A TLS server context with the server identity; client certificates from this CA.

        Client certificates listed in the CA's revocation list (``pki/crl.pem``) are refused
        during the handshake.
        """
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_cert))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.server.cert), str(self.server.key))
        if self.crl.exists():
            ctx.load_verify_locations(cafile=str(self.crl))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        ctx.verify_mode = client_certs
        return ctx


# --- creation ----------------------------------------------------------------------------------


def init_cloud(
    path: Path | str,
    devices: Iterable[str] = (),
    *,
    broker_port: int = 8883,
    store_port: int = 8443,
    topic_template: str = "state/{device_id}",
    server_sans: Iterable[str] = (),
    signing_algorithm: str = P256,
) -> CloudDir:
    """Create a complete cloud dir; refuse to touch one that already has a config.

    ``server_sans`` adds IP addresses or DNS names to the server certificate (for example the
    address a QEMU guest reaches the host on); loopback names are always there. The signing key
    is ECDSA P-256 by default: it verifies faster than Ed25519 with common OpenSSL builds.
    """
    cloud = CloudDir(path)
    extra_sans = [_general_name(name) for name in server_sans]
    device_ids = [validate_device_id(d) for d in devices]
    if len(set(device_ids)) != len(device_ids):
        raise ConfigError("pki: duplicate device id in --devices")
    if cloud.config_file.exists():
        raise ConfigError(
            f"pki: {cloud.root} is already a cloud dir; add devices with "
            f"`otad cloud add-device {cloud.root} ID`"
        )
    if signing_algorithm not in ALGORITHMS:
        raise ConfigError(f"pki: unknown signing algorithm {signing_algorithm!r}")
    # Every argument is checked before the first file is written.
    text = render_config(
        broker_port=broker_port,
        store_port=store_port,
        topic_template=topic_template,
        uploaders=(service_cn("fleet"),),
    )
    config = parse_config(text, root=cloud.root)
    for sub in ("pki/devices", "pki/services", "keys/keyring", "broker/data", "state"):
        (cloud.root / sub).mkdir(parents=True, exist_ok=True)
    (cloud.root / "artifacts").mkdir(exist_ok=True)
    (cloud.root / "secrets").mkdir(mode=0o700, exist_ok=True)
    (cloud.root / "secrets").chmod(0o700)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key)
    _write_key(cloud.ca_key, ca_key)
    _write(cloud.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_crl(cloud, ca_key, ca_cert, [])  # empty: the broker and the store always load one

    _issue(cloud.server, ca_key, ca_cert, server=True, extra_sans=extra_sans)
    for name in SERVICES:
        _issue(cloud.service(name), ca_key, ca_cert, server=False)
    _issue_devices(cloud, device_ids, ca_key, ca_cert)

    _write_signing_key(cloud, signing_algorithm)
    _write(cloud.presign_secret, secrets.token_hex(32).encode() + b"\n", 0o600)
    write_broker_files(cloud, config)
    # The config goes last: its presence marks the dir complete (init refuses to redo it).
    _write(cloud.config_file, text.encode(), 0o644)
    return cloud


def revoke_device(path: Path | str, device_id: str) -> Path:
    """Revoke a device's certificate: CRL entry, key deleted, certificate kept for the record.

    The store refuses the certificate at once (each ``otad cloud serve`` start reads the CRL;
    restart a running one); the broker after ``otad cloud broker`` restarts. The id may be
    enrolled again with :func:`add_device` (a new key and serial). Returns the archived cert.
    """
    cloud = CloudDir(path)
    identity = cloud.device(device_id)
    if not cloud.config_file.exists():
        raise ConfigError(f"pki: {cloud.root} is not a cloud dir (run `otad cloud init` first)")
    if not identity.cert.exists():
        raise ConfigError(f"pki: device {device_id!r} has no certificate in {cloud.root}")
    cert = x509.load_pem_x509_certificate(identity.cert.read_bytes())
    ca_key = _load_private_key(cloud.ca_key)
    ca_cert = x509.load_pem_x509_certificate(cloud.ca_cert.read_bytes())
    revoked = [*_revoked_entries(cloud), (cert.serial_number, dt.datetime.now(dt.UTC))]
    _write_crl(cloud, ca_key, ca_cert, revoked)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    archived = cloud.revoked_dir / f"{device_id}.{cert.serial_number:x}.{stamp}.pem"
    _write(archived, identity.cert.read_bytes(), 0o644)
    identity.key.unlink(missing_ok=True)
    identity.cert.unlink()
    return archived


def _revoked_entries(cloud: CloudDir) -> list[tuple[int, dt.datetime]]:
    if not cloud.crl.exists():
        return []
    crl = x509.load_pem_x509_crl(cloud.crl.read_bytes())
    return [(entry.serial_number, entry.revocation_date_utc) for entry in crl]


def _write_crl(
    cloud: CloudDir,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked: list[tuple[int, dt.datetime]],
) -> None:
    """(Re)write the CA's CRL. Its nextUpdate is the CA's own expiry: an expired CRL makes
    OpenSSL refuse every client, and nothing here republishes it on a schedule."""
    now = dt.datetime.now(dt.UTC)
    number = 1
    if cloud.crl.exists():
        previous = x509.load_pem_x509_crl(cloud.crl.read_bytes())
        number = previous.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(ca_cert.not_valid_after_utc)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    _write(cloud.crl, crl.public_bytes(serialization.Encoding.PEM), 0o644)


def add_device(path: Path | str, device_id: str) -> Identity:
    """Issue a client identity for another device; refuse to replace an existing one."""
    return add_devices(path, [device_id])[0]


def add_devices(path: Path | str, device_ids: Sequence[str]) -> list[Identity]:
    """Issue client identities for many devices in one pass; all or nothing is checked first.

    Every id is validated and checked for an existing identity before the first file is written
    (a duplicate or an enrolled id refuses the whole batch).
    """
    cloud = CloudDir(path)
    ids = [validate_device_id(d) for d in device_ids]
    if not cloud.config_file.exists():
        raise ConfigError(f"pki: {cloud.root} is not a cloud dir (run `otad cloud init` first)")
    if len(set(ids)) != len(ids):
        raise ConfigError("pki: duplicate device id in the batch")
    taken = [d for d in ids if any(p.exists() for p in (cloud.device(d).cert, cloud.device(d).key))]
    if taken:
        more = f" and {len(taken) - 3} more" if len(taken) > 3 else ""
        raise ConfigError(
            f"pki: device {', '.join(repr(d) for d in taken[:3])}{more} already has an identity "
            f"in {cloud.root}"
        )
    ca_key = _load_private_key(cloud.ca_key)
    ca_cert = x509.load_pem_x509_certificate(cloud.ca_cert.read_bytes())
    return _issue_devices(cloud, ids, ca_key, ca_cert)


def _issue_devices(
    cloud: CloudDir,
    device_ids: Sequence[str],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
) -> list[Identity]:
    """Make and write the identities of ``device_ids`` (already validated) as one batch."""
    if not device_ids:
        return []
    made = [_client_pems(d, ca_key, ca_cert) for d in device_ids]
    identities = [cloud.device(d) for d in device_ids]
    files: list[tuple[Path, bytes, int]] = []
    for identity, (key_pem, cert_pem) in zip(identities, made, strict=True):
        files += [(identity.key, key_pem, 0o600), (identity.cert, cert_pem, 0o644)]
    _write_many(files)
    return identities


def _client_pems(
    name: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[bytes, bytes]:
    key, cert = _certificate(name, ca_key, ca_cert, server=False)
    return _private_pem(key), cert.public_bytes(serialization.Encoding.PEM)


_LOOPBACK_SANS: tuple[x509.GeneralName, ...] = (
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    x509.IPAddress(ipaddress.ip_address("::1")),
    x509.DNSName("localhost"),
)


def _general_name(name: str) -> x509.GeneralName:
    """An IP address or DNS name for a SAN entry."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9][A-Za-z0-9-]{0,62})*", name):
        raise ConfigError(f"pki: {name!r} is neither an IP address nor a DNS name")
    return x509.DNSName(name)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "otad"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = _name(f"otad cloud CA {secrets.token_hex(4)}")
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _issue(
    identity: Identity,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    server: bool,
    extra_sans: Iterable[x509.GeneralName] = (),
) -> None:
    key, cert = _certificate(identity.name, ca_key, ca_cert, server=server, extra_sans=extra_sans)
    _write_many(
        [
            (identity.key, _private_pem(key), 0o600),
            (identity.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644),
        ]
    )


def _certificate(
    cn: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    server: bool,
    extra_sans: Iterable[x509.GeneralName] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh P-256 key and its certificate signed by the CA (nothing is written)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    days = SERVER_DAYS if server else CLIENT_DAYS
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(dict.fromkeys([*_LOOPBACK_SANS, *extra_sans]))),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def _write_signing_key(cloud: CloudDir, algorithm: str) -> None:
    key = generate_private_key(algorithm)
    _write(cloud.signing_key, private_key_pem(key), 0o600)
    # The keyring file name is the key id: Keyring.load checks it.
    _write(cloud.keyring_dir / f"{key_id_of(key)}.pem", public_key_pem(key), 0o644)


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"pki: cannot load private key {path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"pki: {path} is not an EC private key")
    return key


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write(path, _private_pem(key), 0o600)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomic write: temp file created with ``mode``, fsync, rename, fsync the directory."""
    _write_many([(path, data, mode)])


def _write_many(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Atomic writes of many files as one group.

    Each file goes to a temp name created with its mode, and every temp file is fsync'd (a few
    at a time in threads: the file system commits concurrent fsyncs together; the number of open
    descriptors stays bounded) before any is renamed; then each directory is fsync'd once. After
    a crash a name holds either its complete new content or nothing new; never a partial file.
    """
    for directory in dict.fromkeys(path.parent for path, _, _ in files):
        directory.mkdir(parents=True, exist_ok=True)
    tmps = [(path.with_name(f".{path.name}.tmp"), path) for path, _, _ in files]
    with ThreadPoolExecutor(_FSYNC_THREADS) as pool:
        for start in range(0, len(files), _OPEN_AT_ONCE):
            group = files[start : start + _OPEN_AT_ONCE]
            fds: list[int] = []
            try:
                for (tmp, _), (_, data, mode) in zip(tmps[start:], group, strict=False):
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
                    fds.append(fd)
                    os.fchmod(fd, mode)  # the umask may have narrowed or the file may have existed
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                if len(fds) > 2:
                    list(pool.map(os.fsync, fds))
                else:
                    for fd in fds:
                        os.fsync(fd)
            finally:
                for fd in fds:
                    os.close(fd)
    for tmp, path in tmps:
        os.replace(tmp, path)
    for directory in dict.fromkeys(path.parent for _, path in tmps):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --- broker configuration ----------------------------------------------------------------------


_GENERATED = "# Generated by otad from otad-cloud.toml; `otad cloud broker` overwrites edits."


def service_acl_filter(template: str) -> str:
    """The ACL filter of every device's shadow topics (for the service users)."""
    return template.replace("{device_id}", "+") + "/#"


#: What a device may write and read under its own prefix: its requests, and the answers and
#: notifications about it. Not ``fleet/update`` (the only request that may change ``desired``:
#: a device that set its own desired state could target itself with any artifact), and not the
#: answer topics (a device could forge the replica's answers to the fleet side).
DEVICE_WRITES: Final = ("update", "get")
DEVICE_READS: Final = (
    "update/accepted",
    "update/rejected",
    "update/delta",
    "update/documents",
    "get/accepted",
    "get/rejected",
)


def render_acl(config: CloudConfig) -> str:
    """Mosquitto ACL: a device writes its own requests and reads its own answers; services
    read and write every device's shadow topics."""
    every_device = service_acl_filter(config.topic_template)
    own = config.topic_template.replace("{device_id}", "%u")
    lines = [
        _GENERATED,
        "# The user name is the client certificate CN (use_identity_as_username).",
        "",
    ]
    for name in SERVICES:
        lines += [f"user {service_cn(name)}", f"topic readwrite {every_device}", ""]
    lines.append("# Every device: only these topics of its own. Anything not allowed is denied.")
    lines += [f"pattern write {own}/{suffix}" for suffix in DEVICE_WRITES]
    lines += [f"pattern read {own}/{suffix}" for suffix in DEVICE_READS]
    lines.append("")
    return "\n".join(lines)


def render_mosquitto_conf(cloud: CloudDir, config: CloudConfig) -> str:
    """Mosquitto 2.0 config: one TLS listener, client certificates required, ACL enforced."""
    # Mosquitto started as root drops to the "mosquitto" user unless told otherwise, and then
    # cannot read the 0600 server key; run it as the user that owns the cloud dir.
    user = pwd.getpwuid(os.getuid()).pw_name
    return "\n".join(
        [
            _GENERATED,
            "per_listener_settings false",
            "allow_anonymous false",
            f"acl_file {cloud.acl_file}",
            f"user {user}",
            "persistence true",
            f"persistence_location {cloud.broker_data_dir}/",
            "autosave_interval 60",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            # Shadow documents are at most 8 KiB; larger packets still reach the replica so it
            # can answer 413, but nothing huge is buffered by the broker.
            "max_packet_size 262144",
            # The replica and the fleet tool subscribe to every device's topics: the default
            # queue of 1000 messages per client drops their QoS 1 traffic in a burst, and the
            # default window of 20 in-flight messages throttles them. Mosquitto 2.0 has no
            # per-user limits; devices send a few messages a minute, so this costs them nothing.
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            "",
            f"listener {config.broker_port} {config.broker_host}",
            "protocol mqtt",
            f"cafile {cloud.ca_cert}",
            f"certfile {cloud.server.cert}",
            f"keyfile {cloud.server.key}",
            "tls_version tlsv1.2",
            "require_certificate true",
            "use_identity_as_username true",
            *([f"crlfile {cloud.crl}"] if cloud.crl.exists() else []),
            "",
        ]
    )


def write_broker_files(cloud: CloudDir, config: CloudConfig) -> None:
    """(Re)generate broker/mosquitto.conf and broker/acl from the config."""
    cloud.broker_data_dir.mkdir(parents=True, exist_ok=True)
    _write(cloud.acl_file, render_acl(config).encode(), 0o644)
    _write(cloud.mosquitto_conf, render_mosquitto_conf(cloud, config).encode(), 0o644)

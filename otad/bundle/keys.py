"""Verification keys: Ed25519 (default) and ECDSA P-256 with SHA-256, and their stable key ids.

A key id is the first 16 hex digits of the SHA-256 of the public key's DER SubjectPublicKeyInfo:
a pure function of the public key, so a signer and a device always agree on it, whatever the
file is called.

A :class:`PublicKey` is that DER and nothing else, in the one encoding each algorithm has
(what ``otad bundle keygen`` and ``openssl pkey -pubout`` write): Ed25519, and P-256 as a named
curve with an uncompressed point, so the bytes hashed for the key id are the bytes a signer
hashes too. A compressed P-256 point is re-encoded to that form; Ed25519 keys of small order or
not canonically encoded are refused (OpenSSL would take them). Checking a signature goes
through :mod:`otad.bundle.openssl` (the libcrypto ``ssl`` already loaded) and falls back to the
cryptography package; nothing here imports cryptography, so a device verifying bundles never
loads it. Private keys and signing are in
:mod:`otad.bundle.signing`; the functions below also take its key objects.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import structlog

from otad.bundle import openssl
from otad.errors import KeyringError

if TYPE_CHECKING:
    from otad.bundle.signing import CryptographyKey

__layer__ = "pure"

log = structlog.get_logger(__name__)

ED25519: Final = openssl.ED25519
P256: Final = openssl.P256
ALGORITHMS: Final = (ED25519, P256)

_SPKI_PREFIXES: Final = {
    ED25519: (openssl.ED25519_SPKI_PREFIX, 44),
    P256: (openssl.P256_SPKI_PREFIX, 91),
}
# P-256 with a compressed point (02/03 || x): accepted and re-encoded uncompressed, the form
# whose hash is the key id everywhere else.
_P256_COMPRESSED_PREFIX: Final = bytes.fromhex(
    "3039301306072a8648ce3d020106082a8648ce3d030107032200"
)
_P256_P: Final = 2**256 - 2**224 + 2**192 + 2**96 - 1
_P256_B: Final = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_ED25519_P: Final = 2**255 - 19
# y of the 8 points of small order (either sign of x): under such a key one signature can
# verify for many messages (the identity point: for every message). OpenSSL and cryptography
# accept them; a keyring must not.
_ED25519_SMALL_ORDER_Y: Final = frozenset(
    {
        0,
        1,
        _ED25519_P - 1,
        0x7A03AC9277FDC74EC6CC392CFA53202A0F67100D760B3CBA4FD84D3D706A17C7,
        0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826,
    }
)
_PEM_BLOCK = re.compile(
    rb"-----BEGIN PUBLIC KEY-----\r?\n([A-Za-z0-9+/=\s]*?)-----END PUBLIC KEY-----"
)


class SignatureBackend(Protocol):
    def accepts(self, algorithm: str, spki: bytes) -> bool: ...

    def verify(self, algorithm: str, spki: bytes, signature: bytes, message: bytes) -> bool: ...


class PublicKey:
    """A verification key: its algorithm and its DER SubjectPublicKeyInfo."""

    __slots__ = ("algorithm", "key_id", "spki")

    def __init__(self, spki: bytes) -> None:
        """Take the DER SubjectPublicKeyInfo; KeyringError unless it is a key otad can use."""
        spki = _uncompressed(bytes(spki))
        algorithm = _algorithm_of_spki(spki)
        if algorithm is None:
            raise KeyringError(
                "bundle: not an Ed25519 or P-256 public key (P-256 must name its curve, as "
                "`openssl pkey -pubout` writes it, not spell out its parameters)"
            )
        if algorithm == ED25519:
            _check_ed25519_point(spki[-32:])
        if not _backend().accepts(algorithm, spki):
            raise KeyringError(f"bundle: the {algorithm} public key is not a valid point")
        self.algorithm: Final = algorithm
        self.spki: Final = spki
        self.key_id: Final = hashlib.sha256(spki).hexdigest()[:16]

    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        """The key in the one ``PUBLIC KEY`` PEM block of ``data`` (text around it is ignored)."""
        if b"PRIVATE KEY-----" in data:  # a signing key must never be shipped to devices
            raise KeyringError("bundle: a private key where only a public key belongs")
        blocks = _PEM_BLOCK.findall(data)
        if len(blocks) != 1:
            raise KeyringError(f"bundle: expected one PUBLIC KEY PEM block, found {len(blocks)}")
        try:
            der = base64.b64decode(b"".join(blocks[0].split()), validate=True)
        except binascii.Error as exc:
            raise KeyringError(f"bundle: PUBLIC KEY PEM block is not base64: {exc}") from exc
        return cls(der)

    def pem(self) -> bytes:
        body = base64.b64encode(self.spki)
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        return b"\n".join([b"-----BEGIN PUBLIC KEY-----", *lines, b"-----END PUBLIC KEY-----", b""])

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` is valid for ``message`` under this key."""
        return _backend().verify(self.algorithm, self.spki, signature, message)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.spki == self.spki

    def __hash__(self) -> int:
        return hash(self.spki)

    def __repr__(self) -> str:
        return f"PublicKey({self.algorithm}, id={self.key_id})"


def as_public_key(key: PublicKey | CryptographyKey) -> PublicKey:
    """``key`` itself, or the public half of a cryptography key object (private or public)."""
    if isinstance(key, PublicKey):
        return key
    from otad.bundle.signing import public_key_of  # the caller already holds cryptography keys

    return public_key_of(key)


def algorithm_of(key: PublicKey | CryptographyKey) -> str:
    """The signature algorithm name a key signs or verifies with."""
    return as_public_key(key).algorithm


def key_id_of(key: PublicKey | CryptographyKey) -> str:
    """First 16 hex digits of SHA-256 over the DER SubjectPublicKeyInfo of the public key."""
    return as_public_key(key).key_id


def public_key_pem(key: PublicKey | CryptographyKey) -> bytes:
    return as_public_key(key).pem()


def load_public_key(source: Path | bytes) -> PublicKey:
    """A verification key from a PEM file (or PEM bytes)."""
    if isinstance(source, bytes):
        data, name = source, "<bytes>"
    else:
        name = str(source)
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise KeyringError(f"bundle: cannot read public key {source}: {exc.strerror}") from exc
    try:
        return PublicKey.from_pem(data)
    except KeyringError as exc:
        detail = exc.message.removeprefix("bundle: ")
        raise KeyringError(f"bundle: cannot load public key {name}: {detail}") from exc


def verify(key: PublicKey | CryptographyKey, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is valid for ``message`` under ``key``."""
    return as_public_key(key).verify(signature, message)


def _uncompressed(spki: bytes) -> bytes:
    """A compressed P-256 SubjectPublicKeyInfo re-encoded uncompressed; anything else as is."""
    if not spki.startswith(_P256_COMPRESSED_PREFIX) or len(spki) != 59:
        return spki
    parity, x = spki[-33], int.from_bytes(spki[-32:], "big")
    if parity not in (2, 3) or x >= _P256_P:
        return spki  # refused below as an unknown encoding
    rhs = (pow(x, 3, _P256_P) - 3 * x + _P256_B) % _P256_P
    y = pow(rhs, (_P256_P + 1) // 4, _P256_P)  # p = 3 (mod 4): the square root, if any
    if y * y % _P256_P != rhs:
        raise KeyringError("bundle: the p256 public key is not a valid point")
    if y & 1 != parity & 1:
        y = _P256_P - y
    return openssl.P256_SPKI_PREFIX + x.to_bytes(32, "big") + y.to_bytes(32, "big")


def _check_ed25519_point(raw: bytes) -> None:
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if y >= _ED25519_P:
        raise KeyringError("bundle: the ed25519 public key is not canonically encoded")
    if y in _ED25519_SMALL_ORDER_Y:
        raise KeyringError(
            "bundle: the ed25519 public key is a point of small order (signatures under it "
            "prove nothing)"
        )


def _algorithm_of_spki(spki: bytes) -> str | None:
    for algorithm, (prefix, size) in _SPKI_PREFIXES.items():
        if spki.startswith(prefix) and len(spki) == size:
            return algorithm
    return None


def _backend() -> SignatureBackend:
    binding = openssl.default()
    return binding if binding is not None else _fallback()


@functools.cache
def _fallback() -> SignatureBackend:
    try:
        from otad.bundle.signing import CryptographyBackend
    except ImportError as exc:
        raise KeyringError(
            "bundle: cannot check signatures: no usable libcrypto (OpenSSL 1.1.1 or later) "
            "and the cryptography package is not installed"
        ) from exc
    log.warning(
        "signature_checks_use_cryptography",
        reason="no usable libcrypto: older than 1.1.1, or it failed its self-test",
        cost="about 9 MiB more resident memory",
    )
    return CryptographyBackend()

"""Signing keys (Ed25519, ECDSA P-256 with SHA-256) and signatures, with the cryptography package.

Only what makes or holds private keys imports this module (``otad bundle keygen|create``, the
cloud, tests), so a device that only verifies never loads cryptography; see
:mod:`otad.bundle.keys` for verification keys and :mod:`otad.bundle.openssl` for why.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from otad.bundle.keys import ED25519, P256, PublicKey
from otad.errors import KeyringError

__layer__ = "pure"

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
CryptographyKey = PrivateKey | ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def generate_private_key(algorithm: str = ED25519) -> PrivateKey:
    """A fresh signing key for ``algorithm`` (``ed25519`` or ``p256``)."""
    if algorithm == ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == P256:
        return ec.generate_private_key(ec.SECP256R1())
    raise KeyringError(f"bundle: unknown key algorithm {algorithm!r} (use ed25519 or p256)")


def public_key_of(key: CryptographyKey) -> PublicKey:
    """The verification key of a cryptography key object (private or public)."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        key = key.public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise KeyringError(f"bundle: unsupported key type {type(key).__name__}")
    if isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(key.curve, ec.SECP256R1):
        raise KeyringError(f"bundle: unsupported curve {key.curve.name} (use P-256)")
    return PublicKey(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def private_key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM; the caller protects the file (mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(source: Path | bytes, password: bytes | None = None) -> PrivateKey:
    """A signing key from a PEM file (or PEM bytes)."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        data = source if isinstance(source, bytes) else source.read_bytes()
    except OSError as exc:
        raise KeyringError(f"bundle: cannot read private key {name}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyringError(f"bundle: cannot load private key {name}: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise KeyringError(f"bundle: {name} is not an Ed25519 or P-256 key")
    public_key_of(key)  # refuses other curves
    return key


def sign(key: PrivateKey, message: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


class CryptographyBackend:
    """Signature checks with cryptography, where :func:`otad.bundle.openssl.default` is None."""

    def accepts(self, algorithm: str, spki: bytes) -> bool:
        return _load(algorithm, spki) is not None

    def verify(self, algorithm: str, spki: bytes, signature: bytes, message: bytes) -> bool:
        key = _load(algorithm, spki)
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, message)
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            else:
                return False
        except InvalidSignature:
            return False
        return True


def _load(
    algorithm: str, spki: bytes
) -> ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | None:
    """The key ``spki`` holds if it is one of ``algorithm`` (P-256 for p256), else None."""
    try:
        key = serialization.load_der_public_key(spki)
    except (ValueError, UnsupportedAlgorithm):
        return None
    if algorithm == ED25519 and isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if (
        algorithm == P256
        and isinstance(key, ec.EllipticCurvePublicKey)
        and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    return None

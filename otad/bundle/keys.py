"""Signing keys: Ed25519 (default) and ECDSA P-256 with SHA-256, and their stable key ids.

A key id is the first 16 hex digits of the SHA-256 of the public key's DER SubjectPublicKeyInfo:
a pure function of the public key, so a signer and a device always agree on it, whatever the
file is called.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from otad.errors import KeyringError

__layer__ = "pure"

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

ED25519: Final = "ed25519"
P256: Final = "p256"
ALGORITHMS: Final = (ED25519, P256)


def generate_private_key(algorithm: str = ED25519) -> PrivateKey:
    """A fresh signing key for ``algorithm`` (``ed25519`` or ``p256``)."""
    if algorithm == ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == P256:
        return ec.generate_private_key(ec.SECP256R1())
    raise KeyringError(f"bundle: unknown key algorithm {algorithm!r} (use ed25519 or p256)")


def algorithm_of(key: PrivateKey | PublicKey) -> str:
    """The signature algorithm name a key signs or verifies with."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return ED25519
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(
        key.curve, ec.SECP256R1
    ):
        return P256
    raise KeyringError(f"bundle: unsupported key type {type(key).__name__}")


def public_key_of(key: PrivateKey | PublicKey) -> PublicKey:
    if isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        return key.public_key()
    return key


def key_id_of(key: PrivateKey | PublicKey) -> str:
    """First 16 hex digits of SHA-256 over the DER SubjectPublicKeyInfo of the public key."""
    der = public_key_of(key).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


def public_key_pem(key: PrivateKey | PublicKey) -> bytes:
    return public_key_of(key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
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
    data = _read(source, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyringError(f"bundle: cannot load private key {_name(source)}: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise KeyringError(f"bundle: {_name(source)} is not an Ed25519 or P-256 key")
    algorithm_of(key)
    return key


def load_public_key(source: Path | bytes) -> PublicKey:
    """A verification key from a PEM file (or PEM bytes)."""
    data = _read(source, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyringError(f"bundle: cannot load public key {_name(source)}: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise KeyringError(f"bundle: {_name(source)} is not an Ed25519 or P-256 key")
    algorithm_of(key)
    return key


def sign(key: PrivateKey, message: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def verify(key: PublicKey, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is valid for ``message`` under ``key``."""
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _read(source: Path | bytes, what: str) -> bytes:
    if isinstance(source, bytes):
        return source
    try:
        return source.read_bytes()
    except OSError as exc:
        raise KeyringError(f"bundle: cannot read {what} {source}: {exc.strerror}") from exc


def _name(source: Path | bytes) -> str:
    return "<bytes>" if isinstance(source, bytes) else str(source)

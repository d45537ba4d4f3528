"""Helpers for the bundle tests: small images, a feeding loop, and a forge for crafted bundles.

The forge builds bundles from their parts with the real encoders (canonical JSON, header,
signature block, real signatures), so a test can state exactly which part is wrong.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import zstandard

from otad.bundle import (
    Keyring,
    Manifest,
    PrivateKey,
    StreamVerifier,
    VerifyPolicy,
    canonical,
    key_id_of,
)
from otad.bundle.header import FORMAT_VERSION, Header
from otad.bundle.keys import algorithm_of
from otad.bundle.preamble import signed_message
from otad.bundle.signatures import SignatureEntry, encode_signatures
from otad.bundle.signing import sign


def make_image(size: int, seed: int = 1) -> bytes:
    """Mixed content: random, repeated and zero blocks, so zstd has something to do."""
    rng = random.Random(seed)
    parts: list[bytes] = []
    total = 0
    block = rng.randbytes(4096)
    while total < size:
        kind = rng.random()
        part = rng.randbytes(4096) if kind < 0.3 else block if kind < 0.7 else bytes(8192)
        parts.append(part)
        total += len(part)
    return b"".join(parts)[:size]


def verify_bytes(
    data: bytes,
    keyring: Keyring,
    policy: VerifyPolicy | None = None,
    *,
    chunk: int = 1 << 20,
    threaded: bool = True,
    zstd_fallback: bool = False,
) -> tuple[Manifest, bytes]:
    """Feed ``data`` in ``chunk``-sized pieces; returns the manifest and the image produced."""
    verifier = StreamVerifier(keyring, policy, threaded=threaded, zstd_fallback=zstd_fallback)
    out: list[bytes] = []
    for start in range(0, len(data), chunk):
        out.extend(bytes(part) for part in verifier.feed(data[start : start + chunk]))
    return verifier.finish(), b"".join(out)


@dataclass
class Forged:
    """Parts of a bundle; ``bytes()`` assembles them (after any test surgery)."""

    header: Header
    manifest: bytes
    signatures: bytes
    payload: bytes

    def __bytes__(self) -> bytes:
        return self.header.pack() + self.manifest + self.signatures + self.payload


@dataclass
class Forge:
    """Build bundles part by part with real encoders and real signatures."""

    created: datetime = field(default_factory=lambda: datetime(2026, 1, 1, tzinfo=UTC))

    def manifest_for(
        self,
        payload: bytes,
        image: bytes,
        keys: Iterable[PrivateKey],
        compression: str = "zstd",
        **overrides: Any,
    ) -> dict[str, Any]:
        document: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "compatible": "test-board",
            "version": "1.0",
            "security_version": 0,
            "created": "2026-01-01T00:00:00Z",
            "size": len(payload),
            "compression": compression,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "image_size": len(image),
            "image_sha256": hashlib.sha256(image).hexdigest(),
            "key_ids": [key_id_of(k) for k in keys],
        }
        document.update(overrides)
        return {k: v for k, v in document.items() if v is not None}

    def bundle(
        self,
        image: bytes,
        keys: list[PrivateKey],
        *,
        compression: str = "zstd",
        payload: bytes | None = None,
        manifest: dict[str, Any] | None = None,
        manifest_bytes: bytes | None = None,
        sign_message: Callable[[bytes, Header, bytes], bytes] | None = None,
        declared_payload_size: int | None = None,
        **overrides: Any,
    ) -> Forged:
        if payload is None:
            payload = (
                zstandard.ZstdCompressor(level=3).compress(image)
                if compression == "zstd"
                else image
            )
        if manifest_bytes is None:
            if manifest is None:
                manifest = self.manifest_for(payload, image, keys, compression, **overrides)
            manifest_bytes = canonical.encode(manifest)
        payload_size = len(payload) if declared_payload_size is None else declared_payload_size
        header = Header(FORMAT_VERSION, 0, len(manifest_bytes), 0, payload_size)
        message = signed_message(header, manifest_bytes)
        if sign_message is not None:
            message = sign_message(message, header, manifest_bytes)
        entries = [SignatureEntry(key_id_of(k), algorithm_of(k), sign(k, message)) for k in keys]
        block = encode_signatures(entries)
        header = Header(FORMAT_VERSION, 0, len(manifest_bytes), len(block), payload_size)
        return Forged(header, manifest_bytes, block, payload)

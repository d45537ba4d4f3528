"""The signed preamble (header, manifest, signature block) and its verification.

:func:`parse_preamble` decodes without verifying, for ``otad bundle inspect`` and for learning the
sizes early; :func:`verify_preamble` is the one place a preamble is trusted: signature first, then
the manifest, then the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from otad.bundle.header import HEADER_SIZE, SIGNING_CONTEXT, Header, parse_header
from otad.bundle.keyring import Keyring
from otad.bundle.keys import ALGORITHMS
from otad.bundle.manifest import Manifest
from otad.bundle.policy import VerifyPolicy
from otad.bundle.signatures import SignatureEntry, decode_signatures
from otad.errors import (
    AlgorithmNotAllowed,
    BadSignature,
    BundleError,
    MalformedManifest,
    RevokedKey,
    Truncated,
    UnknownKey,
)

__layer__ = "pure"

# When no signature verifies, the error reported is the most alarming one found.
_SEVERITY: tuple[type[BundleError], ...] = (
    BadSignature,
    RevokedKey,
    AlgorithmNotAllowed,
    UnknownKey,
)


@dataclass(frozen=True, slots=True)
class Preamble:
    header: Header
    manifest_bytes: bytes
    signatures: list[SignatureEntry]

    def signed_message(self) -> bytes:
        return signed_message(self.header, self.manifest_bytes)

    def manifest(self) -> Manifest:
        """The manifest, decoded and validated but NOT authenticated."""
        return Manifest.parse(self.manifest_bytes)


def signed_message(header: Header, manifest_bytes: bytes) -> bytes:
    """What every signature covers: a context string, the header's fixed fields, the manifest."""
    return SIGNING_CONTEXT + header.signed_fields() + manifest_bytes


def parse_preamble(data: bytes | bytearray | memoryview) -> Preamble:
    """Split the first bytes of a bundle into its preamble parts (no signature check)."""
    header = parse_header(data)
    if len(data) < header.preamble_size:
        raise Truncated(
            f"bundle: preamble needs {header.preamble_size} bytes, got {len(data)}",
            size=len(data),
        )
    view = memoryview(data)
    manifest_end = HEADER_SIZE + header.manifest_size
    return Preamble(
        header=header,
        manifest_bytes=bytes(view[HEADER_SIZE:manifest_end]),
        signatures=decode_signatures(view[manifest_end : header.preamble_size]),
    )


def read_preamble(stream: BinaryIO) -> Preamble:
    """Read and split the preamble from the start of a binary stream (no signature check)."""
    head = stream.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE:
        raise Truncated(f"bundle: stream ends after {len(head)} bytes, inside the header")
    header = parse_header(head)
    rest = stream.read(header.preamble_size - HEADER_SIZE)
    return parse_preamble(head + rest)


def verify_preamble(
    preamble: Preamble, keyring: Keyring, policy: VerifyPolicy
) -> tuple[Manifest, str]:
    """Authenticate a preamble and apply the policy; returns the manifest and the signer's id."""
    signer = _verify_signatures(preamble, keyring, policy)
    manifest = preamble.manifest()
    if manifest.size != preamble.header.payload_size:
        raise MalformedManifest(
            f"bundle: manifest size {manifest.size} differs from the header's payload length "
            f"{preamble.header.payload_size}"
        )
    if signer not in manifest.key_ids:
        raise BadSignature(f"bundle: signing key {signer} is not among the manifest's key_ids")
    policy.check(manifest)
    return manifest, signer


def _verify_signatures(preamble: Preamble, keyring: Keyring, policy: VerifyPolicy) -> str:
    message = preamble.signed_message()
    failures: list[BundleError] = []
    for entry in preamble.signatures:
        if entry.algorithm not in ALGORITHMS or entry.algorithm not in policy.algorithms:
            failures.append(
                AlgorithmNotAllowed(
                    f"bundle: signature algorithm {entry.algorithm!r} is not allowed "
                    f"(allowed: {', '.join(sorted(policy.algorithms))})",
                    algorithm=entry.algorithm,
                )
            )
            continue
        try:
            key = keyring.lookup(entry.key_id)
        except (RevokedKey, UnknownKey) as exc:
            failures.append(exc)
            continue
        if key.algorithm != entry.algorithm:
            failures.append(
                BadSignature(
                    f"bundle: key {entry.key_id} is {key.algorithm}, the signature claims "
                    f"{entry.algorithm}"
                )
            )
            continue
        if not key.verify(entry.signature, message):
            failures.append(
                BadSignature(f"bundle: signature by key {entry.key_id} does not verify")
            )
            continue
        return entry.key_id
    for kind in _SEVERITY:
        for failure in failures:
            if isinstance(failure, kind):
                raise failure
    raise BadSignature("bundle: no signature")  # unreachable: decode demands at least one

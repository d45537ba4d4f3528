"""The signature block: one or more (key id, algorithm, signature bytes) entries.

Layout, all integers big-endian::

    u16 count                      1..16
    count times:
      u8  key_id_length            1..64, then the key id (ASCII)
      u8  algorithm_length         1..32, then the algorithm name (ASCII)
      u16 signature_length         1..1024, then the signature bytes

The block must parse to exactly the length the header declares; that is what binds the one header
length no signature can cover (see :meth:`otad.bundle.header.Header.signed_fields`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from otad.errors import BadSignature

__layer__ = "pure"

MAX_SIGNATURES: Final = 16
_MAX_KEY_ID: Final = 64
_MAX_ALGORITHM: Final = 32
_MAX_SIGNATURE: Final = 1024


@dataclass(frozen=True, slots=True)
class SignatureEntry:
    key_id: str
    algorithm: str
    signature: bytes


def encode_signatures(entries: list[SignatureEntry]) -> bytes:
    if not 1 <= len(entries) <= MAX_SIGNATURES:
        raise ValueError(f"a bundle carries 1..{MAX_SIGNATURES} signatures")
    out = bytearray(struct.pack(">H", len(entries)))
    for entry in entries:
        key_id = entry.key_id.encode("ascii")
        algorithm = entry.algorithm.encode("ascii")
        if not 0 < len(key_id) <= _MAX_KEY_ID or not 0 < len(algorithm) <= _MAX_ALGORITHM:
            raise ValueError("signature key id or algorithm name too long")
        if not 0 < len(entry.signature) <= _MAX_SIGNATURE:
            raise ValueError("signature too long")
        out += bytes([len(key_id)]) + key_id
        out += bytes([len(algorithm)]) + algorithm
        out += struct.pack(">H", len(entry.signature)) + entry.signature
    return bytes(out)


def decode_signatures(data: bytes | bytearray | memoryview) -> list[SignatureEntry]:
    """Parse a signature block; any structural problem is :class:`BadSignature`."""
    view = memoryview(data)
    pos = 0

    def take(n: int) -> memoryview:
        nonlocal pos
        if pos + n > len(view):
            raise BadSignature("bundle: signature block ends inside an entry")
        part = view[pos : pos + n]
        pos += n
        return part

    (count,) = struct.unpack(">H", take(2))
    if not 1 <= count <= MAX_SIGNATURES:
        raise BadSignature(f"bundle: signature count {count} outside 1..{MAX_SIGNATURES}")
    entries = []
    for _ in range(count):
        key_id = _ascii(take(take(1)[0]), _MAX_KEY_ID, "key id")
        algorithm = _ascii(take(take(1)[0]), _MAX_ALGORITHM, "algorithm")
        (length,) = struct.unpack(">H", take(2))
        if not 0 < length <= _MAX_SIGNATURE:
            raise BadSignature(f"bundle: signature length {length} outside 1..{_MAX_SIGNATURE}")
        entries.append(SignatureEntry(key_id, algorithm, bytes(take(length))))
    if pos != len(view):
        raise BadSignature(
            f"bundle: signature block has {len(view) - pos} bytes after its last entry"
        )
    return entries


def _ascii(raw: memoryview, limit: int, what: str) -> str:
    if not 0 < len(raw) <= limit:
        raise BadSignature(f"bundle: signature {what} length {len(raw)} outside 1..{limit}")
    text = bytes(raw)
    if not all(0x21 <= b <= 0x7E for b in text):
        raise BadSignature(f"bundle: signature {what} is not printable ASCII")
    return text.decode("ascii")

"""The fixed 40-byte bundle header: magic, format version, flags and three u64 lengths.

All integers are big-endian. The header is parsed before anything else, so it is the only part of
a bundle read before its size is known; the limits below keep the signed preamble small enough to
buffer whatever the payload size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from otad.errors import MalformedHeader, UnsupportedFormat

__layer__ = "pure"

# PNG-style magic: the CR LF / ^Z / LF bytes detect text-mode and line-ending mangling.
MAGIC: Final = b"OTAB\r\n\x1a\n"
FORMAT_VERSION: Final = 1
HEADER_SIZE: Final = 40
_LAYOUT: Final = struct.Struct(">8sIIQQQ")

# Bounds on the parts buffered in memory before any verification happened.
MAX_MANIFEST_SIZE: Final = 1 << 20
MAX_SIGNATURES_SIZE: Final = 64 << 10
MAX_U64: Final = (1 << 64) - 1

# Domain separation: a signature over a bundle can never be replayed as a signature over
# anything else signed with the same key.
SIGNING_CONTEXT: Final = b"otad-bundle-signature-v1\x00"


@dataclass(frozen=True, slots=True)
class Header:
    """The decoded fixed header."""

    format_version: int
    flags: int
    manifest_size: int
    signatures_size: int
    payload_size: int

    @property
    def preamble_size(self) -> int:
        """Bytes before the payload: header, manifest and signature block."""
        return HEADER_SIZE + self.manifest_size + self.signatures_size

    @property
    def total_size(self) -> int:
        """The whole bundle in bytes."""
        return self.preamble_size + self.payload_size

    def pack(self) -> bytes:
        return _LAYOUT.pack(
            MAGIC,
            self.format_version,
            self.flags,
            self.manifest_size,
            self.signatures_size,
            self.payload_size,
        )

    def signed_fields(self) -> bytes:
        """The header bytes every signature covers.

        Everything except ``signatures_size``, which a signature cannot cover because it depends
        on the signatures themselves; it is bound structurally instead: the signature block must
        parse to exactly that many bytes.
        """
        packed = self.pack()
        return packed[:24] + packed[32:40]


def parse_header(data: bytes | bytearray | memoryview) -> Header:
    """Decode the first :data:`HEADER_SIZE` bytes of a bundle.

    Raises :class:`MalformedHeader` for a wrong magic or impossible lengths and
    :class:`UnsupportedFormat` for a format version or flags this reader does not know.
    """
    if len(data) < HEADER_SIZE:
        raise MalformedHeader(
            f"bundle: header needs {HEADER_SIZE} bytes, got {len(data)}", size=len(data)
        )
    magic, version, flags, manifest_size, signatures_size, payload_size = _LAYOUT.unpack_from(data)
    if magic != MAGIC:
        raise MalformedHeader("bundle: not an otad bundle (bad magic)")
    if version != FORMAT_VERSION:
        raise UnsupportedFormat(
            f"bundle: format version {version} is not supported (this reader knows "
            f"{FORMAT_VERSION})",
            format_version=version,
        )
    if flags != 0:
        raise UnsupportedFormat(f"bundle: unknown header flags {flags:#x}", flags=flags)
    if not 2 <= manifest_size <= MAX_MANIFEST_SIZE:
        raise MalformedHeader(
            f"bundle: manifest length {manifest_size} outside 2..{MAX_MANIFEST_SIZE}"
        )
    if not 2 <= signatures_size <= MAX_SIGNATURES_SIZE:
        raise MalformedHeader(
            f"bundle: signature block length {signatures_size} outside 2..{MAX_SIGNATURES_SIZE}"
        )
    header = Header(version, flags, manifest_size, signatures_size, payload_size)
    if header.total_size > MAX_U64:
        raise MalformedHeader("bundle: total size does not fit in 64 bits")
    return header

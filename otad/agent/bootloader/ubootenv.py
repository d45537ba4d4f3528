"""The U-Boot environment codec (pure).

One copy of ``size`` bytes, as U-Boot, ``mkenvimage`` and libubootenv's ``fw_setenv`` store it::

    single:     crc32 (4 bytes, little endian) | data (size - 4)
    redundant:  crc32 (4 bytes, little endian) | flags (1 byte) | data (size - 5)

``data`` is ``name=value\\0`` entries, one empty entry (so ``\\0\\0``) after the last, then
padding; the CRC covers the whole data area including the padding. With two redundant copies
the one with the "newer" flags byte is current: the flags count up by one per write and wrap
(0xff -> 0x00), and a copy whose CRC does not match is ignored (U-Boot's ``env_import_redund``
and libubootenv apply the same rule, :func:`newer`).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from otad.errors import BootloaderEnvCorrupt, BootloaderError

__layer__ = "pure"

HEADER_SINGLE = 4
HEADER_REDUNDANT = 5
#: Padding after the entries: 0xff like mkenvimage and erased flash (U-Boot itself pads with
#: 0x00; readers do not care, the CRC covers whatever is there).
PAD = b"\xff"


@dataclass(frozen=True)
class UBootEnv:
    values: Mapping[str, str]
    flags: int | None = None  # redundant copies only


def _header(redundant: bool) -> int:
    return HEADER_REDUNDANT if redundant else HEADER_SINGLE


def encode(
    values: Mapping[str, str], size: int, *, redundant: bool = False, flags: int = 0
) -> bytes:
    """One copy of exactly ``size`` bytes (entries sorted by name, as U-Boot stores them)."""
    header = _header(redundant)
    if size <= header + 2:
        raise BootloaderError(f"u-boot env: size {size} is too small")
    if not 0 <= flags <= 0xFF:
        raise BootloaderError(f"u-boot env: flags {flags} out of range")
    body = bytearray()
    for name in sorted(values):
        value = values[name]
        if not name or any(c in name for c in "=\0") or "\0" in value:
            raise BootloaderError(f"u-boot env: invalid variable {name!r}")
        body += f"{name}={value}".encode("utf-8", "surrogateescape") + b"\0"
    body += b"\0"
    room = size - header
    if len(body) > room:
        raise BootloaderError(f"u-boot env: {len(body)} bytes of variables do not fit {room}")
    data = bytes(body) + PAD * (room - len(body))
    crc = struct.pack("<I", zlib.crc32(data))
    return crc + (bytes([flags]) if redundant else b"") + data


def decode(blob: bytes, *, redundant: bool = False) -> UBootEnv:
    """Parse one copy; BootloaderEnvCorrupt when the CRC or the entries are wrong."""
    header = _header(redundant)
    if len(blob) <= header + 1:
        raise BootloaderEnvCorrupt(f"u-boot env: {len(blob)} bytes is too short for an env")
    (crc,) = struct.unpack_from("<I", blob)
    data = blob[header:]
    actual = zlib.crc32(data)
    if crc != actual:
        raise BootloaderEnvCorrupt(f"u-boot env: bad CRC (stored {crc:08x}, computed {actual:08x})")
    values: dict[str, str] = {}
    pos = 0
    while True:
        nul = data.find(b"\0", pos)
        if nul < 0:
            raise BootloaderEnvCorrupt("u-boot env: data not terminated by an empty entry")
        if nul == pos:
            break
        entry = data[pos:nul]
        name, eq, value = entry.partition(b"=")
        if not eq or not name:
            raise BootloaderEnvCorrupt(f"u-boot env: entry without a name: {entry[:40]!r}")
        values[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = nul + 1
    return UBootEnv(values, blob[4] if redundant else None)


def newer(flags0: int, flags1: int) -> int:
    """Which of two valid redundant copies is current (0 or 1), U-Boot's rule."""
    if flags0 == flags1:
        return 0
    if flags0 == 0xFF and flags1 == 0:
        return 1
    if flags1 == 0xFF and flags0 == 0:
        return 0
    return 0 if flags0 > flags1 else 1


def next_flags(flags: int) -> int:
    return (flags + 1) & 0xFF

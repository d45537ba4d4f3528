"""The GRUB environment block codec (pure).

Format (GRUB's ``lib/envblk.c``, also what ``grub-editenv`` writes)::

    # GRUB Environment Block\\n      the signature, 25 bytes
    NAME=VALUE\\n                    one variable per line
    ...
    ######...                       '#' padding to the block size (1024 bytes)

In a value, ``\\`` and newline are escaped by a preceding backslash (a newline in a value is
stored as backslash + newline). A line starting with ``#`` is a comment. The reader here follows
GRUB's own iteration exactly, so userspace and GRUB agree on what a block says - including
blocks that are damaged: GRUB stops at the first line without ``=`` or an unterminated value, and
so does :func:`decode` (it reports that with ``GrubEnv.truncated``); later duplicates of a name
win, as they do when GRUB's ``load_env`` sets them one after the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from otad.errors import BootloaderEnvCorrupt, BootloaderError

__layer__ = "pure"

SIGNATURE = b"# GRUB Environment Block\n"
BLOCK_SIZE = 1024


@dataclass(frozen=True)
class GrubEnv:
    """A decoded block: the variables in file order (last duplicate wins in ``values``)."""

    values: Mapping[str, str] = field(default_factory=dict)
    names: tuple[str, ...] = ()
    truncated: bool = False  # GRUB stopped early at a damaged line


def _text(raw: bytes) -> str:
    # surrogateescape: any byte sequence round-trips, GRUB treats values as bytes
    return raw.decode("utf-8", "surrogateescape")


def decode(data: bytes) -> GrubEnv:
    """Parse a block like GRUB does; BootloaderEnvCorrupt when the signature is missing."""
    if len(data) <= len(SIGNATURE) - 1 or not data.startswith(SIGNATURE):
        raise BootloaderEnvCorrupt("grubenv: no '# GRUB Environment Block' signature")
    values: dict[str, str] = {}
    names: list[str] = []
    p, end = len(SIGNATURE), len(data)
    truncated = False
    while p < end:
        if data[p] != 0x23:  # '#'
            eq = data.find(b"=", p)
            if eq < 0:
                truncated = True
                break
            q = eq + 1
            out = bytearray()
            while q < end and data[q] != 0x0A:
                if data[q] == 0x5C:  # backslash: the next byte is literal
                    if q + 1 >= end:
                        q = end
                        break
                    out.append(data[q + 1])
                    q += 2
                else:
                    out.append(data[q])
                    q += 1
            if q >= end:
                truncated = True
                break
            name = _text(data[p:eq])
            values[name] = _text(bytes(out))
            names.append(name)
            p = q
        p = _next_line(data, p, end)
    return GrubEnv(values, tuple(names), truncated)


def _next_line(data: bytes, p: int, end: int) -> int:
    while p < end:
        if data[p] == 0x5C:
            p += 2
        elif data[p] == 0x0A:
            break
        else:
            p += 1
    return p + 1


def check_name(name: str) -> None:
    """A name GRUB can store and find again; BootloaderError otherwise."""
    if not name or name[0] == "#" or any(c in name for c in "=\n\\\0"):
        raise BootloaderError(f"grubenv: invalid variable name {name!r}")


def encode(values: Mapping[str, str], *, size: int = BLOCK_SIZE) -> bytes:
    """A block of ``size`` bytes holding ``values`` in the given order."""
    body = bytearray(SIGNATURE)
    for name, value in values.items():
        check_name(name)
        if "\0" in value:
            raise BootloaderError(f"grubenv: value of {name} contains a NUL byte")
        raw = value.encode("utf-8", "surrogateescape")
        body += name.encode("utf-8", "surrogateescape") + b"="
        body += raw.replace(b"\\", b"\\\\").replace(b"\n", b"\\\n") + b"\n"
    if len(body) > size:
        raise BootloaderError(
            f"grubenv: {len(body)} bytes of variables do not fit a {size}-byte block"
        )
    return bytes(body) + b"#" * (size - len(body))

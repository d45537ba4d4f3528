"""HTTP byte ranges and conditional-request validators, as the store's download applies them.

Pure (RFC 9110 header parsing only) so every odd header can be tested without a server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from otad.errors import RangeNotSatisfiable

__layer__ = "pure"


@dataclass(frozen=True)
class ByteRange:
    """A satisfiable byte range: ``start`` inclusive, ``stop`` exclusive."""

    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.stop - 1}/{size}"


_RANGE_SPEC = re.compile(r"^([0-9]*)-([0-9]*)$")


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range a ``Range`` header asks of a ``size``-byte entity.

    ``None`` means "send the whole entity with 200": no header, another unit, a syntax error
    (RFC 9110 says to ignore those) or several ranges (allowed; a resuming downloader asks for
    one). Raises :class:`RangeNotSatisfiable` when the one range lies outside the entity.
    """
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 1:
        return None
    match = _RANGE_SPEC.match(parts[0])
    if match is None:
        return None
    first, last = match.groups()
    if first:
        start = int(first)
        if last:
            end = int(last)
            if end < start:
                return None  # syntactically invalid: ignore
            stop = min(end + 1, size)
        else:
            stop = size
        if start >= size:
            raise RangeNotSatisfiable(f"store: range starts at {start}, entity has {size} bytes")
        return ByteRange(start, stop)
    if not last:
        return None  # "bytes=-"
    suffix = int(last)
    if suffix == 0 or size == 0:
        raise RangeNotSatisfiable(f"store: empty suffix range of a {size}-byte entity")
    return ByteRange(max(0, size - suffix), size)


def none_match(header: str | None, etag: str) -> bool:
    """RFC 9110 If-None-Match (weak comparison): does the client already hold ``etag``?"""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return etag in tags


def if_range_holds(header: str | None, etag: str, last_modified: str) -> bool:
    """RFC 9110 If-Range: honour Range only if the validator still names this entity."""
    if header is None:
        return True
    value = header.strip()
    if value.startswith('"'):
        return value == etag  # strong comparison
    if value.startswith("W/"):
        return False  # weak tags never match If-Range
    return value == last_modified

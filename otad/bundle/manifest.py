"""The signed manifest: what a bundle is, for which hardware, and the hashes of its contents.

The manifest is a canonical JSON object (see :mod:`otad.bundle.canonical`). Known fields are
validated strictly: a missing or mistyped field is an error, never a default, because a missing
hash or size would otherwise turn a check into a pass. Fields this version does not know are kept
in :attr:`Manifest.extra`, travel inside the signed bytes, and come back out of :meth:`to_dict`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from otad.bundle import canonical
from otad.bundle.header import FORMAT_VERSION, MAX_U64
from otad.errors import MalformedManifest, UnsupportedFormat

__layer__ = "pure"

COMPRESSIONS: Final = ("zstd", "none")
KNOWN_FIELDS: Final = frozenset(
    {
        "format_version",
        "compatible",
        "version",
        "security_version",
        "created",
        "size",
        "compression",
        "sha256",
        "image_size",
        "image_sha256",
        "expires",
        "device",
        "key_ids",
    }
)
_OPTIONAL: Final = frozenset({"expires", "device"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_TIMESTAMP_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
_MAX_TEXT: Final = 255


def format_timestamp(moment: datetime) -> str:
    """The one text form of a time in a manifest: UTC, whole seconds, ``Z`` suffix."""
    if moment.tzinfo is None:
        raise ValueError("manifest times must be timezone-aware")
    return moment.astimezone(UTC).strftime(_TIMESTAMP_FORMAT)


def parse_timestamp(text: str, name: str) -> datetime:
    if not _TIMESTAMP.fullmatch(text):
        raise MalformedManifest(f"bundle: manifest {name} {text!r} is not YYYY-MM-DDTHH:MM:SSZ")
    try:
        return datetime.strptime(text, _TIMESTAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError as exc:
        raise MalformedManifest(f"bundle: manifest {name} {text!r} is not a date") from exc


@dataclass(frozen=True, slots=True)
class Manifest:
    """A validated manifest. Build one with :meth:`from_dict` or :meth:`parse`."""

    compatible: str
    version: str
    security_version: int
    created: datetime
    size: int
    compression: str
    sha256: str
    image_size: int
    image_sha256: str
    key_ids: tuple[str, ...]
    expires: datetime | None = None
    device: str | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Manifest:
        """Decode and validate canonical manifest bytes."""
        return cls.from_dict(canonical.decode(data))

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> Manifest:
        missing = sorted((KNOWN_FIELDS - _OPTIONAL) - document.keys())
        if missing:
            raise MalformedManifest(f"bundle: manifest lacks {', '.join(missing)}")
        format_version = _integer(document, "format_version")
        if format_version != FORMAT_VERSION:
            raise UnsupportedFormat(
                f"bundle: manifest format_version {format_version} is not supported",
                format_version=format_version,
            )
        compression = _text(document, "compression")
        if compression not in COMPRESSIONS:
            raise UnsupportedFormat(f"bundle: compression {compression!r} is not supported")
        size = _integer(document, "size")
        image_size = _integer(document, "image_size")
        sha256 = _digest(document, "sha256")
        image_sha256 = _digest(document, "image_sha256")
        if compression == "none" and (size != image_size or sha256 != image_sha256):
            raise MalformedManifest(
                "bundle: an uncompressed payload must have size == image_size and "
                "sha256 == image_sha256"
            )
        key_ids = document["key_ids"]
        if (
            not isinstance(key_ids, list)
            or not key_ids
            or not all(isinstance(k, str) and _KEY_ID.fullmatch(k) for k in key_ids)
            or len(set(key_ids)) != len(key_ids)
        ):
            raise MalformedManifest(
                "bundle: manifest key_ids must be a non-empty list of distinct 16-hex key ids"
            )
        expires = document.get("expires")
        device = document.get("device")
        return cls(
            format_version=format_version,
            compatible=_text(document, "compatible"),
            version=_text(document, "version"),
            security_version=_integer(document, "security_version"),
            created=parse_timestamp(_text(document, "created"), "created"),
            size=size,
            compression=compression,
            sha256=sha256,
            image_size=image_size,
            image_sha256=image_sha256,
            key_ids=tuple(key_ids),
            expires=None
            if expires is None
            else parse_timestamp(_text(document, "expires"), "expires"),
            device=None if device is None else _text(document, "device"),
            extra={k: v for k, v in document.items() if k not in KNOWN_FIELDS},
        )

    def to_dict(self) -> dict[str, Any]:
        """Every field, known and unknown, as it is (or will be) signed."""
        document: dict[str, Any] = dict(self.extra)
        document.update(
            format_version=self.format_version,
            compatible=self.compatible,
            version=self.version,
            security_version=self.security_version,
            created=format_timestamp(self.created),
            size=self.size,
            compression=self.compression,
            sha256=self.sha256,
            image_size=self.image_size,
            image_sha256=self.image_sha256,
            key_ids=list(self.key_ids),
        )
        if self.expires is not None:
            document["expires"] = format_timestamp(self.expires)
        if self.device is not None:
            document["device"] = self.device
        return document

    def encode(self) -> bytes:
        """The canonical bytes that get signed (validated by parsing them back)."""
        data = canonical.encode(self.to_dict())
        Manifest.parse(data)
        return data


def _integer(document: dict[str, Any], name: str) -> int:
    value = document[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_U64:
        raise MalformedManifest(f"bundle: manifest {name} must be an integer in 0..2^64-1")
    return value


def _text(document: dict[str, Any], name: str) -> str:
    value = document[name]
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_TEXT or not value.isprintable():
        raise MalformedManifest(
            f"bundle: manifest {name} must be a printable string of 1..{_MAX_TEXT} characters"
        )
    return value


def _digest(document: dict[str, Any], name: str) -> str:
    value = document[name]
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise MalformedManifest(f"bundle: manifest {name} must be 64 lowercase hex digits")
    return value

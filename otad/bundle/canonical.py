"""Canonical JSON: the one byte encoding of a manifest that is signed.

Rules: UTF-8, object keys sorted by code point, no insignificant whitespace (``,`` and ``:``
separators), strings escaped the way Python's ``json`` does with ``ensure_ascii=False``, integers
only (no floats: their text form is not unique), no duplicate keys. A decoder accepts a document
only if re-encoding it gives back the very same bytes, so there is exactly one valid encoding and
a signed manifest cannot be re-serialised into a different, equally valid byte string.
"""

from __future__ import annotations

import json
from typing import Any

from otad.errors import MalformedManifest

__layer__ = "pure"

# Integers beyond this are refused: JSON readers in other languages lose precision past 2^64.
_MAX_INT = (1 << 64) - 1


def encode(document: dict[str, Any]) -> bytes:
    """The canonical bytes of ``document`` (raises MalformedManifest for floats or bad values)."""
    _check_value(document)
    text = json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate has no UTF-8 form
        raise MalformedManifest(f"bundle: manifest text is not valid Unicode: {exc}") from exc


def decode(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse canonical JSON bytes into a dict; anything non-canonical is MalformedManifest."""
    raw = bytes(data)
    try:
        text = raw.decode("utf-8")
        document = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_float=_no_float,
            parse_constant=_no_float,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedManifest(f"bundle: manifest is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise MalformedManifest("bundle: manifest is not a JSON object")
    if encode(document) != raw:
        raise MalformedManifest("bundle: manifest is not in canonical form")
    return document


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_float(text: str) -> Any:
    raise ValueError(f"non-integer number {text!r} is not allowed")


def _check_value(value: Any, depth: int = 0) -> None:
    if depth > 32:
        raise MalformedManifest("bundle: manifest nests deeper than 32 levels")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if not -_MAX_INT <= value <= _MAX_INT:
            raise MalformedManifest(f"bundle: manifest integer {value} out of 64-bit range")
        return
    if isinstance(value, list):
        for item in value:
            _check_value(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise MalformedManifest("bundle: manifest object keys must be strings")
            _check_value(item, depth + 1)
        return
    raise MalformedManifest(
        f"bundle: manifest value of type {type(value).__name__} is not allowed (integers, "
        "strings, booleans, null, lists and objects only)"
    )

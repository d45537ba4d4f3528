"""Device shadow documents with AWS IoT Device Shadow semantics (pure: no I/O).

Both sides use this module: the replica applies requests to stored documents, the agent reads
deltas and builds reported updates, operator tools parse responses.

The rules, the same as AWS IoT's classic shadow so an agent works against either:

* A document is ``{"state": {"desired": {..}, "reported": {..}}, "metadata": {..},
  "version": N, "timestamp": T}``; a section with no keys is left out.
* An update is a partial merge: objects merge key by key, ``null`` deletes a key (``"desired":
  null`` deletes the whole section), arrays and scalars are replaced whole. An object left without
  keys by deletions is removed, so ``{}`` never lingers in a document.
* Every accepted update raises ``version`` by exactly one (the first one creates version 1). An
  update that names ``version`` is applied only if it equals the current version, else 409.
* The delta holds every desired key whose value differs from reported (absent included),
  recursing into objects; keys only in reported are left out. ``true`` differs from ``1``;
  ``1`` equals ``1.0``.
* Metadata mirrors the state: each leaf (scalar or array) set by an update gets
  ``{"timestamp": T}`` (seconds since the epoch).
* Limits: 8 KiB of compact JSON for desired + reported together (413), 64 bytes of
  ``clientToken`` (400), 8 levels of nesting inside desired/reported (400), and 16 KiB for a
  request payload (413, checked before parsing). Payloads must be UTF-8 (415).

Errors are :class:`otad.errors.ShadowError` subclasses whose ``status`` is the wire code of the
``rejected`` document; the request's ``clientToken``, when it was readable, is in
``error.details["client_token"]`` so the rejection can echo it.
"""

from __future__ import annotations

import _json
import functools
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple, TypeAlias, cast

from otad.errors import (
    ShadowBadRequest,
    ShadowError,
    ShadowForbidden,
    ShadowInternal,
    ShadowNotFound,
    ShadowThrottled,
    ShadowTooLarge,
    ShadowUnauthorized,
    ShadowUnsupportedEncoding,
    ShadowVersionConflict,
)

__layer__ = "pure"

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
JsonObject: TypeAlias = "dict[str, JsonValue]"

MAX_STATE_BYTES: Final = 8 * 1024
MAX_CLIENT_TOKEN_BYTES: Final = 64
MAX_DEPTH: Final = 8
MAX_REQUEST_BYTES: Final = 16 * 1024
MAX_RESPONSE_BYTES: Final = 256 * 1024
DEFAULT_TEMPLATE: Final = "state/{device_id}"
AWS_TEMPLATE: Final = "$aws/things/{device_id}/shadow"

# Device ids become one topic level: no MQTT wildcards, separators or control characters.
# This is AWS's thing-name alphabet plus '.'.
_DEVICE_ID = re.compile(r"[A-Za-z0-9:_.\-]{1,128}")

# "fleet_update": an update on the fleet side's own topic (<prefix>/fleet/update), the only one
# that may change ``desired``: the broker lets devices write their update topic, not this one
RequestKind = Literal["update", "get", "fleet_update"]

_UPDATE_FIELDS: Final = frozenset({"state", "version", "clientToken"})
_GET_FIELDS: Final = frozenset({"clientToken"})
_STATE_FIELDS: Final = frozenset({"desired", "reported"})


# --- topics ------------------------------------------------------------------------------------


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if it can be one topic level, else raise ShadowBadRequest."""
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise ShadowBadRequest(
            f"shadow: invalid device id {device_id!r} (1-128 of A-Z a-z 0-9 : _ . -)"
        )
    return device_id


@functools.lru_cache(maxsize=64)
def check_template(template: str) -> str:
    """Return ``template`` if it names ``{device_id}`` as one whole topic level."""
    levels = template.split("/")
    if levels.count("{device_id}") != 1 or template.count("{") != 1 or template.count("}") != 1:
        raise ShadowBadRequest(
            f"shadow: topic template {template!r} must contain {{device_id}} once, "
            "as a whole topic level"
        )
    if any(ch in template for ch in "+#\0") or any(level == "" for level in levels):
        raise ShadowBadRequest(
            f"shadow: topic template {template!r} must not contain wildcards or empty levels"
        )
    return template


@dataclass(frozen=True)
class Topics:
    """The shadow topics of one device under a prefix template.

    ``Topics("dev1").update == "state/dev1/update"``;
    ``Topics("dev1", AWS_TEMPLATE).update == "$aws/things/dev1/shadow/update"``.
    """

    device_id: str
    template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        check_device_id(self.device_id)
        check_template(self.template)

    @property
    def prefix(self) -> str:
        return self.template.replace("{device_id}", self.device_id)

    @property
    def update(self) -> str:
        return f"{self.prefix}/update"

    @property
    def fleet_update(self) -> str:
        """Where the fleet side (rollouts, operators) sends updates; devices cannot write it."""
        return f"{self.prefix}/fleet/update"

    @property
    def update_accepted(self) -> str:
        return f"{self.prefix}/update/accepted"

    @property
    def update_rejected(self) -> str:
        return f"{self.prefix}/update/rejected"

    @property
    def update_delta(self) -> str:
        return f"{self.prefix}/update/delta"

    @property
    def update_documents(self) -> str:
        return f"{self.prefix}/update/documents"

    @property
    def get(self) -> str:
        return f"{self.prefix}/get"

    @property
    def get_accepted(self) -> str:
        return f"{self.prefix}/get/accepted"

    @property
    def get_rejected(self) -> str:
        return f"{self.prefix}/get/rejected"

    def request(self, kind: RequestKind) -> str:
        return {"update": self.update, "get": self.get, "fleet_update": self.fleet_update}[kind]

    def accepted(self, kind: RequestKind) -> str:
        return self.get_accepted if kind == "get" else self.update_accepted

    def rejected(self, kind: RequestKind) -> str:
        return self.get_rejected if kind == "get" else self.update_rejected


def request_filters(template: str = DEFAULT_TEMPLATE, share_group: str | None = None) -> list[str]:
    """The subscription filters a replica needs for the request topics of every device.

    With ``share_group`` the filters are MQTT 5 shared subscriptions so several replica
    processes split the load. Mosquitto delivers nothing to a shared subscription whose filter
    starts with ``$`` (the AWS layout), so for such templates the plain filters are returned:
    one replica process per broker then, or split by another means.
    """
    check_template(template)
    wildcard = template.replace("{device_id}", "+")
    filters = [f"{wildcard}/update", f"{wildcard}/get", f"{wildcard}/fleet/update"]
    if share_group is None or wildcard.startswith("$"):
        return filters
    return [f"$share/{share_group}/{f}" for f in filters]


_REQUEST_SUFFIXES: Final[tuple[tuple[str, RequestKind], ...]] = (
    ("/fleet/update", "fleet_update"),  # before "/update", which it ends with
    ("/update", "update"),
    ("/get", "get"),
)


def parse_request_topic(topic: str, template: str = DEFAULT_TEMPLATE) -> tuple[str, RequestKind]:
    """``("dev1", "update")`` for ``state/dev1/update`` (``"get"``, ``"fleet_update"`` for
    ``.../get``, ``.../fleet/update``); ShadowBadRequest for anything else."""
    check_template(template)
    head, _, tail = template.partition("{device_id}")
    if topic.startswith(head):
        # "state/fleet/update" is device "fleet"'s update, "state/dev1/fleet/update" the fleet
        # side's update of dev1: the first reading that yields a valid device id wins
        for suffix, kind in _REQUEST_SUFFIXES:
            middle = topic[len(head) : len(topic) - len(suffix)]
            if topic.endswith(suffix) and middle.endswith(tail):
                device_id = middle[: len(middle) - len(tail)]
                if _DEVICE_ID.fullmatch(device_id):
                    return device_id, kind
    raise ShadowBadRequest(f"shadow: {topic!r} is not a shadow request topic")


# --- JSON values -------------------------------------------------------------------------------


def json_equal(a: JsonValue, b: JsonValue) -> bool:
    """JSON equality: booleans are not numbers, 1 equals 1.0, arrays compare in order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def compact_json(value: Any) -> str:
    """Compact JSON text (no spaces), the form sizes are measured in."""
    return _ENCODER.encode(value)


def encode(value: Any) -> bytes:
    """The UTF-8 payload of a message."""
    return compact_json(value).encode("utf-8")


# --- merge, delta, metadata --------------------------------------------------------------------


def merge_state(base: Mapping[str, JsonValue], patch: Mapping[str, JsonValue]) -> JsonObject:
    """``base`` with ``patch`` merged in: objects recurse, ``null`` deletes, the rest replaces.

    Neither argument is modified. An object emptied by deletions is removed.
    """
    out: JsonObject = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
            continue
        if isinstance(value, dict):
            current = out.get(key)
            merged = merge_state(current if isinstance(current, dict) else {}, value)
            if merged:
                out[key] = merged
            elif isinstance(current, dict):
                out.pop(key, None)  # emptied by its deletions
            # else: an object that sets nothing (only nulls, empty objects) leaves a value be
            continue
        out[key] = value
    return out


def compute_delta(
    desired: Mapping[str, JsonValue], reported: Mapping[str, JsonValue]
) -> JsonObject:
    """Desired keys whose value differs from reported (absent counts as different), nested."""
    delta: JsonObject = {}
    for key, want in desired.items():
        if key not in reported:
            delta[key] = want
            continue
        have = reported[key]
        if isinstance(want, dict) and isinstance(have, dict):
            sub = compute_delta(want, have)
            if sub:
                delta[key] = sub
        elif not json_equal(want, have):
            delta[key] = want
    return delta


def metadata_for(patch: Mapping[str, JsonValue], timestamp: int) -> JsonObject:
    """Metadata of the keys a patch names: ``{"timestamp": T}`` per leaf, objects mirrored."""
    out: JsonObject = {}
    for key, value in patch.items():
        if isinstance(value, dict) and value:
            out[key] = metadata_for(value, timestamp)
        else:
            out[key] = {"timestamp": timestamp}
    return out


def merge_metadata(
    metadata: Mapping[str, JsonValue], patch: Mapping[str, JsonValue], timestamp: int
) -> JsonObject:
    """The metadata of a section after ``patch`` was merged into it (same shape as the state)."""
    return _merge_metadata(metadata, patch, {"timestamp": timestamp})


def _merge_metadata(
    metadata: Mapping[str, JsonValue], patch: Mapping[str, JsonValue], leaf: JsonObject
) -> JsonObject:
    # Every leaf an update sets shares one ``leaf`` object: documents are never modified.
    out: JsonObject = dict(metadata)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            current = out.get(key)
            # A leaf's metadata ({"timestamp": T}) is not an object of per-key metadata.
            leaf_before = isinstance(current, dict) and _is_leaf_meta(current)
            nested = current if isinstance(current, dict) and not leaf_before else {}
            merged = _merge_metadata(nested, value, leaf)
            if merged:
                out[key] = merged
            elif not leaf_before:
                out.pop(key, None)  # as in merge_state: a value's own metadata stays
        else:
            out[key] = leaf
    return out


def restrict_metadata(
    metadata: Mapping[str, JsonValue], shape: Mapping[str, JsonValue]
) -> JsonObject:
    """The part of ``metadata`` for the keys of ``shape`` (used for the delta's metadata)."""
    out: JsonObject = {}
    for key, value in shape.items():
        meta = metadata.get(key)
        if meta is None:
            continue
        if isinstance(value, dict) and isinstance(meta, dict) and not _is_leaf_meta(meta):
            out[key] = restrict_metadata(meta, value)
        else:
            out[key] = meta
    return out


def _is_leaf_meta(meta: Mapping[str, JsonValue]) -> bool:
    return meta.keys() == {"timestamp"} and isinstance(meta["timestamp"], int)


# --- requests ----------------------------------------------------------------------------------


class Absent:
    """The section was not named in the request (``null`` means delete it)."""

    _instance: Absent | None = None

    def __new__(cls) -> Absent:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Final = Absent()
SectionPatch: TypeAlias = "JsonObject | Absent | None"


@dataclass
class UpdateRequest:
    """A parsed update: each section is a patch, ``None`` (delete the section) or ABSENT.

    Not modified once built (not frozen: a frozen dataclass costs microseconds per request).

    ``texts`` holds the compact JSON of the sections as validated by :func:`parse_update`
    (``None`` when built in code): the replica reuses them for the ``accepted`` message and the
    clientToken fingerprint instead of encoding the same values again.
    """

    desired: SectionPatch = ABSENT
    reported: SectionPatch = ABSENT
    version: int | None = None
    client_token: str | None = None
    texts: tuple[str | None, str | None] | None = field(default=None, compare=False, repr=False)

    def to_payload(self) -> JsonObject:
        state: JsonObject = {}
        if not isinstance(self.desired, Absent):
            state["desired"] = self.desired
        if not isinstance(self.reported, Absent):
            state["reported"] = self.reported
        out: JsonObject = {"state": state}
        if self.version is not None:
            out["version"] = self.version
        if self.client_token is not None:
            out["clientToken"] = self.client_token
        return out

    def encode(self) -> bytes:
        """The request payload, checked by the same rules the replica applies."""
        try:
            raw = encode(self.to_payload())
        except (ValueError, TypeError) as exc:
            raise _bad(f"update cannot be encoded as JSON: {exc}", self.client_token) from exc
        parse_update(raw)
        return raw

    def section_texts(self) -> tuple[str | None, str | None]:
        """Compact JSON of (desired, reported); None for a section the request does not name."""
        if self.texts is not None:
            return self.texts
        return (
            None if isinstance(self.desired, Absent) else compact_json(self.desired),
            None if isinstance(self.reported, Absent) else compact_json(self.reported),
        )


@dataclass(frozen=True)
class GetRequest:
    client_token: str | None = None


def _bad(message: str, token: str | None) -> ShadowBadRequest:
    return ShadowBadRequest(f"shadow: {message}", client_token=token)


def _decode(payload: bytes, *, allow_empty: bool, limit: int = MAX_REQUEST_BYTES) -> Any:
    if len(payload) > limit:
        raise ShadowTooLarge(
            f"shadow: request of {len(payload)} bytes is over the {limit}-byte limit"
        )
    if allow_empty and not payload.strip():
        return {}
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ShadowUnsupportedEncoding(
            "shadow: unsupported document encoding; supported encoding is UTF-8"
        ) from exc
    try:
        return _loads(text)
    except (ValueError, RecursionError) as exc:
        raise ShadowBadRequest(f"shadow: payload is not valid JSON: {exc}") from exc


def _loads(text: str) -> Any:
    """``_DECODER.decode(text)`` calling the C scanner directly (two Python frames less)."""
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _SCAN(text, start)
    except StopIteration as exc:
        raise ValueError(f"Expecting value: char {exc.value}") from None
    if len(text.rstrip(_WHITESPACE)) > end:
        raise ValueError(f"Extra data: char {end}")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # in C; a key given twice makes the dict shorter than the list
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Built once: json.dumps/json.loads with options construct a new encoder/decoder per call.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_DECODER: Final = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
_SCAN: Final = _json.make_scanner(cast(Any, _DECODER))  # what _DECODER.decode calls
_WHITESPACE: Final = " \t\n\r"  # JSON's whitespace


def _not_json(value: object) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


# For values that cannot hold a cycle (parsed JSON and documents built from it): the C encoder
# without the circular-reference bookkeeping per container (metadata has one object per leaf),
# built once (JSONEncoder.encode builds a new one per call).
_TREE_CHUNKS: Final = _json.make_encoder(
    None, _not_json, _json.encode_basestring, None, ":", ",", False, False, False
)


def _tree_json(value: Any) -> str:
    """Compact JSON of a value that cannot hold a cycle (the same text as compact_json)."""
    return "".join(_TREE_CHUNKS(value, 0))


def _client_token(doc: Mapping[str, Any]) -> str | None:
    """The request's clientToken; raise with no token to echo if it is not a valid one."""
    if "clientToken" not in doc:
        return None
    token = doc["clientToken"]
    if not isinstance(token, str):
        raise _bad("clientToken must be a string", None)
    try:
        size = len(token.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise _bad("clientToken is not valid Unicode", None) from exc
    if size > MAX_CLIENT_TOKEN_BYTES:
        raise _bad(
            f"clientToken of {size} bytes is over the {MAX_CLIENT_TOKEN_BYTES}-byte limit", None
        )
    return token


def _check_value(value: JsonObject, where: str, token: str | None) -> str:
    """Reject what JSON text cannot round-trip (lone surrogates, huge floats) and deep nesting.

    One compact encode checks every string and number in C; the walk visits containers only.
    Returns the compact JSON text (the replica reuses it).
    """
    try:
        text = _tree_json(value)
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad(f"{where} holds a string that is not valid Unicode", token) from exc
    except ValueError as exc:
        raise _bad(f"{where} holds a number out of range", token) from exc
    if text.count("{") + text.count("[") <= MAX_DEPTH:
        return text  # cannot nest deeper than it has brackets (in strings too: a bound only)
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        container, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _bad(f"{where} is nested deeper than {MAX_DEPTH} levels", token)
        items = container.values() if type(container) is dict else container
        stack.extend((item, depth + 1) for item in items if type(item) in (dict, list))
    return text


def parse_update(payload: bytes) -> UpdateRequest:
    """Parse and validate an update request; raise a ShadowError with the wire status."""
    doc = _decode(payload, allow_empty=False)
    if not isinstance(doc, dict):
        raise _bad("update must be a JSON object", None)
    token = _client_token(doc)
    if not doc.keys() <= _UPDATE_FIELDS:
        unknown = sorted(set(doc) - _UPDATE_FIELDS)
        raise _bad(f"unexpected field {unknown[0]!r} in update", token)
    if "state" not in doc:
        raise _bad("missing required node: state", token)
    state = doc["state"]
    if not isinstance(state, dict):
        raise _bad("state must be a JSON object", token)
    if not state.keys() <= _STATE_FIELDS:
        unknown = sorted(set(state) - _STATE_FIELDS)
        raise _bad(f"state node may hold only desired and reported, not {unknown[0]!r}", token)
    if not state:
        raise _bad("state must name desired or reported", token)
    version = doc.get("version")
    if version is not None and (type(version) is not int or version < 0):
        raise _bad("version must be a non-negative integer", token)
    sections: dict[str, SectionPatch] = {}
    texts: dict[str, str | None] = {}
    for name in ("desired", "reported"):
        if name not in state:
            sections[name], texts[name] = ABSENT, None
            continue
        section = state[name]
        if section is not None and not isinstance(section, dict):
            raise _bad(f"state.{name} must be a JSON object or null", token)
        texts[name] = "null" if section is None else _check_value(section, f"state.{name}", token)
        sections[name] = section
    return UpdateRequest(
        desired=sections["desired"],
        reported=sections["reported"],
        version=version,
        client_token=token,
        texts=(texts["desired"], texts["reported"]),
    )


def parse_json_object(payload: bytes) -> JsonObject:
    """A response payload (accepted, rejected, delta, documents) as a JSON object.

    Responses carry metadata besides the state, so they may be larger than a request.
    """
    doc = _decode(payload, allow_empty=False, limit=MAX_RESPONSE_BYTES)
    if not isinstance(doc, dict):
        raise _bad("payload must be a JSON object", None)
    return cast(JsonObject, doc)


def parse_get(payload: bytes) -> GetRequest:
    """Parse a get request: empty, ``{}`` or ``{"clientToken": ...}``."""
    doc = _decode(payload, allow_empty=True)
    if not isinstance(doc, dict):
        raise _bad("get request must be a JSON object", None)
    token = _client_token(doc)
    unknown = sorted(set(doc) - _GET_FIELDS)
    if unknown:
        raise _bad(f"unexpected field {unknown[0]!r} in get request", token)
    return GetRequest(client_token=token)


# --- documents ---------------------------------------------------------------------------------

# How many accepted updates with a clientToken a shadow remembers, to answer a retry of one of
# them from memory (see apply_update). Kept in the stored row, so it survives restarts.
MAX_REMEMBERED_UPDATES: Final = 8

# The C string encoder of the json module: '"..."' with JSON escapes, non-ASCII kept (the same
# output as _ENCODER for a str). Used to build texts without building dicts first.
_encode_string: Final = json.encoder.encode_basestring


class RememberedUpdate(NamedTuple):
    """An accepted update the shadow remembers by its clientToken."""

    client_token: str
    fingerprint: str  # of the request's content (sections and version): see _fingerprint
    version: int  # the version the update created
    timestamp: int  # its time: the metadata timestamps of its accepted message

    def text(self) -> str:
        token = _encode_string(self.client_token)
        return f'[{token},"{self.fingerprint}",{self.version},{self.timestamp}]'


class ShadowDocument:
    """The stored shadow of one device. Never modified once built: an update builds a new one.

    The compact JSON texts of its four parts (desired, reported and their metadata) are made
    once, when first needed, and a document built by an update takes over the texts of the
    parts the update did not touch: a reported update encodes only the reported side again.
    Storage, the size check, the ``documents`` message and ``get`` answers are put together
    from these texts. ``remembered`` holds the last accepted updates that carried a clientToken
    (newest last), stored with the document, to answer retries (see :func:`apply_update`).
    """

    __slots__ = (
        "_delta",
        "_snapshot",
        "_state",
        "_texts",
        "_token_texts",
        "desired",
        "metadata_desired",
        "metadata_reported",
        "remembered",
        "reported",
        "timestamp",
        "version",
    )

    def __init__(
        self,
        desired: JsonObject,
        reported: JsonObject,
        metadata_desired: JsonObject,
        metadata_reported: JsonObject,
        version: int,
        timestamp: int,
        remembered: tuple[RememberedUpdate, ...] = (),
        *,
        texts: list[str | None] | None = None,
        token_texts: tuple[str, ...] | None = None,
    ) -> None:
        self.desired = desired
        self.reported = reported
        self.metadata_desired = metadata_desired
        self.metadata_reported = metadata_reported
        self.version = version
        self.timestamp = timestamp
        self.remembered = remembered
        self._texts: list[str | None] = texts if texts is not None else [None, None, None, None]
        self._token_texts = token_texts
        self._state: str | None = None
        self._snapshot: str | None = None
        self._delta: JsonObject | None = None

    def _key(self) -> tuple[Any, ...]:
        return (
            self.desired,
            self.reported,
            self.metadata_desired,
            self.metadata_reported,
            self.version,
            self.timestamp,
            self.remembered,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShadowDocument):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # holds dicts

    def __repr__(self) -> str:
        return f"ShadowDocument(version={self.version}, state={self.state_json})"

    def _part(self, index: int) -> str:
        text = self._texts[index]
        if text is None:
            parts = (self.desired, self.reported, self.metadata_desired, self.metadata_reported)
            text = self._texts[index] = _tree_json(parts[index])
        return text

    @property
    def delta(self) -> JsonObject:
        if self._delta is None:
            self._delta = compute_delta(self.desired, self.reported) if self.desired else {}
        return self._delta

    @property
    def state_json(self) -> str:
        if self._state is None:
            self._state = _sections(
                self._part(0) if self.desired else None, self._part(1) if self.reported else None
            )
        return self._state

    @property
    def metadata_json(self) -> str:
        return _sections(
            self._part(2) if self.metadata_desired else None,
            self._part(3) if self.metadata_reported else None,
        )

    @property
    def snapshot_json(self) -> str:
        """``{"state": .., "metadata": .., "version": N}`` as in the ``documents`` message."""
        if self._snapshot is None:
            self._snapshot = (
                f'{{"state":{self.state_json},"metadata":{self.metadata_json},'
                f'"version":{self.version}}}'
            )
        return self._snapshot

    def state_size(self) -> int:
        """Bytes of compact JSON of the state (desired + reported), bounded by 8 KiB."""
        text = self.state_json
        return len(text) if text.isascii() else len(text.encode("utf-8"))

    def state(self) -> JsonObject:
        out: JsonObject = {}
        if self.desired:
            out["desired"] = self.desired
        if self.reported:
            out["reported"] = self.reported
        return out

    def metadata(self) -> JsonObject:
        out: JsonObject = {}
        if self.metadata_desired:
            out["desired"] = self.metadata_desired
        if self.metadata_reported:
            out["reported"] = self.metadata_reported
        return out

    def token_texts(self) -> tuple[str, ...]:
        if self._token_texts is None:
            self._token_texts = tuple(entry.text() for entry in self.remembered)
        return self._token_texts

    def to_storage(self) -> str:
        """The JSON text a store keeps (round-trips through :meth:`from_storage`)."""
        tokens = self.token_texts()
        remembered = f',"clientTokens":[{",".join(tokens)}]' if tokens else ""
        return f'{self.snapshot_json[:-1]},"timestamp":{self.timestamp}{remembered}}}'

    @classmethod
    def from_storage(cls, text: str) -> ShadowDocument:
        try:
            doc = json.loads(text)
            state, meta = doc["state"], doc["metadata"]
            version, timestamp = doc["version"], doc["timestamp"]
            desired, reported = state.get("desired", {}), state.get("reported", {})
            meta_desired, meta_reported = meta.get("desired", {}), meta.get("reported", {})
            remembered = tuple(RememberedUpdate(*entry) for entry in doc.get("clientTokens", ()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ShadowInternal(f"shadow: stored document is corrupt: {exc}") from exc
        parts = (desired, reported, meta_desired, meta_reported)
        if (
            not all(isinstance(p, dict) for p in parts)
            or not (type(version) is int and type(timestamp) is int)
            or not all(_is_remembered(entry) for entry in remembered)
        ):
            raise ShadowInternal("shadow: stored document has fields of the wrong type")
        return cls(desired, reported, meta_desired, meta_reported, version, timestamp, remembered)

    def get_response(self, client_token: str | None) -> JsonObject:
        """The ``get/accepted`` payload: state with delta, metadata, version, timestamp."""
        return cast(JsonObject, json.loads(self.get_payload(client_token)))

    def get_payload(self, client_token: str | None) -> bytes:
        """:meth:`get_response` as the message payload, put together from the cached texts."""
        delta = self.delta
        state = _sections(
            self._part(0) if self.desired else None,
            self._part(1) if self.reported else None,
            _tree_json(delta) if delta else None,
        )
        return (
            f'{{"state":{state},"metadata":{self.metadata_json},"version":{self.version},'
            f'"timestamp":{self.timestamp}{_token_field(client_token)}}}'
        ).encode()

    def snapshot(self) -> JsonObject:
        return {"state": self.state(), "metadata": self.metadata(), "version": self.version}


def _is_remembered(entry: RememberedUpdate) -> bool:
    return (
        type(entry.client_token) is str
        and type(entry.fingerprint) is str
        and type(entry.version) is int
        and type(entry.timestamp) is int
    )


def _sections(desired: str | None, reported: str | None, delta: str | None = None) -> str:
    """``{"desired":..,"reported":..,"delta":..}`` from texts, leaving out the absent ones."""
    parts = []
    if desired is not None:
        parts.append(f'"desired":{desired}')
    if reported is not None:
        parts.append(f'"reported":{reported}')
    if delta is not None:
        parts.append(f'"delta":{delta}')
    return "{" + ",".join(parts) + "}"


def _token_field(client_token: str | None) -> str:
    return "" if client_token is None else f',"clientToken":{_encode_string(client_token)}'


def _with_token(doc: JsonObject, client_token: str | None) -> JsonObject:
    if client_token is not None:
        doc["clientToken"] = client_token
    return doc


@dataclass
class UpdateOutcome:
    """What an accepted update produces: the new document and the payloads to publish.

    A *replay* (a retry of an update the shadow remembers, see :func:`apply_update`) changes
    nothing: ``document`` is the current one, and only the ``accepted`` message is sent again.
    """

    document: ShadowDocument
    previous: ShadowDocument | None
    accepted_payload: bytes
    documents_payload: bytes | None  # None for a replay
    delta_payload: bytes | None  # None when no delta message is to be sent
    replayed: bool = False

    @property
    def accepted(self) -> JsonObject:
        return cast(JsonObject, json.loads(self.accepted_payload))

    @property
    def documents(self) -> JsonObject | None:
        payload = self.documents_payload
        return None if payload is None else cast(JsonObject, json.loads(payload))

    @property
    def delta(self) -> JsonObject | None:
        payload = self.delta_payload
        return None if payload is None else cast(JsonObject, json.loads(payload))


def apply_update(current: ShadowDocument | None, request: UpdateRequest, now: int) -> UpdateOutcome:
    """Apply an update to a document (None: the shadow does not exist yet).

    Raises ShadowVersionConflict (409) or ShadowTooLarge (413) with the clientToken attached;
    never a partial result.

    **Retries.** A request whose clientToken and content (sections and ``version``) equal one
    of the last MAX_REMEMBERED_UPDATES accepted updates of this shadow, and whose state the
    shadow still holds, is a retry of that update (its ``accepted`` was lost): the outcome is a
    replay with the same ``accepted`` payload as the first time (same version and timestamps)
    and nothing else. A clientToken seen with other content, or whose values were changed
    since, is a new update (devices may reuse tokens, e.g. a counter that restarts at boot).
    """
    token = request.client_token
    desired_text, reported_text = request.section_texts()
    fingerprint = ""
    seen = -1  # where the token is among the remembered updates
    if token is not None:
        fingerprint = _fingerprint(desired_text, reported_text, request.version)
        if current is not None:
            seen = _find_token(current.remembered, token)
            if seen >= 0:
                entry = current.remembered[seen]
                if entry.fingerprint == fingerprint and _holds(current, request):
                    accepted = _accepted_payload(
                        request, desired_text, reported_text, entry.version, entry.timestamp
                    )
                    return UpdateOutcome(current, current, accepted, None, None, replayed=True)
    version = current.version if current is not None else 0
    if request.version is not None and request.version != version:
        raise ShadowVersionConflict(
            f"shadow: version conflict: request has {request.version}, shadow is at {version}",
            client_token=token,
        )
    base = current or ShadowDocument({}, {}, {}, {}, 0, now)
    texts = list(base._texts)  # parts the update does not touch keep their JSON text
    leaf: JsonObject = {"timestamp": now}
    desired, meta_desired = base.desired, base.metadata_desired
    patch = request.desired
    if patch is None:
        desired, meta_desired = {}, {}
        texts[0] = texts[2] = None
    elif not isinstance(patch, Absent):
        desired = merge_state(desired, patch)
        meta_desired = _merge_metadata(meta_desired, patch, leaf)
        texts[0] = texts[2] = None
    reported, meta_reported = base.reported, base.metadata_reported
    patch = request.reported
    if patch is None:
        reported, meta_reported = {}, {}
        texts[1] = texts[3] = None
    elif not isinstance(patch, Absent):
        reported = merge_state(reported, patch)
        meta_reported = _merge_metadata(meta_reported, patch, leaf)
        texts[1] = texts[3] = None
    remembered, token_texts = base.remembered, base._token_texts
    if token is not None:
        remembered, token_texts = _remember(
            base, seen, RememberedUpdate(token, fingerprint, version + 1, now)
        )
    new = ShadowDocument(
        desired,
        reported,
        meta_desired,
        meta_reported,
        version + 1,
        now,
        remembered,
        texts=texts,
        token_texts=token_texts,
    )
    size = new.state_size()
    if size > MAX_STATE_BYTES:
        raise ShadowTooLarge(
            f"shadow: the document's state would be {size} bytes, over the "
            f"{MAX_STATE_BYTES}-byte limit",
            client_token=token,
        )
    accepted = _accepted_payload(request, desired_text, reported_text, new.version, now)
    previous = f'"previous":{current.snapshot_json},' if current is not None else ""
    documents = (
        f'{{{previous}"current":{new.snapshot_json},"timestamp":{now}{_token_field(token)}}}'
    ).encode()
    delta_payload: bytes | None = None
    new_delta = new.delta
    if new_delta and not json_equal(new_delta, current.delta if current is not None else {}):
        delta_message: JsonObject = {
            "state": new_delta,
            "metadata": restrict_metadata(new.metadata_desired, new_delta),
            "version": new.version,
            "timestamp": now,
        }
        delta_payload = encode(_with_token(delta_message, token))
    return UpdateOutcome(new, current, accepted, documents, delta_payload)


def _find_token(remembered: tuple[RememberedUpdate, ...], token: str) -> int:
    for index in range(len(remembered) - 1, -1, -1):
        if remembered[index].client_token == token:
            return index
    return -1


def _fingerprint(desired: str | None, reported: str | None, version: int | None) -> str:
    """A digest of what an update asks for, to tell a retry from a new update."""
    content = f"{desired}\0{reported}\0{version}".encode()
    return hashlib.blake2b(content, digest_size=12).hexdigest()


def _holds(current: ShadowDocument, request: UpdateRequest) -> bool:
    """Whether applying ``request`` again would leave the state exactly as it is."""
    for patch, section in (
        (request.desired, current.desired),
        (request.reported, current.reported),
    ):
        if isinstance(patch, Absent):
            continue
        if patch is None:
            if section:
                return False
        elif not json_equal(merge_state(section, patch), section):
            return False
    return True


def _remember(
    base: ShadowDocument, seen: int, entry: RememberedUpdate
) -> tuple[tuple[RememberedUpdate, ...], tuple[str, ...]]:
    """``base``'s remembered updates with ``entry`` added (one entry per token, newest last).

    ``seen`` is the index of an older entry with the same token (dropped), or -1.
    """
    remembered, texts = base.remembered, base.token_texts()
    if seen >= 0:
        remembered = remembered[:seen] + remembered[seen + 1 :]
        texts = texts[:seen] + texts[seen + 1 :]
    keep = MAX_REMEMBERED_UPDATES - 1
    return (*remembered[-keep:], entry), (*texts[-keep:], entry.text())


def _accepted_payload(
    request: UpdateRequest,
    desired_text: str | None,
    reported_text: str | None,
    version: int,
    now: int,
) -> bytes:
    """``update/accepted``: the request's state, metadata for the keys it named, version, time.

    Built from the section texts; a section set to null gets one timestamp for itself.
    """
    stamp = f'{{"timestamp":{now}}}'
    state, meta = [], []
    for name, patch, text in (
        ("desired", request.desired, desired_text),
        ("reported", request.reported, reported_text),
    ):
        if text is None:
            continue
        state.append(f'"{name}":{text}')
        meta_text = _metadata_text(patch, stamp) if isinstance(patch, dict) else stamp
        meta.append(f'"{name}":{meta_text}')
    return (
        f'{{"state":{{{",".join(state)}}},"metadata":{{{",".join(meta)}}},'
        f'"version":{version},"timestamp":{now}{_token_field(request.client_token)}}}'
    ).encode()


def _metadata_text(patch: Mapping[str, JsonValue], stamp: str) -> str:
    """The JSON text of ``metadata_for(patch, T)``, ``stamp`` being ``{"timestamp":T}``."""
    parts = [
        f"{_encode_string(key)}:{_metadata_text(value, stamp)}"
        if isinstance(value, dict) and value
        else f"{_encode_string(key)}:{stamp}"
        for key, value in patch.items()
    ]
    return "{" + ",".join(parts) + "}"


def get_document(current: ShadowDocument | None, request: GetRequest, device_id: str) -> JsonObject:
    """The ``get/accepted`` payload, or ShadowNotFound (404) for a shadow never written."""
    return cast(JsonObject, json.loads(get_payload(current, request, device_id)))


def get_payload(current: ShadowDocument | None, request: GetRequest, device_id: str) -> bytes:
    """:func:`get_document` as the message payload (built from the document's cached texts)."""
    if current is None:
        raise ShadowNotFound(
            f"shadow: no shadow exists for {device_id!r}", client_token=request.client_token
        )
    return current.get_payload(request.client_token)


# --- rejections --------------------------------------------------------------------------------

_BY_STATUS: Final[dict[int, type[ShadowError]]] = {
    400: ShadowBadRequest,
    401: ShadowUnauthorized,
    403: ShadowForbidden,
    404: ShadowNotFound,
    409: ShadowVersionConflict,
    413: ShadowTooLarge,
    415: ShadowUnsupportedEncoding,
    429: ShadowThrottled,
    500: ShadowInternal,
}


def rejected_document(error: ShadowError, now: int) -> JsonObject:
    """The ``rejected`` payload for an error: code, message, timestamp, echoed clientToken."""
    doc: JsonObject = {"code": error.status, "message": error.message, "timestamp": now}
    token = error.details.get("client_token")
    return _with_token(doc, token if isinstance(token, str) else None)


def error_from_rejected(payload: Mapping[str, Any]) -> ShadowError:
    """The ShadowError a ``rejected`` document stands for (for clients of the shadow)."""
    code = payload.get("code")
    message = payload.get("message")
    text = message if isinstance(message, str) else "rejected without a message"
    cls = _BY_STATUS.get(code, ShadowError) if type(code) is int else ShadowError
    return cls(f"shadow rejected ({code}): {text}", client_token=payload.get("clientToken"))


def client_token_of(payload: bytes) -> str | None:
    """Best effort: the valid clientToken of a payload that may be invalid otherwise.

    Also of one over the request limit (up to what a broker delivers): the 413 must echo the
    token, or the client waits for its timeout instead of learning why."""
    try:
        doc = _decode(payload, allow_empty=True, limit=MAX_RESPONSE_BYTES)
        return _client_token(doc) if isinstance(doc, dict) else None
    except ShadowError:
        return None

"""Properties: any single-byte change or truncation is rejected; garbage only ever raises a
BundleError; canonical JSON and manifests round-trip."""

from __future__ import annotations

import itertools
import struct

import pytest
from bundle_helpers import Forge, make_image, verify_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otad.bundle import (
    MAGIC,
    Keyring,
    Manifest,
    StreamVerifier,
    canonical,
    generate_private_key,
)
from otad.errors import BundleError, Truncated

_KEYS = {"ed25519": generate_private_key("ed25519"), "p256": generate_private_key("p256")}
_KEYRING = Keyring.from_keys([k.public_key() for k in _KEYS.values()])
_IMAGE = make_image(1500, seed=11)
_BUNDLES = {
    (alg, comp): bytes(Forge().bundle(_IMAGE, [key], compression=comp))
    for (alg, key), comp in itertools.product(_KEYS.items(), ["zstd", "none"])
}
_CASES = sorted(_BUNDLES)


def rejects(data: bytes, chunk: int = 4096) -> BundleError:
    """Run the whole verifier over ``data``; return the BundleError it must raise."""
    verifier = StreamVerifier(_KEYRING, threaded=False)
    try:
        for start in range(0, max(len(data), 1), chunk):
            for _ in verifier.feed(data[start : start + chunk]):
                pass
        verifier.finish()
    except BundleError as exc:
        return exc
    raise AssertionError("bundle accepted")


@pytest.mark.parametrize("case", _CASES, ids=["-".join(c) for c in _CASES])
def test_bundle_every_single_byte_flip_is_rejected(case: tuple[str, str]) -> None:
    data = _BUNDLES[case]
    assert verify_bytes(data, _KEYRING)[1] == _IMAGE
    for offset in range(len(data)):
        for mask in (0x01, 0x80):
            flipped = bytearray(data)
            flipped[offset] ^= mask
            rejects(bytes(flipped))


@pytest.mark.parametrize("case", _CASES, ids=["-".join(c) for c in _CASES])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_bundle_any_byte_change_is_rejected(case: tuple[str, str], data: st.DataObject) -> None:
    bundle = _BUNDLES[case]
    offset = data.draw(st.integers(0, len(bundle) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != bundle[offset]))
    chunk = data.draw(st.integers(1, 5000))
    changed = bytearray(bundle)
    changed[offset] = value
    rejects(bytes(changed), chunk)


@pytest.mark.parametrize("case", _CASES, ids=["-".join(c) for c in _CASES])
def test_bundle_truncation_at_every_offset_is_truncated(case: tuple[str, str]) -> None:
    data = _BUNDLES[case]
    for cut in range(len(data)):
        error = rejects(data[:cut])
        assert isinstance(error, Truncated), (cut, error)


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=4096), chunk=st.integers(1, 512))
def test_bundle_random_garbage_only_raises_bundle_errors(garbage: bytes, chunk: int) -> None:
    rejects(garbage, chunk)


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.tuples(st.integers(0, 3000), st.integers(0, 3000), st.integers(0, 1 << 40)),
    body=st.binary(max_size=6000),
    chunk=st.integers(1, 2048),
)
def test_bundle_garbage_behind_a_valid_looking_header_only_raises_bundle_errors(
    lengths: tuple[int, int, int], body: bytes, chunk: int
) -> None:
    header = MAGIC + struct.pack(">IIQQQ", 1, 0, *lengths)
    rejects(header + body, chunk)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=3000), chunk=st.integers(1, 4096))
def test_bundle_valid_preamble_with_garbage_payload_only_raises_bundle_errors(
    payload: bytes, chunk: int
) -> None:
    forged = Forge().bundle(_IMAGE, [_KEYS["ed25519"]], payload=payload)
    rejects(bytes(forged), chunk)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), 1 << 63) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(document=st.dictionaries(st.text(max_size=8), _json, max_size=6))
def test_bundle_canonical_json_round_trips(document: dict[str, object]) -> None:
    try:
        encoded = canonical.encode(document)
    except BundleError:
        return  # lone surrogates have no UTF-8 form: refused on both sides
    assert canonical.decode(encoded) == document
    assert canonical.encode(canonical.decode(encoded)) == encoded


@settings(max_examples=100, deadline=None)
@given(
    version=st.text(min_size=1, max_size=20).filter(str.isprintable),
    security_version=st.integers(0, (1 << 64) - 1),
    size=st.integers(0, (1 << 64) - 1),
    extra=st.dictionaries(
        st.text(min_size=1, max_size=8).filter(lambda k: k not in Manifest.__slots__), _json
    ),
)
def test_bundle_manifest_round_trips(
    version: str, security_version: int, size: int, extra: dict[str, object]
) -> None:
    from datetime import UTC, datetime

    manifest = Manifest(
        compatible="c",
        version=version,
        security_version=security_version,
        created=datetime(2026, 1, 1, tzinfo=UTC),
        size=size,
        compression="zstd",
        sha256="a" * 64,
        image_size=size,
        image_sha256="b" * 64,
        key_ids=("0123456789abcdef",),
        extra=extra,
    )
    try:
        encoded = manifest.encode()
    except BundleError:
        return
    assert Manifest.parse(encoded) == manifest

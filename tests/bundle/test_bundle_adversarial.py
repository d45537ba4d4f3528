"""Named attacks on the bundle format: mix-and-match, partial signatures, lying sizes, bombs,
endless data, downgrade by re-signing tricks."""

from __future__ import annotations

import tracemalloc
from datetime import datetime

import pytest
import zstandard
from bundle_helpers import Forge, Forged, make_image

from otad.bundle import Header, Keyring, PrivateKey, StreamVerifier, VerifyPolicy
from otad.bundle.header import SIGNING_CONTEXT
from otad.errors import (
    BadSignature,
    DecompressFailed,
    MalformedManifest,
    Oversize,
    PayloadHashMismatch,
    Truncated,
)


def run(data: bytes, keyring: Keyring, policy: VerifyPolicy | None = None, chunk: int = 1 << 16):
    verifier = StreamVerifier(keyring, policy)
    for start in range(0, len(data), chunk):
        for _ in verifier.feed(data[start : start + chunk]):
            pass
    return verifier.finish()


@pytest.fixture
def two(forge: Forge, ed_key: PrivateKey) -> tuple[Forged, Forged]:
    """Two honest bundles of different images, both signed by the trusted key."""
    old = forge.bundle(make_image(50_000, seed=1), [ed_key], version="1.0")
    new = forge.bundle(make_image(50_000, seed=2), [ed_key], version="2.0", security_version=3)
    return old, new


def splice(manifest_of: Forged, signatures_of: Forged, payload_of: Forged) -> bytes:
    """A bundle from parts of others; the header matches the parts (no framing error)."""
    header = Header(
        1, 0, len(manifest_of.manifest), len(signatures_of.signatures), len(payload_of.payload)
    )
    return header.pack() + manifest_of.manifest + signatures_of.signatures + payload_of.payload


def test_bundle_mix_manifest_of_one_payload_of_another_is_rejected(
    forge: Forge, ed_key: PrivateKey, keyring: Keyring
) -> None:
    # Same image size, no compression: the framing fits exactly, only the content differs.
    old = forge.bundle(make_image(50_000, seed=1), [ed_key], compression="none")
    new = forge.bundle(make_image(50_000, seed=2), [ed_key], compression="none", security_version=3)
    with pytest.raises(PayloadHashMismatch):
        run(splice(new, new, old), keyring)


def test_bundle_mix_newer_manifest_with_older_compressed_payload_is_rejected(
    two: tuple[Forged, Forged], keyring: Keyring
) -> None:
    old, new = two
    # Keep the new bundle's signed framing; squeeze the old payload into its length.
    length = len(new.payload)
    payload = old.payload[:length].ljust(length, b"\0")
    data = new.header.pack() + new.manifest + new.signatures + payload
    with pytest.raises((PayloadHashMismatch, DecompressFailed, Oversize, Truncated)):
        run(data, keyring)
    with pytest.raises(BadSignature):  # and with the old payload's own length, the header lies
        run(splice(new, new, old), keyring)


def test_bundle_mix_same_payload_under_another_signature_is_rejected(
    two: tuple[Forged, Forged], keyring: Keyring
) -> None:
    old, new = two
    with pytest.raises(BadSignature):
        run(splice(old, new, old), keyring)  # old manifest, new bundle's signature


def test_bundle_mix_same_payload_under_an_edited_manifest_is_rejected(
    two: tuple[Forged, Forged], keyring: Keyring
) -> None:
    old, _ = two
    edited = old.manifest.replace(b'"security_version":0', b'"security_version":9')
    assert edited != old.manifest
    forged = Forged(
        Header(1, 0, len(edited), len(old.signatures), len(old.payload)),
        edited,
        old.signatures,
        old.payload,
    )
    with pytest.raises(BadSignature):
        run(bytes(forged), keyring)


def test_bundle_signature_over_the_manifest_only_is_rejected(
    forge: Forge, ed_key: PrivateKey, keyring: Keyring, image: bytes
) -> None:
    forged = forge.bundle(image, [ed_key], sign_message=lambda _m, _h, manifest: manifest)
    with pytest.raises(BadSignature):
        run(bytes(forged), keyring)


def test_bundle_signature_over_a_prefix_of_the_manifest_is_rejected(
    forge: Forge, ed_key: PrivateKey, keyring: Keyring, image: bytes
) -> None:
    forged = forge.bundle(image, [ed_key], sign_message=lambda message, _h, _m: message[:-20])
    with pytest.raises(BadSignature):
        run(bytes(forged), keyring)


def test_bundle_signature_without_the_header_fields_is_rejected(
    forge: Forge, ed_key: PrivateKey, keyring: Keyring, image: bytes
) -> None:
    forged = forge.bundle(
        image, [ed_key], sign_message=lambda _msg, _h, manifest: SIGNING_CONTEXT + manifest
    )
    with pytest.raises(BadSignature):
        run(bytes(forged), keyring)


def test_bundle_swapped_header_lengths_break_the_signature(
    two: tuple[Forged, Forged], keyring: Keyring
) -> None:
    old, _ = two
    # Declare a longer payload than signed and append bytes: the header field is signed.
    longer = Header(1, 0, len(old.manifest), len(old.signatures), len(old.payload) + 10)
    with pytest.raises(BadSignature):
        run(longer.pack() + old.manifest + old.signatures + old.payload + bytes(10), keyring)


def test_bundle_manifest_size_disagreeing_with_the_header_is_rejected(
    forge: Forge, ed_key: PrivateKey, keyring: Keyring, image: bytes
) -> None:
    payload = zstandard.ZstdCompressor().compress(image)
    manifest = forge.manifest_for(payload, image, [ed_key])
    manifest["size"] = len(payload) + 1  # signed, but the header says otherwise
    with pytest.raises(MalformedManifest):
        run(bytes(forge.bundle(image, [ed_key], payload=payload, manifest=manifest)), keyring)


def test_bundle_image_size_smaller_than_the_stream_is_oversize(
    forge: Forge, ed_key: PrivateKey, keyring: Keyring, image: bytes
) -> None:
    forged = forge.bundle(image, [ed_key], image_size=len(image) - 1)
    with pytest.raises(Oversize):
        run(bytes(forged), keyring)


def test_bundle_image_size_larger_than_the_stream_is_truncated(
    forge: Forge, ed_key: PrivateKey, keyring: Keyring, image: bytes
) -> None:
    forged = forge.bundle(image, [ed_key], image_size=len(image) + 1)
    with pytest.raises(Truncated):
        run(bytes(forged), keyring)


def test_bundle_payload_ending_inside_a_frame_is_rejected(
    forge: Forge, ed_key: PrivateKey, keyring: Keyring, image: bytes
) -> None:
    payload = zstandard.ZstdCompressor().compress(image)[:-5]
    forged = forge.bundle(image, [ed_key], payload=payload)
    with pytest.raises((DecompressFailed, Truncated)):
        run(bytes(forged), keyring)


def test_bundle_trailing_garbage_after_the_frame_is_rejected(
    forge: Forge, ed_key: PrivateKey, keyring: Keyring, image: bytes
) -> None:
    payload = zstandard.ZstdCompressor().compress(image) + b"trailing"
    forged = forge.bundle(image, [ed_key], payload=payload)
    with pytest.raises(DecompressFailed):
        run(bytes(forged), keyring)


def test_bundle_endless_data_is_cut_off_at_the_declared_size(
    two: tuple[Forged, Forged], keyring: Keyring
) -> None:
    old, _ = two
    verifier = StreamVerifier(keyring)
    for _ in verifier.feed(bytes(old)):
        pass
    with pytest.raises(Oversize):
        verifier.feed(b"\x00" * 4096)


@pytest.mark.parametrize("fallback", [False, True])
def test_bundle_zstd_bomb_is_stopped_at_the_declared_image_size(
    forge: Forge, ed_key: PrivateKey, keyring: Keyring, fallback: bool
) -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(256 << 20))  # ~8 KiB
    claimed = make_image(1 << 20, seed=3)  # claims a normal 1 MiB image
    forged = forge.bundle(claimed, [ed_key], payload=bomb)
    assert len(bomb) < 64 << 10
    verifier = StreamVerifier(keyring, zstd_fallback=fallback)
    produced = 0
    tracemalloc.start()
    try:
        with pytest.raises(Oversize):  # noqa: PT012 - the error comes while iterating
            for chunk in verifier.feed(bytes(forged)):
                produced += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert produced <= 1 << 20  # nothing beyond the declared size ever came out
    limit = 16 << 20 if fallback else 8 << 20  # the fallback holds one 128-byte slice's output
    assert peak < limit, peak  # never anything like the 256 MiB the bomb expands to


@pytest.mark.parametrize("fallback", [False, True])
def test_bundle_frame_needing_a_window_above_8_mib_is_refused(
    forge: Forge, ed_key: PrivateKey, keyring: Keyring, fallback: bool
) -> None:
    image = make_image(1 << 20, seed=6)
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=25)
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
    payload = compressor.compress(image) + compressor.flush()  # no size: window is declared
    forged = forge.bundle(image, [ed_key], payload=payload)
    verifier = StreamVerifier(keyring, zstd_fallback=fallback)
    with pytest.raises(DecompressFailed):
        list(verifier.feed(bytes(forged)))


def test_bundle_policy_refuses_nonsense() -> None:
    from otad.errors import ConfigError

    with pytest.raises(ConfigError):
        VerifyPolicy(now=datetime(2030, 1, 1))  # naive: which time zone?
    with pytest.raises(ConfigError):
        VerifyPolicy(min_security_version=-1)
    with pytest.raises(ConfigError):
        VerifyPolicy(algorithms=frozenset({"rsa"}))

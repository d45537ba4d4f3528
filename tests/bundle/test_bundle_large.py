"""Sizes above 4 GiB (u64 everywhere) and memory that does not grow with the bundle size.

The big image is a generated stream of zeros compressed in memory: no big file is written.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard
from bundle_helpers import Forge, make_image

from otad.bundle import (
    HEADER_SIZE,
    Keyring,
    Manifest,
    PrivateKey,
    StreamVerifier,
    build_bundle,
    parse_header,
    read_preamble,
)
from otad.errors import Truncated

FOUR_GIB = 1 << 32
FEED = 4 << 20
# What the verifier may hold at once, whatever the bundle size: the owned copy of one fed chunk,
# the output chunk being handed out, and up to 4 output chunks queued for the hashing thread
# (how many are queued depends on thread timing, so the bound is absolute, not relative).
MEMORY_BOUND = FEED + 6 * (1 << 20) + (1 << 20)


def zero_stream_bundle(size: int, key: PrivateKey, forge: Forge) -> tuple[bytes, str]:
    """A bundle of ``size`` zero bytes, compressed in memory (a few hundred KiB for 4 GiB).

    The image is generated, never stored: hashing and compressing it run on two threads (both
    release the GIL), so the test costs about one pass over the image.
    """
    compressor = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    digest = hashlib.sha256()
    block = bytes(FEED)
    parts: list[bytes] = []
    with ThreadPoolExecutor(1) as pool:
        for start in range(0, size, FEED):
            piece = block[: min(FEED, size - start)]
            hashed = pool.submit(digest.update, piece)
            parts.append(compressor.compress(piece))
            hashed.result()
    parts.append(compressor.flush())
    payload = b"".join(parts)
    manifest = forge.manifest_for(payload, b"", [key])
    manifest.update(image_size=size, image_sha256=digest.hexdigest())
    return bytes(forge.bundle(b"", [key], payload=payload, manifest=manifest)), digest.hexdigest()


def verify_chunks(data: bytes, keyring: Keyring) -> tuple[Manifest, int, int]:
    """Feed a bundle in FEED-sized chunks; returns manifest, image bytes and traced peak memory."""
    verifier = StreamVerifier(keyring)
    produced = 0
    view = memoryview(data)
    tracemalloc.start()
    try:
        for start in range(0, len(data), FEED):
            for chunk in verifier.feed(view[start : start + FEED]):
                produced += len(chunk)
        manifest = verifier.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return manifest, produced, peak


@pytest.mark.slow
def test_bundle_above_4_gib_round_trips_in_constant_memory(
    forge: Forge, ed_key: PrivateKey
) -> None:
    keyring = Keyring.from_keys([ed_key.public_key()])
    size = FOUR_GIB + (1 << 20) + 12_345  # not a multiple of anything, beyond 32 bits
    data, digest = zero_stream_bundle(size, ed_key, forge)
    manifest, produced, big_peak = verify_chunks(data, keyring)
    assert manifest.image_size == produced == size
    assert manifest.image_sha256 == digest
    assert parse_header(data[:HEADER_SIZE]).total_size == len(data)

    assert big_peak < MEMORY_BOUND, big_peak


def test_bundle_memory_does_not_grow_with_the_bundle_size(
    tmp_path: Path, ed_key: PrivateKey
) -> None:
    keyring = Keyring.from_keys([ed_key.public_key()])
    for size in (4 << 20, 48 << 20):
        image = tmp_path / f"{size}.img"
        image.write_bytes(make_image(size, seed=size))
        out = tmp_path / f"{size}.otab"
        build_bundle(image, out, key=ed_key, version="1", compatible="c")
        _, produced, peak = verify_chunks(out.read_bytes(), keyring)
        assert produced == size
        assert peak < MEMORY_BOUND, (size, peak)


def test_bundle_u64_sizes_in_header_and_manifest(
    forge: Forge, ed_key: PrivateKey, keyring: Keyring
) -> None:
    huge = 5 * FOUR_GIB + 3
    manifest = {
        "format_version": 1,
        "compatible": "c",
        "version": "1",
        "security_version": FOUR_GIB + 1,
        "created": "2026-01-01T00:00:00Z",
        "size": huge,
        "compression": "none",
        "sha256": "ab" * 32,
        "image_size": huge,
        "image_sha256": "ab" * 32,
        "key_ids": [forge.manifest_for(b"", b"", [ed_key])["key_ids"][0]],
    }
    forged = forge.bundle(b"", [ed_key], payload=b"", manifest=manifest, declared_payload_size=huge)
    data = bytes(forged)
    header = parse_header(data[:HEADER_SIZE])
    assert header.payload_size == huge
    assert header.total_size == len(data) + huge
    verifier = StreamVerifier(keyring)
    list(verifier.feed(data + bytes(1 << 20)))
    assert verifier.manifest is not None and verifier.manifest.image_size == huge
    assert verifier.total_size == len(data) + huge
    with pytest.raises(Truncated) as caught:
        verifier.finish()
    assert caught.value.details == {"received": 1 << 20, "declared": huge}


def test_bundle_read_preamble_from_a_file(tmp_path: Path, ed_key: PrivateKey) -> None:
    image = tmp_path / "i.img"
    image.write_bytes(make_image(100_000))
    out = tmp_path / "i.otab"
    built = build_bundle(image, out, key=ed_key, version="1", compatible="c")
    with out.open("rb") as stream:
        assert read_preamble(stream).manifest() == built
    stub = tmp_path / "stub"
    stub.write_bytes(out.read_bytes()[:30])
    with stub.open("rb") as stream, pytest.raises(Truncated):
        read_preamble(stream)

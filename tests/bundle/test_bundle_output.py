"""The verifier's output path: the reused output buffers, the hashing thread, lent chunks."""

from __future__ import annotations

import hashlib
import pickle
import random

import pytest
from bundle_helpers import Forge, make_image, verify_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

from otad.bundle import Keyring, PrivateKey, StreamVerifier
from otad.bundle.digest import Digests
from otad.bundle.ring import OutputRing
from otad.errors import ImageHashMismatch, Oversize, PayloadHashMismatch, Truncated

# Bigger than the 4 x 1 MiB output ring, so every buffer is reused a few times.
IMAGE_SIZE = 9 << 20 | 12345


@pytest.fixture(scope="module")
def big_image() -> bytes:
    return make_image(IMAGE_SIZE, seed=5)


@pytest.fixture(scope="module")
def big_bundle(big_image: bytes, ed_key: PrivateKey) -> bytes:
    return bytes(Forge().bundle(big_image, [ed_key]))


@pytest.mark.parametrize("threaded", [True, False])
@pytest.mark.parametrize("chunk", [1 << 20, 100_003, 3 << 20])
def test_verifier_output_survives_reused_buffers(
    big_bundle: bytes, big_image: bytes, keyring: Keyring, threaded: bool, chunk: int
) -> None:
    manifest, out = verify_bytes(big_bundle, keyring, chunk=chunk, threaded=threaded)
    assert out == big_image
    assert manifest.image_sha256 == hashlib.sha256(big_image).hexdigest()


def test_verifier_output_chunks_are_read_only_and_released_on_advance(
    big_bundle: bytes, keyring: Keyring
) -> None:
    verifier = StreamVerifier(keyring)
    previous: memoryview | None = None
    for chunk in verifier.feed(big_bundle):
        assert chunk.readonly
        assert 0 < len(chunk) <= 1 << 20
        if previous is not None:
            with pytest.raises(ValueError, match="released"):
                bytes(previous)  # kept past its turn: refused, never stale bytes
        previous = chunk
    verifier.finish()


def test_verifier_output_chunk_still_exported_is_a_programming_error(
    big_bundle: bytes, keyring: Keyring
) -> None:
    verifier = StreamVerifier(keyring)
    outputs = verifier.feed(big_bundle)
    held = pickle.PickleBuffer(next(outputs))  # holds a buffer export, like C code would
    with pytest.raises(RuntimeError, match="still exported"):
        next(outputs)
    held.release()
    verifier.close()


def test_verifier_join_of_kept_chunks_fails_loudly(big_bundle: bytes, keyring: Keyring) -> None:
    verifier = StreamVerifier(keyring)
    with pytest.raises(TypeError):
        b"".join(verifier.feed(big_bundle))  # collects the chunks first: all but one released
    verifier.close()


def test_verifier_hash_image_false_skips_only_the_image_hash(
    forge: Forge, ed_key: PrivateKey, keyring: Keyring
) -> None:
    image = make_image(3 << 20, seed=9)
    wrong_hash = bytes(forge.bundle(image, [ed_key], image_sha256="00" * 32))
    with pytest.raises(ImageHashMismatch):
        verify_bytes(wrong_hash, keyring)
    verifier = StreamVerifier(keyring, hash_image=False)
    chunks = [bytes(chunk) for chunk in verifier.feed(wrong_hash)]
    assert verifier.finish().image_sha256 == "00" * 32
    assert b"".join(chunks) == image
    # nothing hashes the output: it comes out of one small buffer, not the 4 x 1 MiB ring
    assert max(map(len, chunks)) == 256 << 10


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"image_size": (3 << 20) - 1}, Oversize),
        ({"image_size": (3 << 20) + 1}, Truncated),
        ({"sha256": "11" * 32}, PayloadHashMismatch),
    ],
)
def test_verifier_hash_image_false_still_checks_sizes_and_payload(
    forge: Forge,
    ed_key: PrivateKey,
    keyring: Keyring,
    overrides: dict[str, object],
    error: type[Exception],
) -> None:
    image = make_image(3 << 20, seed=9)
    data = bytes(forge.bundle(image, [ed_key], **overrides))
    with pytest.raises(error):
        _verify_without_image_hash(data, keyring)


def _verify_without_image_hash(data: bytes, keyring: Keyring) -> None:
    verifier = StreamVerifier(keyring, hash_image=False)
    for _ in verifier.feed(data):
        pass
    verifier.finish()


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    slots=st.integers(1, 4),
    slot_size=st.sampled_from([1, 777, 64 << 10, 100_000, 300_000]),
    threaded=st.booleans(),
)
def test_ring_hashes_every_byte_in_order(
    seed: int, slots: int, slot_size: int, threaded: bool
) -> None:
    rng = random.Random(seed)
    # up to ~5 turns of the ring (bounded so the 1-byte slots stay fast)
    source = memoryview(rng.randbytes(rng.randint(0, min(6 << 20, 5 * slots * slot_size + 999))))
    digests = Digests(1, threaded=threaded)
    ring = OutputRing(digests, 0, slots=slots, slot_size=slot_size)
    lent = bytearray()
    position = 0
    while position < len(source):
        space = ring.space()
        size = min(rng.randint(1, len(space)), len(source) - position)
        space[:size] = source[position : position + size]
        position += size
        lent += ring.commit(size)
    ring.flush()
    assert lent == source
    assert digests.hexdigests() == [hashlib.sha256(source).hexdigest()]


def test_digests_small_pieces_are_copied_before_the_caller_reuses_them() -> None:
    digests = Digests(2, threaded=True)
    buffer = bytearray(b"a" * 100)
    digests.update(0, memoryview(buffer))  # small: joined into a private block
    buffer[:] = b"b" * 100
    big = bytearray(b"c" * (3 << 20))
    digests.update(1, memoryview(big)).wait()  # big: hashed in place, reusable after wait()
    big[:] = b"d" * len(big)
    assert digests.hexdigests() == [
        hashlib.sha256(b"a" * 100).hexdigest(),
        hashlib.sha256(b"c" * (3 << 20)).hexdigest(),
    ]


def test_digests_refuse_updates_after_close() -> None:
    digests = Digests(1, threaded=True)
    digests.update(0, bytes(1 << 20))
    digests.close()
    digests.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        digests.update(0, bytes(1 << 20))


def test_verifier_refuses_input_after_close(big_bundle: bytes, keyring: Keyring) -> None:
    verifier = StreamVerifier(keyring)
    for _ in verifier.feed(big_bundle[: 2 << 20]):
        pass
    verifier.close()
    with pytest.raises(RuntimeError, match="closed"):
        verifier.feed(big_bundle[2 << 20 :])
    with pytest.raises(RuntimeError, match="closed"):
        verifier.finish()


def test_verifier_hash_image_false_still_checks_an_uncompressed_image(
    forge: Forge, ed_key: PrivateKey, keyring: Keyring
) -> None:
    image = make_image(100_000, seed=3)
    payload = bytearray(image)
    payload[5000] ^= 1  # signed manifest names the original; the payload hash catches it
    manifest = forge.manifest_for(image, image, [ed_key], "none")
    data = bytes(
        forge.bundle(image, [ed_key], compression="none", payload=bytes(payload), manifest=manifest)
    )
    with pytest.raises(PayloadHashMismatch):
        _verify_without_image_hash(data, keyring)

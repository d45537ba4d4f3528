"""Resuming a payload at a zstd frame end: what an interrupted install continues from."""

from __future__ import annotations

from pathlib import Path

import pytest
import zstandard
from bundle_helpers import make_image

from otad.bundle import Keyring, PrivateKey, StreamVerifier, build_bundle
from otad.bundle.builder import FRAME_SIZE
from otad.errors import BundleError, ConfigError, Oversize

FRAME = 64 << 10
IMAGE_SIZE = 20 * FRAME + 4321  # the last frame is a short one


@pytest.fixture(scope="module")
def image() -> bytes:
    return make_image(IMAGE_SIZE, seed=11)


@pytest.fixture
def bundle(tmp_path: Path, image: bytes, ed_key: PrivateKey) -> bytes:
    source = tmp_path / "rootfs.img"
    source.write_bytes(image)
    out = tmp_path / "rootfs.otb"
    build_bundle(source, out, key=ed_key, version="2", compatible="c", frame_size=FRAME)
    return out.read_bytes()


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[at : at + size] for at in range(0, len(data), size)]


def run(verifier: StreamVerifier, chunks: list[bytes]) -> tuple[bytes, list[tuple[int, int]]]:
    """Feed ``chunks``; the image bytes out and every new resume point seen after a feed."""
    out = bytearray()
    points: list[tuple[int, int]] = []
    for chunk in chunks:
        for view in verifier.feed(chunk):
            out += view
        point = verifier.resume_point
        if point is not None and (not points or points[-1] != point):
            points.append(point)
    verifier.finish()
    return bytes(out), points


def frame_content_sizes(payload: bytes) -> list[int]:
    sizes = []
    while payload:
        sizes.append(zstandard.get_frame_parameters(payload).content_size)
        frame = zstandard.ZstdDecompressor().decompressobj()
        frame.decompress(payload)
        payload = frame.unused_data  # what follows the first frame
    return sizes


def test_builder_writes_one_frame_per_frame_size(bundle: bytes, keyring: Keyring) -> None:
    verifier = StreamVerifier(keyring, hash_image=False)
    _, points = run(verifier, [bundle])
    assert verifier.preamble is not None
    payload = bundle[len(verifier.preamble) :]
    assert frame_content_sizes(payload) == [FRAME] * 20 + [IMAGE_SIZE % FRAME]
    assert points[-1] == (len(payload), IMAGE_SIZE)


@pytest.mark.parametrize(
    ("chunk", "fallback"),
    [(7, False), (999, False), (65536, False), (1 << 20, False), (999, True), (65536, True)],
)
def test_verifier_resumes_at_every_frame_end(
    bundle: bytes, image: bytes, keyring: Keyring, chunk: int, fallback: bool
) -> None:
    """Also with the decompressobj fallback (zstandard without its cffi backend)."""
    first = StreamVerifier(keyring, hash_image=False, zstd_fallback=fallback)
    out, points = run(first, pieces(bundle, 10_007))
    assert out == image
    # frame ends, as seen after each feed: multiples of FRAME image bytes, last the image's end
    assert len(points) >= 15 and points[-1][1] == IMAGE_SIZE
    assert all(i % FRAME == 0 for _, i in points[:-1])
    preamble = first.preamble
    assert preamble is not None and bundle.startswith(preamble)
    for payload_at, image_at in [(0, 0), *points[:: 1 if chunk > 999 else 7]]:
        again = StreamVerifier(
            keyring, hash_image=False, resume_from=(payload_at, image_at), zstd_fallback=fallback
        )
        rest, _ = run(again, [preamble, *pieces(bundle[len(preamble) + payload_at :], chunk)])
        assert rest == image[image_at:], (payload_at, image_at)
        assert again.image_produced == IMAGE_SIZE


def test_verifier_resuming_inside_a_frame_fails(bundle: bytes, keyring: Keyring) -> None:
    first = StreamVerifier(keyring, hash_image=False)
    _, points = run(first, pieces(bundle, 10_007))
    assert first.preamble is not None
    payload_at, image_at = points[3]
    again = StreamVerifier(keyring, hash_image=False, resume_from=(payload_at + 5, image_at))
    with pytest.raises(BundleError):
        run(again, [first.preamble, bundle[len(first.preamble) + payload_at + 5 :]])


def test_verifier_resume_point_outside_the_bundle_is_refused(
    bundle: bytes, keyring: Keyring
) -> None:
    verifier = StreamVerifier(keyring, hash_image=False, resume_from=(len(bundle), 0))
    with pytest.raises(Oversize, match="resume point"):
        verifier.feed(bundle)


def test_verifier_resume_needs_the_caller_to_check_the_image(keyring: Keyring) -> None:
    with pytest.raises(ValueError, match="hash_image=False"):
        StreamVerifier(keyring, resume_from=(0, 0))


def test_builder_refuses_tiny_frames(tmp_path: Path, ed_key: PrivateKey) -> None:
    source = tmp_path / "rootfs.img"
    source.write_bytes(b"x" * 10)
    with pytest.raises(ConfigError, match="frame size"):
        build_bundle(
            source, tmp_path / "o.otb", key=ed_key, version="1", compatible="c", frame_size=100
        )
    assert FRAME_SIZE >= 1 << 20


def test_verifier_resumes_an_uncompressed_payload_anywhere(
    tmp_path: Path, image: bytes, ed_key: PrivateKey, keyring: Keyring
) -> None:
    """``compression: none``: the image is the payload, every byte handed out is a resume point."""
    source = tmp_path / "rootfs.img"
    source.write_bytes(image)
    out = tmp_path / "plain.otb"
    build_bundle(source, out, key=ed_key, version="2", compatible="c", compression="none")
    bundle = out.read_bytes()
    first = StreamVerifier(keyring, hash_image=False)
    _, points = run(first, pieces(bundle, 100_003))
    assert first.preamble is not None
    assert all(p == i for p, i in points) and points[-1] == (IMAGE_SIZE, IMAGE_SIZE)
    at = points[len(points) // 2][0]
    again = StreamVerifier(keyring, hash_image=False, resume_from=(at, at))
    rest, _ = run(again, [first.preamble, bundle[len(first.preamble) + at :]])
    assert rest == image[at:]

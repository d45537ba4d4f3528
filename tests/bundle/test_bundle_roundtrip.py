"""Round trips through build_bundle and the StreamVerifier, keyrings and preamble helpers."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from bundle_helpers import make_image, verify_bytes

from otad.bundle import (
    HEADER_SIZE,
    Keyring,
    PrivateKey,
    StreamVerifier,
    VerifyPolicy,
    add_public_key,
    key_id_of,
    load_private_key,
    parse_header,
    parse_preamble,
    private_key_pem,
    public_key_pem,
    verify_preamble,
)
from otad.errors import KeyringError, Truncated


@pytest.mark.parametrize("algorithm", ["ed25519", "p256"])
@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("threaded", [True, False])
def test_bundle_round_trip_restores_the_image(
    built: Callable[..., bytes],
    image: bytes,
    keyring: Keyring,
    ed_key: PrivateKey,
    p256_key: PrivateKey,
    algorithm: str,
    compression: str,
    threaded: bool,
) -> None:
    key = ed_key if algorithm == "ed25519" else p256_key
    data = built(key=key, compression=compression)
    for chunk in (1 << 20, 65_537, 4096):
        manifest, out = verify_bytes(data, keyring, chunk=chunk, threaded=threaded)
        assert out == image
        assert manifest.image_sha256 == hashlib.sha256(image).hexdigest()
        assert manifest.compression == compression
        assert manifest.key_ids == (key_id_of(key),)


def test_bundle_round_trip_with_the_fallback_zstd_decoder(
    built: Callable[..., bytes], image: bytes, keyring: Keyring
) -> None:
    data = built()
    _, out = verify_bytes(data, keyring, chunk=50_000, zstd_fallback=True)
    assert out == image


def test_bundle_round_trip_byte_by_byte_yields_nothing_before_the_signature(
    built: Callable[..., bytes], image: bytes, keyring: Keyring
) -> None:
    data = built(compression="none")
    verifier = StreamVerifier(keyring)
    preamble_size = parse_header(data[:HEADER_SIZE]).preamble_size
    out = bytearray()
    for i in range(len(data)):
        produced = b"".join(bytes(part) for part in verifier.feed(data[i : i + 1]))
        if i < preamble_size - 1:
            assert produced == b""
            assert verifier.manifest is None
        out += produced
        if i == HEADER_SIZE - 2:
            assert verifier.total_size is None
        if i == HEADER_SIZE - 1:
            assert verifier.total_size == len(data)
            assert verifier.header_size == preamble_size
    verifier.finish()
    assert bytes(out) == image


def test_bundle_output_chunks_are_bounded(tmp_path: Path, ed_key: PrivateKey) -> None:
    from otad.bundle import build_bundle

    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(16 << 20))
    out = tmp_path / "zeros.otab"
    build_bundle(zeros, out, key=ed_key, version="1", compatible="c")
    data = out.read_bytes()
    verifier = StreamVerifier(Keyring.from_keys([ed_key.public_key()]))
    sizes = [len(chunk) for chunk in verifier.feed(data)]  # one feed: 16 MiB from a few KiB
    verifier.finish()
    assert len(data) < 64 << 10
    assert sum(sizes) == 16 << 20
    assert max(sizes) <= 1 << 20


def test_bundle_rotation_signed_by_two_keys_verifies_with_either(
    built: Callable[..., bytes], image: bytes, ed_key: PrivateKey, p256_key: PrivateKey
) -> None:
    data = built(key=[ed_key, p256_key])
    for trusted in (ed_key, p256_key):
        manifest, out = verify_bytes(data, Keyring.from_keys([trusted.public_key()]))
        assert out == image
        assert set(manifest.key_ids) == {key_id_of(ed_key), key_id_of(p256_key)}


def test_bundle_rotation_old_key_revoked_new_key_still_verifies(
    built: Callable[..., bytes], ed_key: PrivateKey, p256_key: PrivateKey
) -> None:
    data = built(key=[ed_key, p256_key])
    keyring = Keyring.from_keys(
        [ed_key.public_key(), p256_key.public_key()], revoked=[key_id_of(ed_key)]
    )
    verifier = StreamVerifier(keyring)
    for _ in verifier.feed(data):
        pass
    verifier.finish()
    assert verifier.signer == key_id_of(p256_key)


def test_bundle_unknown_fields_are_preserved_and_signed(
    built: Callable[..., bytes], keyring: Keyring
) -> None:
    extra = {"release_notes": "fixes", "hw": {"rev": [1, 2]}, "flag": True, "none": None}
    data = built(extra=extra)
    manifest, _ = verify_bytes(data, keyring)
    assert manifest.extra == extra
    assert {k: manifest.to_dict()[k] for k in extra} == extra


def test_bundle_manifest_fields_round_trip(built: Callable[..., bytes], keyring: Keyring) -> None:
    from datetime import UTC, datetime

    expires = datetime(2099, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    data = built(
        version="2.1-rc1", compatible="board-x", security_version=7, expires=expires, device="d9"
    )
    manifest, _ = verify_bytes(data, keyring, VerifyPolicy(device_id="d9"))
    assert manifest.version == "2.1-rc1"
    assert manifest.compatible == "board-x"
    assert manifest.security_version == 7
    assert manifest.expires == expires.replace(microsecond=0)
    assert manifest.device == "d9"
    assert manifest.to_dict()["expires"] == "2099-05-06T07:08:09Z"
    assert parse_preamble(data).manifest() == manifest


def test_bundle_preamble_helpers_learn_sizes_and_verify(
    built: Callable[..., bytes], keyring: Keyring
) -> None:
    data = built()
    header = parse_header(data[:HEADER_SIZE])
    assert header.total_size == len(data)
    preamble = parse_preamble(data[: header.preamble_size])
    manifest, signer = verify_preamble(preamble, keyring, VerifyPolicy())
    assert manifest.size == header.payload_size
    assert signer in manifest.key_ids
    with pytest.raises(Truncated):
        parse_preamble(data[: header.preamble_size - 1])


def test_bundle_build_reports_progress(
    write_image: Callable[[bytes], Path], tmp_path: Path, ed_key: PrivateKey
) -> None:
    from otad.bundle import build_bundle

    source = write_image(make_image(3 << 20, seed=5))
    calls: list[tuple[int, int]] = []
    build_bundle(
        source,
        tmp_path / "p.otab",
        key=ed_key,
        version="1",
        compatible="c",
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls[-1] == (3 << 20, 3 << 20)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp files gone


def test_bundle_keyring_loads_a_directory_with_revocations(
    tmp_path: Path, ed_key: PrivateKey, p256_key: PrivateKey
) -> None:
    add_public_key(tmp_path, ed_key.public_key())
    add_public_key(tmp_path, p256_key.public_key())
    (tmp_path / "revoked").write_text(f"# compromised\n{key_id_of(ed_key)}  # laptop\n\n")
    (tmp_path / "README").write_text("not a key")
    keyring = Keyring.load(tmp_path)
    assert keyring.key_ids == sorted([key_id_of(ed_key), key_id_of(p256_key)])
    assert keyring.revoked == {key_id_of(ed_key)}


def test_bundle_keyring_loads_a_single_pem(tmp_path: Path, ed_key: PrivateKey) -> None:
    pem = tmp_path / "anything.pem"
    pem.write_bytes(public_key_pem(ed_key))
    assert Keyring.load(pem).key_ids == [key_id_of(ed_key)]


@pytest.mark.parametrize(
    "setup",
    ["misnamed", "empty", "bad_revoked", "garbage_pem", "missing", "private_key_as_public"],
)
def test_bundle_keyring_rejects_bad_directories(
    tmp_path: Path, ed_key: PrivateKey, setup: str
) -> None:
    path = tmp_path / "keyring"
    path.mkdir()
    if setup == "misnamed":
        (path / "0123456789abcdef.pem").write_bytes(public_key_pem(ed_key))
    elif setup == "bad_revoked":
        add_public_key(path, ed_key.public_key())
        (path / "revoked").write_text("not-a-key-id\n")
    elif setup == "garbage_pem":
        (path / f"{key_id_of(ed_key)}.pem").write_text("-----BEGIN PUBLIC KEY-----\nxx\n")
    elif setup == "missing":
        path = tmp_path / "nope"
    elif setup == "private_key_as_public":
        (path / f"{key_id_of(ed_key)}.pem").write_bytes(private_key_pem(ed_key))
    with pytest.raises(KeyringError):
        Keyring.load(path)


def test_bundle_private_key_pem_round_trip(tmp_path: Path, p256_key: PrivateKey) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(private_key_pem(p256_key))
    assert key_id_of(load_private_key(path)) == key_id_of(p256_key)
    with pytest.raises(KeyringError):
        load_private_key(tmp_path / "missing.pem")
    (tmp_path / "pub.pem").write_bytes(public_key_pem(p256_key))
    with pytest.raises(KeyringError):
        load_private_key(tmp_path / "pub.pem")


def test_bundle_key_id_is_a_stable_function_of_the_public_key(ed_key: PrivateKey) -> None:
    from cryptography.hazmat.primitives import serialization

    der = ed_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert key_id_of(ed_key) == hashlib.sha256(der).hexdigest()[:16]
    assert key_id_of(ed_key) == key_id_of(ed_key.public_key())


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_bundle_empty_image_round_trips(
    write_image: Callable[[bytes], Path], tmp_path: Path, ed_key: PrivateKey, compression: str
) -> None:
    from otad.bundle import build_bundle

    out = tmp_path / "empty.otab"
    built = build_bundle(
        write_image(b""), out, key=ed_key, version="1", compatible="c", compression=compression
    )
    manifest, image = verify_bytes(out.read_bytes(), Keyring.from_keys([ed_key.public_key()]))
    assert image == b"" and manifest == built and manifest.image_size == 0

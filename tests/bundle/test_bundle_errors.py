"""Each way a bundle can be wrong gives its own error code, at the earliest possible moment."""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from bundle_helpers import Forge, verify_bytes

from otad.bundle import (
    HEADER_SIZE,
    MAGIC,
    Keyring,
    PrivateKey,
    StreamVerifier,
    VerifyPolicy,
    canonical,
)
from otad.bundle.keys import key_id_of
from otad.errors import (
    AlgorithmNotAllowed,
    BadSignature,
    BundleError,
    Downgrade,
    Expired,
    ImageHashMismatch,
    Incompatible,
    MalformedHeader,
    MalformedManifest,
    Oversize,
    PayloadHashMismatch,
    RevokedKey,
    Truncated,
    UnknownKey,
    UnsupportedFormat,
    WrongDevice,
)


def feed_all(data: bytes, keyring: Keyring, policy: VerifyPolicy | None = None) -> StreamVerifier:
    verifier = StreamVerifier(keyring, policy)
    for _ in verifier.feed(data):
        pass
    return verifier


@pytest.mark.parametrize(
    ("policy", "build", "error", "code"),
    [
        (VerifyPolicy(compatible="other-board"), {}, Incompatible, "bundle_incompatible"),
        (
            VerifyPolicy(min_security_version=5),
            {"security_version": 4},
            Downgrade,
            "bundle_downgrade",
        ),
        (
            VerifyPolicy(now=datetime(2030, 1, 1, tzinfo=UTC)),
            {"expires": datetime(2029, 12, 31, 23, 59, 59, tzinfo=UTC)},
            Expired,
            "bundle_expired",
        ),
        (VerifyPolicy(device_id="dev2"), {"device": "dev1"}, WrongDevice, "bundle_wrong_device"),
        (VerifyPolicy(max_image_size=1000), {}, Oversize, "bundle_oversize"),
        (
            VerifyPolicy(algorithms=frozenset({"p256"})),
            {},
            AlgorithmNotAllowed,
            "bundle_algorithm_not_allowed",
        ),
    ],
)
def test_bundle_policy_rejects_before_any_output(
    built: Callable[..., bytes],
    keyring: Keyring,
    policy: VerifyPolicy,
    build: dict[str, object],
    error: type[BundleError],
    code: str,
) -> None:
    data = built(**build)
    verifier = StreamVerifier(keyring, policy)
    with pytest.raises(error) as caught:
        # The whole bundle in one feed: the error must come before a single image byte.
        list(verifier.feed(data))
    assert caught.value.code == code
    assert verifier.manifest is None


def test_bundle_policy_accepts_at_the_limits(built: Callable[..., bytes], keyring: Keyring) -> None:
    expires = datetime(2030, 1, 1, tzinfo=UTC)
    data = built(security_version=5, expires=expires, device="dev1")
    policy = VerifyPolicy(
        compatible="test-board",
        min_security_version=5,
        device_id="dev1",
        now=datetime(2029, 12, 31, 23, 59, 59, tzinfo=UTC),
        max_image_size=300_000,
    )
    manifest, _ = verify_bytes(data, keyring, policy)
    assert manifest.security_version == 5
    with pytest.raises(Expired):
        verify_bytes(data, keyring, VerifyPolicy(now=expires))


def test_bundle_wrong_key_is_unknown_key(
    built: Callable[..., bytes], other_key: PrivateKey, keyring: Keyring
) -> None:
    data = built(key=other_key)
    with pytest.raises(UnknownKey) as caught:
        feed_all(data, keyring)
    assert caught.value.code == "bundle_unknown_key"


def test_bundle_revoked_key(built: Callable[..., bytes], ed_key: PrivateKey) -> None:
    data = built()
    keyring = Keyring.from_keys([ed_key.public_key()], revoked=[key_id_of(ed_key)])
    with pytest.raises(RevokedKey) as caught:
        feed_all(data, keyring)
    assert caught.value.code == "bundle_revoked_key"


def test_bundle_revoked_id_wins_even_without_the_key(
    built: Callable[..., bytes], ed_key: PrivateKey, p256_key: PrivateKey
) -> None:
    data = built()
    keyring = Keyring.from_keys([p256_key.public_key()], revoked=[key_id_of(ed_key)])
    with pytest.raises(RevokedKey):
        feed_all(data, keyring)


def test_bundle_key_claiming_the_wrong_algorithm_is_bad_signature(
    forge: Forge, image: bytes, ed_key: PrivateKey, keyring: Keyring
) -> None:
    forged = forge.bundle(image, [ed_key])
    block = bytearray(forged.signatures)
    at = block.index(b"ed25519")
    block[at - 1 : at + 7] = bytes([4]) + b"p256"
    forged.signatures = bytes(block)
    forged.header = type(forged.header)(1, 0, len(forged.manifest), len(block), len(forged.payload))
    with pytest.raises(BadSignature):
        feed_all(bytes(forged), keyring)


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda d: b"XTAB" + d[4:], MalformedHeader),
        (lambda d: d[:8] + struct.pack(">I", 2) + d[12:], UnsupportedFormat),
        (lambda d: d[:12] + struct.pack(">I", 1) + d[16:], UnsupportedFormat),
        (lambda d: d[:16] + struct.pack(">Q", 1 << 40) + d[24:], MalformedHeader),
        (lambda d: d[:16] + struct.pack(">Q", 0) + d[24:], MalformedHeader),
        (lambda d: d[:24] + struct.pack(">Q", 1 << 20) + d[32:], MalformedHeader),
        (lambda d: d[:32] + struct.pack(">Q", (1 << 64) - 1) + d[40:], MalformedHeader),
    ],
    ids=[
        "bad_magic",
        "future_version",
        "unknown_flags",
        "huge_manifest",
        "empty_manifest",
        "huge_signatures",
        "u64_overflow",
    ],
)
def test_bundle_header_errors(
    built: Callable[..., bytes],
    keyring: Keyring,
    mutate: Callable[[bytes], bytes],
    error: type[BundleError],
) -> None:
    with pytest.raises(error):
        feed_all(mutate(built()), keyring)


def test_bundle_magic_is_png_style() -> None:
    assert MAGIC == b"OTAB\r\n\x1a\n" and HEADER_SIZE == 40


def test_bundle_extra_byte_is_oversize_the_moment_it_arrives(
    built: Callable[..., bytes], keyring: Keyring
) -> None:
    data = built()
    verifier = feed_all(data, keyring)
    with pytest.raises(Oversize):
        verifier.feed(b"\x00")
    with pytest.raises(Oversize):  # dead after a failure
        verifier.finish()


def test_bundle_oversize_chunk_is_refused_before_any_output(
    built: Callable[..., bytes], keyring: Keyring
) -> None:
    data = built(compression="none")
    verifier = StreamVerifier(keyring)
    with pytest.raises(Oversize):
        verifier.feed(data + b"x")


@pytest.mark.parametrize("cut", [0, 1, 39, 40, 41, -1])
def test_bundle_truncated(built: Callable[..., bytes], keyring: Keyring, cut: int) -> None:
    data = built()
    verifier = feed_all(data[:cut], keyring)
    with pytest.raises(Truncated) as caught:
        verifier.finish()
    assert caught.value.code == "bundle_truncated"


def test_bundle_payload_hash_mismatch(
    forge: Forge, image: bytes, ed_key: PrivateKey, keyring: Keyring
) -> None:
    forged = forge.bundle(
        image, [ed_key], compression="none", sha256="0" * 64, image_sha256="0" * 64
    )
    with pytest.raises(PayloadHashMismatch) as caught:
        feed_all(bytes(forged), keyring).finish()
    assert caught.value.code == "bundle_payload_hash_mismatch"


def test_bundle_image_hash_mismatch(
    forge: Forge, image: bytes, ed_key: PrivateKey, keyring: Keyring
) -> None:
    forged = forge.bundle(image, [ed_key], image_sha256="f" * 64)
    with pytest.raises(ImageHashMismatch) as caught:
        feed_all(bytes(forged), keyring).finish()
    assert caught.value.code == "bundle_image_hash_mismatch"


@pytest.mark.parametrize(
    "field", ["sha256", "image_sha256", "size", "image_size", "compatible", "version", "key_ids"]
)
def test_bundle_missing_field_is_an_error_never_a_pass(
    forge: Forge, image: bytes, ed_key: PrivateKey, keyring: Keyring, field: str
) -> None:
    forged = forge.bundle(image, [ed_key], **{field: None})
    with pytest.raises(MalformedManifest):
        feed_all(bytes(forged), keyring)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"sha256": "ABC"}, MalformedManifest),
        ({"image_sha256": "A" * 64}, MalformedManifest),
        ({"size": -1}, MalformedManifest),
        ({"size": True}, MalformedManifest),
        ({"security_version": "1"}, MalformedManifest),
        ({"created": "2026-01-01"}, MalformedManifest),
        ({"expires": "2026-13-01T00:00:00Z"}, MalformedManifest),
        ({"compatible": ""}, MalformedManifest),
        ({"version": "a\nb"}, MalformedManifest),
        ({"key_ids": []}, MalformedManifest),
        ({"compression": "xz"}, UnsupportedFormat),
        ({"format_version": 2}, UnsupportedFormat),
    ],
)
def test_bundle_bad_manifest_values(
    forge: Forge,
    image: bytes,
    ed_key: PrivateKey,
    keyring: Keyring,
    overrides: dict[str, object],
    error: type[BundleError],
) -> None:
    forged = forge.bundle(image, [ed_key], **overrides)
    with pytest.raises(error):
        feed_all(bytes(forged), keyring)


@pytest.mark.parametrize(
    "text",
    [
        b'{"a":1, "b":2}',  # whitespace
        b'{"b":1,"a":2}',  # unsorted
        b'{"a":1,"a":1}',  # duplicate key
        b'{"a":1.5}',  # float
        b'{"a":NaN}',
        b'{"a":"\\u00e9"}',  # escaped where canonical is raw UTF-8
        b"[1,2]",  # not an object
        b'{"a":"\xff"}',  # not UTF-8
        b'{"a":"\\ud800"}',  # lone surrogate
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_bundle_non_canonical_manifest_is_refused(
    forge: Forge, image: bytes, ed_key: PrivateKey, keyring: Keyring, text: bytes
) -> None:
    forged = forge.bundle(image, [ed_key], manifest_bytes=text)
    with pytest.raises(MalformedManifest):
        feed_all(bytes(forged), keyring)


def test_bundle_canonical_encoding_is_sorted_compact_utf8() -> None:
    assert canonical.encode({"b": [1, {"d": "é", "c": None}], "a": True}) == (
        '{"a":true,"b":[1,{"c":null,"d":"é"}]}'.encode()
    )


def test_bundle_signer_not_listed_in_manifest_is_bad_signature(
    forge: Forge, image: bytes, ed_key: PrivateKey, p256_key: PrivateKey, keyring: Keyring
) -> None:
    forged = forge.bundle(image, [ed_key], key_ids=[key_id_of(p256_key)])
    with pytest.raises(BadSignature):
        feed_all(bytes(forged), keyring)


def test_bundle_feed_after_finish_and_unconsumed_output_are_programming_errors(
    built: Callable[..., bytes], keyring: Keyring
) -> None:
    data = built()
    verifier = StreamVerifier(keyring)
    verifier.feed(data)  # output not consumed
    with pytest.raises(RuntimeError):
        verifier.feed(b"")
    with pytest.raises(RuntimeError):
        verifier.finish()
    verifier = feed_all(data, keyring)
    verifier.finish()
    with pytest.raises(RuntimeError):
        verifier.feed(b"")

"""Verification keys and the libcrypto signature checks, against cryptography as the reference.

The agent checks signatures through the libcrypto ``ssl`` uses (otad.bundle.openssl) and only
falls back to cryptography; both must give the same answer for every signature, valid, altered
or malformed, and keys must parse to the same bytes and key ids cryptography gives them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from bundle_helpers import Forge, make_image, verify_bytes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import example, given, settings
from hypothesis import strategies as st

from otad.bundle import (
    Keyring,
    PublicKey,
    generate_private_key,
    key_id_of,
    load_public_key,
    openssl,
    public_key_pem,
)
from otad.bundle import keys as keys_module
from otad.bundle.signing import CryptographyBackend, sign
from otad.errors import BadSignature, KeyringError

_PRIVATE = {"ed25519": generate_private_key("ed25519"), "p256": generate_private_key("p256")}
_SPKI = {
    alg: key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for alg, key in _PRIVATE.items()
}
_LIBCRYPTO = openssl.default()
_REFERENCE = CryptographyBackend()
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_ED25519_ORDER = 2**252 + 27742317777372542558539258760110146988


def test_bundle_keys_libcrypto_binding_loads_here() -> None:
    # the machine's Python links libssl/libcrypto 3.x: the lean path must be the one in use
    assert _LIBCRYPTO is not None
    assert _LIBCRYPTO.answers_known_vectors()


def both(algorithm: str, spki: bytes, signature: bytes, message: bytes) -> bool:
    assert _LIBCRYPTO is not None
    lean = _LIBCRYPTO.verify(algorithm, spki, signature, message)
    reference = _REFERENCE.verify(algorithm, spki, signature, message)
    assert lean == reference, (algorithm, signature.hex(), message.hex())
    return lean


@settings(max_examples=150, deadline=None)
@given(
    algorithm=st.sampled_from(sorted(_PRIVATE)),
    message=st.binary(max_size=300),
    flip=st.integers(min_value=0, max_value=10_000),
    where=st.sampled_from(["signature", "message", "none"]),
)
def test_bundle_keys_libcrypto_and_cryptography_agree_on_signatures(
    algorithm: str, message: bytes, flip: int, where: str
) -> None:
    signature = sign(_PRIVATE[algorithm], message)
    if where == "signature":
        bit = flip % (len(signature) * 8)
        signature = bytearray(signature)
        signature[bit // 8] ^= 1 << (bit % 8)
        signature = bytes(signature)
    elif where == "message":
        message = message + b"\x00" if not message else bytes([message[0] ^ 1]) + message[1:]
    assert both(algorithm, _SPKI[algorithm], signature, message) is (where == "none")


@settings(max_examples=100, deadline=None)
@given(algorithm=st.sampled_from(sorted(_PRIVATE)), junk=st.binary(max_size=140))
def test_bundle_keys_garbage_signatures_are_refused_by_both(algorithm: str, junk: bytes) -> None:
    assert both(algorithm, _SPKI[algorithm], junk, b"message") is False


def _der_integer(value: int, pad: bool = False) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")  # room for a sign bit
    if len(body) > 1 and body[0] == 0 and not body[1] & 0x80:
        body = body[1:]  # minimal: a leading zero only where the top bit is set
    if pad:
        body = b"\x00" + body  # one more than DER allows
    return b"\x02" + bytes([len(body)]) + body


def _der_signature(r: int, s: int, pad_r: bool = False) -> bytes:
    inner = _der_integer(r, pad_r) + _der_integer(s)
    return b"\x30" + bytes([len(inner)]) + inner


def test_bundle_keys_ecdsa_encodings_are_judged_alike() -> None:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    message = b"manifest bytes"
    signature = sign(_PRIVATE["p256"], message)
    r, s = decode_dss_signature(signature)
    spki = _SPKI["p256"]
    assert both("p256", spki, _der_signature(r, s), message)
    # (r, n - s) is the same signature mathematically: neither library enforces low S
    assert both("p256", spki, _der_signature(r, _P256_ORDER - s), message)
    # a needless leading zero, or a long-form length, is BER, not DER: refused
    assert not both("p256", spki, _der_signature(r, s, pad_r=True), message)
    long_form = b"\x30\x81" + signature[1:]
    assert not both("p256", spki, long_form, message)
    assert not both("p256", spki, signature + b"\x00", message)


def test_bundle_keys_ed25519_non_canonical_s_is_refused() -> None:
    message = b"manifest bytes"
    signature = sign(_PRIVATE["ed25519"], message)
    s = int.from_bytes(signature[32:], "little")
    malleated = signature[:32] + (s + _ED25519_ORDER).to_bytes(32, "little")
    assert both("ed25519", _SPKI["ed25519"], signature, message)
    assert not both("ed25519", _SPKI["ed25519"], malleated, message)


def test_bundle_keys_a_refused_signature_leaves_no_openssl_error_behind() -> None:
    import _ssl

    lib = ctypes.CDLL(_ssl.__file__)
    peek = lib.ERR_peek_error
    peek.restype = ctypes.c_ulong
    peek.argtypes = []
    assert _LIBCRYPTO is not None
    off_curve = _off_curve_p256()  # d2i_PUBKEY queues an error for it
    assert not _LIBCRYPTO.verify("p256", off_curve, sign(_PRIVATE["p256"], b"m"), b"m")
    assert peek() == 0
    assert not _LIBCRYPTO.accepts("p256", off_curve)
    assert peek() == 0


@settings(max_examples=20, deadline=None)
@given(algorithm=st.sampled_from(sorted(_PRIVATE)))
def test_bundle_keys_parse_to_cryptographys_bytes_ids_and_pem(algorithm: str) -> None:
    private = generate_private_key(algorithm)
    public = private.public_key()
    key = PublicKey.from_pem(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert key.algorithm == algorithm
    assert key.spki == public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert key.pem() == public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert key.key_id == key_id_of(private) == key_id_of(public)
    assert key == PublicKey(key.spki) and hash(key) == hash(PublicKey(key.spki))
    assert key.verify(sign(private, b"m"), b"m")


_ED25519_PREFIX = bytes.fromhex("302a300506032b6570032100")
_SMALL_8 = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")
_P256_P = 2**256 - 2**224 + 2**192 + 2**96 - 1


def _compressed_p256_spki(key: object = None, x: int | None = None) -> bytes:
    public = (key or _PRIVATE["p256"]).public_key()  # type: ignore[attr-defined]
    point = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    if x is not None:
        point = b"\x02" + x.to_bytes(32, "big")
    return bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200") + point


def _off_curve_x() -> int:
    # an x with no y on P-256: x^3 - 3x + b is not a square (about half of all x)
    b = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
    x = 1
    while pow((x**3 - 3 * x + b) % _P256_P, (_P256_P - 1) // 2, _P256_P) == 1:
        x += 1
    return x


def _pem(der: bytes, label: str = "PUBLIC KEY") -> bytes:
    import base64

    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN {label}-----\n".encode() + lines + f"\n-----END {label}-----\n".encode()


def _off_curve_p256() -> bytes:
    spki = bytearray(_SPKI["p256"])
    spki[-1] ^= 1  # y no longer matches x
    return bytes(spki)


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        (lambda: _pem(_compressed_p256_spki(x=_off_curve_x())), "not a valid point"),
        (lambda: _pem(_ED25519_PREFIX + b"\x01" + bytes(31)), "small order"),
        (lambda: _pem(_ED25519_PREFIX + b"\xc7\x17j" + _SMALL_8[3:]), "small order"),
        (lambda: _pem(_ED25519_PREFIX + b"\xed" + b"\xff" * 30 + b"\x7f"), "not canonically"),
        (
            lambda: (
                _pem(_SPKI["ed25519"])
                + _PRIVATE["ed25519"].private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            ),
            "a private key where only a public key belongs",
        ),
        (
            lambda: (
                ec.generate_private_key(ec.SECP384R1())
                .public_key()
                .public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            ),
            "not an Ed25519 or P-256 public key",
        ),
        (
            lambda: (
                rsa.generate_private_key(65537, 2048)
                .public_key()
                .public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            ),
            "not an Ed25519 or P-256 public key",
        ),
        (lambda: _pem(_off_curve_p256()), "not a valid point"),
        (
            lambda: _PRIVATE["ed25519"].private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "a private key where only a public key belongs",
        ),
        (lambda: _pem(_SPKI["ed25519"]) * 2, "expected one PUBLIC KEY PEM block, found 2"),
        (lambda: b"-----BEGIN PUBLIC KEY-----\nab=c\n-----END PUBLIC KEY-----\n", "not base64"),
        (lambda: b"", "found 0"),
    ],
    ids=[
        "compressed-off-curve",
        "ed25519-identity",
        "ed25519-order-8",
        "ed25519-non-canonical",
        "public-and-private",
        "p384",
        "rsa",
        "off-curve",
        "private",
        "two-blocks",
        "base64",
        "empty",
    ],
)
def test_bundle_keys_unusable_public_keys_are_refused_by_name(
    tmp_path: Path, pem: object, message: str
) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(pem())  # type: ignore[operator]
    with pytest.raises(KeyringError, match=message) as raised:
        load_public_key(path)
    assert str(path) in str(raised.value)


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_bundle_keys_compressed_p256_keys_load_under_the_signers_key_id(seed: int) -> None:
    del seed  # each example: a fresh key, so both parities of y come up
    private = generate_private_key("p256")
    key = PublicKey.from_pem(_pem(_compressed_p256_spki(private)))
    assert key.spki == PublicKey.from_pem(public_key_pem(private)).spki
    assert key.key_id == key_id_of(private)
    assert key.verify(sign(private, b"m"), b"m")


def test_bundle_keys_why_small_order_ed25519_keys_are_refused() -> None:
    # OpenSSL (like cryptography) takes the identity point as a key, and then one signature
    # verifies for every message: a keyring holding it would accept any bundle.
    assert _LIBCRYPTO is not None
    identity = _ED25519_PREFIX + b"\x01" + bytes(31)
    universal = b"\x01" + bytes(63)
    for message in (b"", b"any bundle", os.urandom(64)):
        assert _LIBCRYPTO.verify("ed25519", identity, universal, message)
    with pytest.raises(KeyringError, match="small order"):
        PublicKey(identity)


def test_bundle_keys_text_around_the_pem_block_is_ignored() -> None:
    text = b"# release key 2026\n" + _pem(_SPKI["ed25519"]) + b"trailing note\n"
    assert PublicKey.from_pem(text).spki == _SPKI["ed25519"]


@settings(max_examples=200, deadline=None)
@given(
    algorithm=st.sampled_from(sorted(_PRIVATE)),
    index=st.integers(min_value=0, max_value=90),
    xor=st.integers(min_value=1, max_value=255),
)
@example(algorithm="p256", index=25, xor=1)  # the BIT STRING's unused-bits count
def test_bundle_keys_altered_key_bytes_are_refused_or_verify_nothing(
    algorithm: str, index: int, xor: int
) -> None:
    spki = bytearray(_SPKI[algorithm])
    spki[index % len(spki)] ^= xor
    signature = sign(_PRIVATE[algorithm], b"m")
    try:
        key = PublicKey(bytes(spki))
    except KeyringError:
        if _REFERENCE.verify(algorithm, bytes(spki), signature, b"m"):
            # cryptography reads some non-DER encodings of the same key (a BIT STRING with
            # unused bits set): refused here, and the key it reads is the original one
            reread = serialization.load_der_public_key(bytes(spki)).public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            assert reread == _SPKI[algorithm]
        return
    # only the key material changed: another key, which the signature does not match
    assert key.key_id != key_id_of(_PRIVATE[algorithm])
    assert not key.verify(signature, b"m")
    assert not _REFERENCE.verify(key.algorithm, key.spki, signature, b"m")


def test_bundle_keys_a_library_without_the_symbols_is_not_used() -> None:
    libc = ctypes.util.find_library("c")
    assert libc is not None
    assert openssl.load(libc) is None
    assert openssl.load("/nonexistent/libcrypto.so") is None


def test_bundle_keys_without_libcrypto_bundles_verify_through_cryptography(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a Python without a usable libcrypto cannot exist here; the selection is what is tested
    monkeypatch.setattr(openssl, "default", lambda: None)
    assert isinstance(keys_module._backend(), CryptographyBackend)
    private = _PRIVATE["p256"]
    keyring = Keyring.from_keys([private.public_key()])
    image = make_image(70_000, seed=5)
    verify_bytes(bytes(Forge().bundle(image, [private])), keyring)
    forged = Forge().bundle(image, [private], sign_message=lambda m, *_: m + b"!")
    with pytest.raises(BadSignature):
        verify_bytes(bytes(forged), keyring)


def test_bundle_keys_verifying_a_bundle_never_imports_cryptography(tmp_path: Path) -> None:
    private = _PRIVATE["ed25519"]
    keyring_dir = tmp_path / "keyring"
    keyring_dir.mkdir()
    (keyring_dir / f"{key_id_of(private)}.pem").write_bytes(PublicKey(_SPKI["ed25519"]).pem())
    bundle = tmp_path / "b.otb"
    bundle.write_bytes(bytes(Forge().bundle(make_image(50_000, seed=3), [private])))
    script = textwrap.dedent(
        f"""
        import sys
        import otad.agent.daemon, otad.agent.update
        from pathlib import Path
        from otad.bundle import Keyring, StreamVerifier
        verifier = StreamVerifier(Keyring.load(Path({str(keyring_dir)!r})), threaded=False)
        data = Path({str(bundle)!r}).read_bytes()
        for _ in verifier.feed(data):
            pass
        print(verifier.finish().version, verifier.signer)
        assert "cryptography" not in sys.modules, sorted(m for m in sys.modules if "crypto" in m)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].split() == ["1.0", key_id_of(private)]


@pytest.mark.parametrize(
    ("algorithm", "genpkey", "sign_args"),
    [
        ("ed25519", ["-algorithm", "ED25519"], ["pkeyutl", "-sign", "-rawin"]),
        (
            "p256",
            ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            ["dgst", "-sha256", "-sign"],
        ),
    ],
)
def test_bundle_keys_openssl_cli_keys_and_signatures_verify(
    tmp_path: Path, algorithm: str, genpkey: list[str], sign_args: list[str]
) -> None:
    def openssl_cli(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    key, pub, message, signature = (tmp_path / n for n in ("k.pem", "p.pem", "m", "s"))
    message.write_bytes(b"otad manifest bytes " * 40)
    openssl_cli("genpkey", *genpkey, "-out", str(key))
    openssl_cli("pkey", "-in", str(key), "-pubout", "-out", str(pub))
    if sign_args[0] == "pkeyutl":
        openssl_cli(*sign_args, "-inkey", str(key), "-in", str(message), "-out", str(signature))
    else:
        openssl_cli(*sign_args, str(key), "-out", str(signature), str(message))
    public = load_public_key(pub)
    assert public.algorithm == algorithm
    assert public.verify(signature.read_bytes(), message.read_bytes())
    assert not public.verify(signature.read_bytes(), message.read_bytes() + b"!")
    assert both(algorithm, public.spki, signature.read_bytes(), message.read_bytes())


def test_bundle_keys_without_libcrypto_or_cryptography_the_error_says_so(tmp_path: Path) -> None:
    pem = tmp_path / "key.pem"
    pem.write_bytes(PublicKey(_SPKI["ed25519"]).pem())
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["cryptography"] = None  # not installed
        from pathlib import Path
        from otad.bundle import openssl
        from otad.bundle.keys import load_public_key
        from otad.errors import KeyringError
        openssl.default = lambda: None  # no usable libcrypto either
        try:
            load_public_key(Path({str(pem)!r}))
        except KeyringError as exc:
            print(exc.code, exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"keyring_invalid bundle: cannot load public key {pem}:")
    assert "cannot check signatures: no usable libcrypto" in done.stdout
    assert "cryptography package is not installed" in done.stdout

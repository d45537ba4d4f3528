"""Signature checks through the libcrypto that Python's own ``ssl`` module is linked against.

Why not the cryptography package on this path: importing it maps and relocates its 14 MiB Rust
extension, ~7.5 MiB resident before the first signature and ~9 MiB after, a fifth of what an
installing agent may use, for one check per bundle. Every agent already has libcrypto mapped
(TLS to the broker and the store), so the same OpenSSL calls through ctypes add ~0.3 MiB.
cryptography stays the library for keys and signing (``otad bundle keygen|create``, the cloud),
verifies where this binding cannot load (:func:`default` returns None), and the tests check that
both give the same answer for valid, altered and malformed signatures.

Two one-shot EVP operations, in OpenSSL since 1.1.1 (the oldest Python 3.10+ accepts):
Ed25519 (``EVP_PKEY_new_raw_public_key`` + ``EVP_DigestVerify``) and ECDSA P-256 with SHA-256
(``d2i_PUBKEY``, which refuses a point off the curve, + ``EVP_DigestVerify``, which refuses
non-canonical DER signatures). Keys come in as the fixed SubjectPublicKeyInfo forms
:mod:`otad.bundle.keys` accepts. A binding whose known-answer checks fail (a library with other
prototypes under these names) is not used.
"""

from __future__ import annotations

import ctypes
import functools
from ctypes import POINTER, c_char_p, c_int, c_long, c_size_t, c_void_p
from typing import Any, Final

__layer__ = "pure"

ED25519: Final = "ed25519"
P256: Final = "p256"

_EVP_PKEY_EC: Final = 408
_EVP_PKEY_ED25519: Final = 1087
# The one SubjectPublicKeyInfo encoding of each algorithm's keys: these bytes, then the key
# (Ed25519: 32 bytes; P-256: x and y of an uncompressed point, 32 bytes each).
ED25519_SPKI_PREFIX: Final = bytes.fromhex("302a300506032b6570032100")
P256_SPKI_PREFIX: Final = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d03010703420004")

# Known answers, checked once before the binding is trusted: RFC 8032 section 7.1 test 1, and a
# P-256 signature made with cryptography.
_ED25519_KAT: Final = (
    ED25519_SPKI_PREFIX
    + bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"),
    bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    ),
    b"",
)
_P256_KAT: Final = (
    bytes.fromhex(
        "3059301306072a8648ce3d020106082a8648ce3d03010703420004538cc29fbcc0f76087e4e70d9db7fd78"
        "b802ce3d401dcf4f4675ebee7b96853432ecfdeed9e656076210067ffd33dacb5b22683c7f69a059d0beff"
        "a235f09a90"
    ),
    bytes.fromhex(
        "304402205636b0f7d7a8ef100be6571f1f8eb3db4b8627e707167eb464e9f978f662d77702206e36a150"
        "0a3258858d5c0a01c5f415fee8ddaed040273569dd8070dee285eeee"
    ),
    b"otad libcrypto self-test",
)


class LibCrypto:
    """The handful of libcrypto functions a signature check needs, with their C prototypes.

    Raises AttributeError when the library lacks one of them (OpenSSL before 1.1.1, or not
    libcrypto at all). Every call leaves this thread's OpenSSL error queue empty, so a refused
    signature cannot surface later in an unrelated ``ssl`` error message (or sway a later
    decode: with errors left queued, OpenSSL 3 judged the ECDSA cases in the tests otherwise).
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._new_raw_public_key = _bind(
            lib, "EVP_PKEY_new_raw_public_key", c_void_p, c_int, c_void_p, c_char_p, c_size_t
        )
        self._d2i_pubkey = _bind(lib, "d2i_PUBKEY", c_void_p, c_void_p, POINTER(c_char_p), c_long)
        base_id = "EVP_PKEY_get_base_id" if hasattr(lib, "EVP_PKEY_get_base_id") else ""
        self._base_id = _bind(lib, base_id or "EVP_PKEY_base_id", c_int, c_void_p)
        self._pkey_free = _bind(lib, "EVP_PKEY_free", None, c_void_p)
        self._ctx_new = _bind(lib, "EVP_MD_CTX_new", c_void_p)
        self._ctx_free = _bind(lib, "EVP_MD_CTX_free", None, c_void_p)
        self._sha256 = _bind(lib, "EVP_sha256", c_void_p)
        self._verify_init = _bind(
            lib, "EVP_DigestVerifyInit", c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p
        )
        self._verify = _bind(
            lib, "EVP_DigestVerify", c_int, c_void_p, c_char_p, c_size_t, c_char_p, c_size_t
        )
        self._clear_errors = _bind(lib, "ERR_clear_error", None)

    def accepts(self, algorithm: str, spki: bytes) -> bool:
        """Whether OpenSSL takes ``spki`` as a key of ``algorithm`` (a P-256 point on the curve)."""
        pkey = self._load(algorithm, spki)
        if pkey:
            self._pkey_free(pkey)
        self._clear_errors()
        return bool(pkey)

    def verify(self, algorithm: str, spki: bytes, signature: bytes, message: bytes) -> bool:
        """True only when OpenSSL reports ``signature`` valid for ``message`` under the key."""
        signature, message = bytes(signature), bytes(message)  # c_char_p takes bytes only
        pkey = self._load(algorithm, spki)
        ctx = self._ctx_new() if pkey else None
        try:
            if not ctx:
                return False
            digest = self._sha256() if algorithm == P256 else None
            if self._verify_init(ctx, None, digest, None, pkey) != 1:
                return False
            ok = self._verify(ctx, signature, len(signature), message, len(message))
            return bool(ok == 1)
        finally:
            if ctx:
                self._ctx_free(ctx)
            if pkey:
                self._pkey_free(pkey)
            self._clear_errors()

    def answers_known_vectors(self) -> bool:
        """The binding's own check: known-good signatures pass, one altered bit fails."""
        for algorithm, (spki, signature, message) in ((ED25519, _ED25519_KAT), (P256, _P256_KAT)):
            altered = signature[:-1] + bytes([signature[-1] ^ 1])
            if not self.verify(algorithm, spki, signature, message):
                return False
            if self.verify(algorithm, spki, altered, message):
                return False
        return True

    def _load(self, algorithm: str, spki: bytes) -> int | None:
        # OpenSSL 3's decoders consult the error queue; start from an empty one
        self._clear_errors()
        if algorithm == ED25519:
            if not spki.startswith(ED25519_SPKI_PREFIX) or len(spki) != 44:
                return None
            pkey: int | None = self._new_raw_public_key(_EVP_PKEY_ED25519, None, spki[12:], 32)
            return pkey
        if algorithm != P256 or not spki.startswith(P256_SPKI_PREFIX) or len(spki) != 91:
            return None
        cursor = c_char_p(spki)
        pkey = self._d2i_pubkey(None, ctypes.byref(cursor), len(spki))
        if pkey and self._base_id(pkey) != _EVP_PKEY_EC:
            self._pkey_free(pkey)
            return None
        return pkey


def _bind(lib: ctypes.CDLL, name: str, restype: type | None, *argtypes: type) -> Any:
    function = getattr(lib, name)
    function.restype = restype
    function.argtypes = argtypes
    return function


def load(path: str | None) -> LibCrypto | None:
    """A checked binding to the library at ``path`` (None: this process's global symbols), or
    None when it is not a libcrypto this module can use."""
    try:
        binding = LibCrypto(ctypes.CDLL(path))
    except (OSError, AttributeError):
        return None
    return binding if binding.answers_known_vectors() else None


@functools.cache
def default() -> LibCrypto | None:
    """The libcrypto ``ssl`` uses (already mapped, so loading it costs nothing), else the
    system's libcrypto (a Python with OpenSSL linked into _ssl and its symbols hidden), or None.
    """
    try:
        import _ssl

        path: str | None = _ssl.__file__  # libcrypto's symbols resolve through _ssl's needs
    except (ImportError, AttributeError):  # no ssl, or _ssl built into the interpreter
        path = None
    binding = load(path)
    if binding is None:
        import ctypes.util

        system = ctypes.util.find_library("crypto")
        binding = load(system) if system is not None else None
    return binding

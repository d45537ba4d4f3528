"""The signed otad bundle format: build, sign, inspect, streaming verify.

Layout (``docs/bundle-format.md`` has the byte-level table)::

    header (40 bytes) | manifest (canonical JSON) | signature block | payload

Modules, one job each: :mod:`.header` (fixed header), :mod:`.canonical` (the one JSON encoding),
:mod:`.manifest` (fields and validation), :mod:`.signatures` (signature block), :mod:`.keys`
(Ed25519 / P-256 verification keys and key ids), :mod:`.openssl` (their signature checks),
:mod:`.signing` (private keys and signing, with cryptography), :mod:`.keyring` (trusted and
revoked keys), :mod:`.policy`
(compatible, anti-rollback, expiry, device), :mod:`.preamble` (parse and authenticate the part
before the payload), :mod:`.decode` (bounded decompression), :mod:`.digest` (threaded SHA-256),
:mod:`.verifier` (the sans-I/O streaming verifier) and :mod:`.builder` (streaming builder).

Pure in the layer sense: no network, no event loop, no global state. The only file access is on
paths handed to :meth:`Keyring.load`, :func:`add_public_key` and :func:`build_bundle`.
"""

from typing import TYPE_CHECKING

from otad.bundle.builder import build_bundle
from otad.bundle.header import FORMAT_VERSION, HEADER_SIZE, MAGIC, Header, parse_header
from otad.bundle.keyring import Keyring, add_public_key
from otad.bundle.keys import (
    ALGORITHMS,
    PublicKey,
    algorithm_of,
    key_id_of,
    load_public_key,
    public_key_pem,
)
from otad.bundle.manifest import Manifest
from otad.bundle.policy import VerifyPolicy
from otad.bundle.preamble import Preamble, parse_preamble, read_preamble, verify_preamble
from otad.bundle.signatures import SignatureEntry
from otad.bundle.verifier import StreamVerifier

if TYPE_CHECKING:
    from otad.bundle.signing import (
        PrivateKey,
        generate_private_key,
        load_private_key,
        private_key_pem,
    )

__layer__ = "pure"

# Made on first use: they import cryptography (~9 MiB resident), which verifying does not need.
_SIGNING = frozenset({"PrivateKey", "generate_private_key", "load_private_key", "private_key_pem"})


def __getattr__(name: str) -> object:
    if name not in _SIGNING:
        raise AttributeError(f"module 'otad.bundle' has no attribute {name!r}")
    from otad.bundle import signing

    return getattr(signing, name)


__all__ = [
    "ALGORITHMS",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "Header",
    "Keyring",
    "Manifest",
    "Preamble",
    "PrivateKey",
    "PublicKey",
    "SignatureEntry",
    "StreamVerifier",
    "VerifyPolicy",
    "add_public_key",
    "algorithm_of",
    "build_bundle",
    "generate_private_key",
    "key_id_of",
    "load_private_key",
    "load_public_key",
    "parse_header",
    "parse_preamble",
    "private_key_pem",
    "public_key_pem",
    "read_preamble",
    "verify_preamble",
]

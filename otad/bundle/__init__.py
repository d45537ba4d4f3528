"""The signed otad bundle format: build, sign, inspect, streaming verify.

Layout (``docs/bundle-format.md`` has the byte-level table)::

    header (40 bytes) | manifest (canonical JSON) | signature block | payload

Modules, one job each: :mod:`.header` (fixed header), :mod:`.canonical` (the one JSON encoding),
:mod:`.manifest` (fields and validation), :mod:`.signatures` (signature block), :mod:`.keys`
(Ed25519 / P-256 keys and key ids), :mod:`.keyring` (trusted and revoked keys), :mod:`.policy`
(compatible, anti-rollback, expiry, device), :mod:`.preamble` (parse and authenticate the part
before the payload), :mod:`.decode` (bounded decompression), :mod:`.digest` (threaded SHA-256),
:mod:`.verifier` (the sans-I/O streaming verifier) and :mod:`.builder` (streaming builder).

Pure in the layer sense: no network, no event loop, no global state. The only file access is on
paths handed to :meth:`Keyring.load`, :func:`add_public_key` and :func:`build_bundle`.
"""

from otad.bundle.builder import build_bundle
from otad.bundle.header import FORMAT_VERSION, HEADER_SIZE, MAGIC, Header, parse_header
from otad.bundle.keyring import Keyring, add_public_key
from otad.bundle.keys import (
    ALGORITHMS,
    PrivateKey,
    PublicKey,
    algorithm_of,
    generate_private_key,
    key_id_of,
    load_private_key,
    load_public_key,
    private_key_pem,
    public_key_pem,
)
from otad.bundle.manifest import Manifest
from otad.bundle.policy import VerifyPolicy
from otad.bundle.preamble import Preamble, parse_preamble, read_preamble, verify_preamble
from otad.bundle.signatures import SignatureEntry
from otad.bundle.verifier import StreamVerifier

__layer__ = "pure"

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

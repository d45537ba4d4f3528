"""The sans-I/O streaming verifier: bundle bytes in, verified image bytes out.

The caller owns all I/O: it feeds whatever chunks it has, in order, and writes the image chunks
it gets back. Nothing comes back before the preamble is authenticated and the policy passed.
Every check that can fail early fails early (a byte past the declared payload size is refused the
moment it arrives; an image growing past its declared size is refused the moment it does); the
hashes, which need every byte, are compared in :meth:`StreamVerifier.finish`. Once an error was
raised the verifier is dead: every later call raises the same kind of error again.

Memory is constant: the preamble is bounded by the header limits, payload input is held only
until the caller drains the output of the same ``feed``, and output comes in chunks of at most
256 KiB (see :mod:`otad.bundle.decode`).
"""

from __future__ import annotations

from collections.abc import Iterator

import structlog

from otad.bundle.decode import Decoder, make_decoder
from otad.bundle.digest import Digests
from otad.bundle.header import HEADER_SIZE, Header, parse_header
from otad.bundle.keyring import Keyring
from otad.bundle.manifest import Manifest
from otad.bundle.policy import VerifyPolicy
from otad.bundle.preamble import parse_preamble, verify_preamble
from otad.errors import (
    BundleError,
    DecompressFailed,
    ImageHashMismatch,
    Oversize,
    PayloadHashMismatch,
    Truncated,
)

__layer__ = "pure"

Buffer = bytes | bytearray | memoryview

log = structlog.get_logger(__name__)

_PAYLOAD, _IMAGE = 0, 1


class StreamVerifier:
    """Verify one bundle while it streams past; see the module docstring.

    ``threaded`` computes both SHA-256 digests on a helper thread, so hashing and decompression
    use two cores; the result is the same either way.
    """

    def __init__(
        self,
        keyring: Keyring,
        policy: VerifyPolicy | None = None,
        *,
        threaded: bool = True,
        zstd_fallback: bool = False,
    ) -> None:
        self._keyring = keyring
        self._policy = policy if policy is not None else VerifyPolicy()
        self._zstd_fallback = zstd_fallback
        self._preamble = bytearray()
        self._header: Header | None = None
        self.manifest: Manifest | None = None
        self.signer: str | None = None
        self._decoder: Decoder | None = None
        self._digests = Digests(2, threaded=threaded)
        self._hash_image = False  # compression "none": the image digest is the payload digest
        self._payload_received = 0
        self._image_produced = 0
        self._failure: BundleError | None = None
        self._finished = False

    # --- what is known so far ---------------------------------------------------------------

    @property
    def header_size(self) -> int | None:
        """Bytes before the payload (header, manifest, signatures), once the header is read."""
        return None if self._header is None else self._header.preamble_size

    @property
    def total_size(self) -> int | None:
        """The whole bundle's size in bytes, once the header is read."""
        return None if self._header is None else self._header.total_size

    @property
    def payload_received(self) -> int:
        return self._payload_received

    @property
    def image_produced(self) -> int:
        return self._image_produced

    # --- streaming ----------------------------------------------------------------------------

    def feed(self, chunk: Buffer) -> Iterator[bytes]:
        """Take the next bundle bytes; returns an iterator over the image bytes they release.

        Preamble and payload checks run before this returns (errors raise here); decompression
        runs as the returned iterator is consumed, one chunk of at most 256 KiB at a time, so a
        highly compressed payload never needs more memory (``compression: none`` hands back
        the fed bytes as they are). Consume the iterator before the next
        ``feed`` or ``finish``: leaving output behind is a programming error (RuntimeError).
        """
        self._check_alive()
        if self._decoder is not None and self._decoder.pending:
            raise RuntimeError("StreamVerifier: the output of the previous feed() was not consumed")
        try:
            self._accept(chunk)
        except BundleError as exc:
            raise self._fail(exc) from None
        return self._drain()

    def finish(self) -> Manifest:
        """Call after the last byte: checks completeness, sizes and both hashes."""
        self._check_alive()
        if self._decoder is not None and self._decoder.pending:
            raise RuntimeError("StreamVerifier: the output of the last feed() was not consumed")
        try:
            manifest = self._complete()
        except BundleError as exc:
            raise self._fail(exc) from None
        self._finished = True
        return manifest

    def close(self) -> None:
        """Release the helper thread early (e.g. when a download is abandoned)."""
        self._digests.close()

    # --- internals ------------------------------------------------------------------------------

    def _accept(self, chunk: Buffer) -> None:
        view = memoryview(chunk).cast("B")
        if self.manifest is None:
            view = self._accept_preamble(view)
            if self.manifest is None or not len(view):
                return
        manifest, decoder = self.manifest, self._decoder
        if decoder is None:  # pragma: no cover - set together with the manifest
            raise RuntimeError("StreamVerifier: manifest without a decoder")
        room = manifest.size - self._payload_received
        if len(view) > room:
            raise Oversize(
                f"bundle: payload exceeds its declared {manifest.size} bytes",
                declared=manifest.size,
            )
        # The decoder keeps the input until it is drained: hold an immutable copy so a caller
        # reusing its buffer cannot change bytes after they were hashed.
        data = chunk if type(chunk) is bytes and len(chunk) == len(view) else bytes(view)
        self._payload_received += len(data)
        self._digests.update(_PAYLOAD, data)
        decoder.push(data)

    def _accept_preamble(self, view: memoryview) -> memoryview:
        if self._header is None:
            take = min(HEADER_SIZE - len(self._preamble), len(view))
            self._preamble += view[:take]
            view = view[take:]
            if len(self._preamble) < HEADER_SIZE:
                return view
            self._header = parse_header(self._preamble)
        take = min(self._header.preamble_size - len(self._preamble), len(view))
        self._preamble += view[:take]
        view = view[take:]
        if len(self._preamble) == self._header.preamble_size:
            preamble = parse_preamble(self._preamble)
            self.manifest, self.signer = verify_preamble(preamble, self._keyring, self._policy)
            log.debug(
                "bundle_preamble_verified",
                version=self.manifest.version,
                compatible=self.manifest.compatible,
                security_version=self.manifest.security_version,
                key_id=self.signer,
                image_size=self.manifest.image_size,
            )
            self._preamble = bytearray()
            self._decoder = make_decoder(self.manifest.compression, fallback=self._zstd_fallback)
            self._hash_image = self.manifest.compression != "none"
        return view

    def _drain(self) -> Iterator[bytes]:
        decoder, manifest = self._decoder, self.manifest
        if decoder is None or manifest is None:
            return
        try:
            while (out := decoder.pull()) is not None:
                self._image_produced += len(out)
                if self._image_produced > manifest.image_size:
                    raise Oversize(
                        f"bundle: image exceeds its declared {manifest.image_size} bytes",
                        declared=manifest.image_size,
                    )
                if self._hash_image:
                    self._digests.update(_IMAGE, out)
                yield out
        except BundleError as exc:
            raise self._fail(exc) from None

    def _complete(self) -> Manifest:
        manifest, decoder = self.manifest, self._decoder
        if self._header is None:
            raise Truncated(f"bundle: ends inside the header ({len(self._preamble)} bytes)")
        if manifest is None or decoder is None:
            raise Truncated(
                f"bundle: ends inside the preamble ({len(self._preamble)} of "
                f"{self._header.preamble_size} bytes)"
            )
        if self._payload_received < manifest.size:
            raise Truncated(
                f"bundle: payload ends after {self._payload_received} of {manifest.size} bytes",
                received=self._payload_received,
                declared=manifest.size,
            )
        payload_digest, image_digest = self._digests.hexdigests()
        if payload_digest != manifest.sha256:
            raise PayloadHashMismatch("bundle: payload sha256 does not match the manifest")
        if not decoder.complete:
            raise DecompressFailed("bundle: payload ends inside a compressed frame")
        if self._image_produced != manifest.image_size:
            raise Truncated(
                f"bundle: image ends after {self._image_produced} of {manifest.image_size} bytes",
                produced=self._image_produced,
                declared=manifest.image_size,
            )
        if not self._hash_image:
            image_digest = payload_digest
        if image_digest != manifest.image_sha256:
            raise ImageHashMismatch("bundle: image sha256 does not match the manifest")
        return manifest

    def _check_alive(self) -> None:
        if self._failure is not None:
            failure = self._failure
            raise type(failure)(f"{failure.message} (verifier already failed)", **failure.details)
        if self._finished:
            raise RuntimeError("StreamVerifier: already finished")

    def _fail(self, exc: BundleError) -> BundleError:
        self._failure = exc
        self.close()
        return exc

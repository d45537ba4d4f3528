"""The sans-I/O streaming verifier: bundle bytes in, verified image bytes out.

The caller owns all I/O: it feeds whatever chunks it has, in order, and writes the image chunks
it gets back. Nothing comes back before the preamble is authenticated and the policy passed.
Every check that can fail early fails early (a byte past the declared payload size is refused the
moment it arrives; an image growing past its declared size is refused the moment it does); the
hashes, which need every byte, are compared in :meth:`StreamVerifier.finish`. Once an error was
raised the verifier is dead: every later call raises the same kind of error again.

Memory is constant: the preamble is bounded by the header limits, payload input is held only
until the caller drains the output of the same ``feed``, and zstd output is decoded into four
1 MiB buffers that are reused (see :mod:`otad.bundle.ring`); into one of 256 KiB with
``hash_image=False``.

Output chunks are read-only memoryviews, not copies: each is valid until the iterator is
advanced (it is released then, so a chunk kept too long raises ``ValueError`` instead of showing
bytes that were overwritten meanwhile). ``bytes(chunk)`` keeps a copy.
"""

from __future__ import annotations

from collections.abc import Iterator

import structlog

from otad.bundle.decode import Decoder, PassthroughDecoder, make_decoder
from otad.bundle.digest import Digests
from otad.bundle.header import HEADER_SIZE, Header, parse_header
from otad.bundle.keyring import Keyring
from otad.bundle.manifest import Manifest
from otad.bundle.policy import VerifyPolicy
from otad.bundle.preamble import parse_preamble, verify_preamble
from otad.bundle.ring import SLOT_SIZE, OutputRing
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
_SOLE_SLOT_SIZE = 256 << 10


class StreamVerifier:
    """Verify one bundle while it streams past; see the module docstring.

    ``threaded`` computes both SHA-256 digests on a helper thread, so hashing and decompression
    use two cores; the result is the same either way.

    ``hash_image=False`` skips the SHA-256 over the decompressed image and its comparison with
    ``manifest.image_sha256`` (sizes are still checked, and so is the payload hash, which the
    signature covers): for a caller that verifies the image bytes against
    ``manifest.image_sha256`` itself, e.g. by re-reading what it wrote. It saves about
    0.8 CPU-s per GiB and 3.75 MiB of buffers. With ``compression: none`` the image is the
    payload and is always checked.

    ``resume_from=(payload offset, image offset)``: continue an install that an earlier verifier
    (in an earlier process) took to that :attr:`resume_point`, a frame end. Feed the preamble
    (:attr:`preamble` of that verifier: it is verified again), then the payload from that
    offset; the image comes out from that offset. The payload hash cannot be finished without
    the bytes before the offset, so it is not computed: the caller must check the whole image
    against ``manifest.image_sha256`` (hence ``hash_image=False``). Sizes are checked as usual.
    """

    def __init__(
        self,
        keyring: Keyring,
        policy: VerifyPolicy | None = None,
        *,
        threaded: bool = True,
        zstd_fallback: bool = False,
        hash_image: bool = True,
        resume_from: tuple[int, int] | None = None,
    ) -> None:
        if resume_from is not None and hash_image:
            raise ValueError("StreamVerifier: resume_from needs hash_image=False")
        self._resume_from = resume_from
        self._keyring = keyring
        self._policy = policy if policy is not None else VerifyPolicy()
        self._zstd_fallback = zstd_fallback
        self._preamble = bytearray()
        self._header: Header | None = None
        self.manifest: Manifest | None = None
        self.signer: str | None = None
        self._decoder: Decoder | PassthroughDecoder | None = None
        self._ring: OutputRing | None = None
        self._digests = Digests(2, threaded=threaded)
        self._check_image = hash_image
        self._hash_image = False  # compression "none": the image digest is the payload digest
        self._payload_received = 0
        self._image_produced = 0
        self._failure: BundleError | None = None
        self._finished = False
        self._closed = False
        self._payload_base = self._image_base = 0
        self.preamble: bytes | None = None  # header, manifest and signatures, once verified

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

    @property
    def resume_point(self) -> tuple[int, int] | None:
        """(payload offset, image offset) of the last frame end decoded so far: a verifier made
        with ``resume_from=`` it, fed the preamble and then the payload from that offset, goes
        on with the image from that offset. None before the first frame ended."""
        end = None if self._decoder is None else self._decoder.last_frame_end
        if end is None:
            return None
        return self._payload_base + end[0], self._image_base + end[1]

    # --- streaming ----------------------------------------------------------------------------

    def feed(self, chunk: Buffer) -> Iterator[memoryview]:
        """Take the next bundle bytes; returns an iterator over the image bytes they release.

        Preamble and payload checks run before this returns (errors raise here); decompression
        runs as the returned iterator is consumed, one chunk of at most 1 MiB at a time, so a
        highly compressed payload never needs more memory (``compression: none`` hands back
        the fed bytes as they are). Each chunk is a read-only memoryview that is valid until the
        iterator is advanced: write or copy it before asking for the next one. Consume the
        iterator before the next ``feed`` or ``finish``: leaving output behind is a programming
        error (RuntimeError).
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
        """Release the helper thread early (e.g. when a download is abandoned); final."""
        self._closed = True
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
        if self._resume_from is None:
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
            self.preamble = bytes(self._preamble)
            self._preamble = bytearray()
            self._decoder = make_decoder(self.manifest.compression, fallback=self._zstd_fallback)
            if self._resume_from is not None:
                self._start_at(*self._resume_from)
            if self.manifest.compression != "none":
                self._hash_image = self._check_image
                # a small image (a config, an app) needs no MiB buffers: a device on a small
                # board, or a simulator running thousands, pays for what the image needs
                slot_size = min(SLOT_SIZE, max(4096, self.manifest.image_size))
                if self._hash_image:
                    self._ring = OutputRing(self._digests, _IMAGE, slot_size=slot_size)
                else:
                    # No hasher reads the output: one small buffer is enough (hand-offs to a
                    # hasher are what made bigger ones pay). The agent's 1 GiB install: 0.5 MiB
                    # smaller and ~0.25 CPU-s less than with 1 MiB (6 interleaved reps).
                    slot_size = min(slot_size, _SOLE_SLOT_SIZE)
                    self._ring = OutputRing(None, _IMAGE, slots=1, slot_size=slot_size)
        return view

    def _start_at(self, payload_offset: int, image_offset: int) -> None:
        manifest = self.manifest
        assert manifest is not None
        if not (0 <= payload_offset <= manifest.size and 0 <= image_offset <= manifest.image_size):
            raise Oversize(
                f"bundle: resume point ({payload_offset}, {image_offset}) outside the payload "
                f"({manifest.size}) or the image ({manifest.image_size})"
            )
        # The payload before the resume point went through an earlier verifier: its hash cannot
        # be finished here, so it is not computed; the caller checks the whole image.
        self._payload_base = self._payload_received = payload_offset
        self._image_base = self._image_produced = image_offset

    def _drain(self) -> Iterator[memoryview]:
        decoder, ring = self._decoder, self._ring
        try:
            if isinstance(decoder, PassthroughDecoder):
                while (data := decoder.pull()) is not None:
                    self._count_image(len(data))  # hashed as the payload already
                    yield from _lend(memoryview(data).toreadonly())
            elif decoder is not None and ring is not None:
                while written := decoder.pull_into(ring.space()):
                    self._count_image(written)  # before the hasher or the caller sees them
                    yield from _lend(ring.commit(written))
        except BundleError as exc:
            raise self._fail(exc) from None

    def _count_image(self, size: int) -> None:
        self._image_produced += size
        manifest = self.manifest
        if manifest is not None and self._image_produced > manifest.image_size:
            raise Oversize(
                f"bundle: image exceeds its declared {manifest.image_size} bytes",
                declared=manifest.image_size,
            )

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
        if self._ring is not None:
            self._ring.flush()
        payload_digest, image_digest = self._digests.hexdigests()
        resumed = self._resume_from is not None  # no payload hash then: see _start_at
        if not resumed and payload_digest != manifest.sha256:
            raise PayloadHashMismatch("bundle: payload sha256 does not match the manifest")
        nothing_after_resume = resumed and self._payload_received == self._payload_base
        if not decoder.complete and not nothing_after_resume:  # a resume point is a frame end
            raise DecompressFailed("bundle: payload ends inside a compressed frame")
        if self._image_produced != manifest.image_size:
            raise Truncated(
                f"bundle: image ends after {self._image_produced} of {manifest.image_size} bytes",
                produced=self._image_produced,
                declared=manifest.image_size,
            )
        if resumed or (self._ring is not None and not self._hash_image):
            return manifest  # the caller checks the image against the manifest (hash_image=False)
        if self._ring is None:
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
        if self._closed:
            raise RuntimeError("StreamVerifier: closed")

    def _fail(self, exc: BundleError) -> BundleError:
        self._failure = exc
        self.close()
        return exc


def _lend(view: memoryview) -> Iterator[memoryview]:
    """Yield ``view`` once and release it when the consumer moves on (its memory is reused)."""
    try:
        yield view
    finally:
        try:
            view.release()
        except BufferError:
            raise RuntimeError(
                "StreamVerifier: an output chunk is still exported (e.g. to C code) after the "
                "iterator moved on; its memory is about to be reused - copy it with bytes(chunk)"
            ) from None

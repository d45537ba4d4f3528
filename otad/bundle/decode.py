"""Payload decoders with bounded output: each pull fills at most the buffer it is given.

A zstd frame can expand tens of thousands of times (a 4-byte RLE block is 128 KiB of output), so
"decompress what was fed" has no useful memory bound. These decoders queue the fed input and
decode into a caller-owned buffer (:mod:`otad.bundle.ring`), one buffer at a time; the caller
consumes what was written before asking for more, so memory stays constant whatever the ratio.
libzstd's streaming API is reached through the cffi backend that ships with ``zstandard``
because only it lets us pass a caller-owned output buffer (decoding straight into it saves a
copy of every image byte); when that backend is missing, a ``decompressobj`` fallback feeds
128-byte input slices (zstd expands at most ~32768:1, so one slice yields at most ~4 MiB;
slower, still bounded) and copies out of its result.

The decoders accept frames with a window of at most 2^:data:`WINDOW_LOG_MAX` bytes (8 MiB),
which is what every compression level up to 19 uses; :func:`otad.bundle.builder.build_bundle`
never writes a larger window. That caps the decoder's own memory on a device.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final, Protocol

import zstandard

from otad.errors import DecompressFailed

__layer__ = "pure"

WINDOW_LOG_MAX: Final = 23
_FALLBACK_SLICE: Final = 128
_FALLBACK_WRITE: Final = 256 << 10

try:  # the cffi backend exposes libzstd's streaming calls with caller-owned buffers
    from zstandard import backend_cffi as _cffi

    _lib: Any = getattr(_cffi, "lib")  # noqa: B009 - not re-exported in the type stubs
    _ffi: Any = getattr(_cffi, "ffi")  # noqa: B009
except ImportError:  # pragma: no cover - depends on how zstandard was built
    _lib = _ffi = None


class Decoder(Protocol):
    def push(self, data: bytes) -> None:
        """Queue payload bytes (owned, immutable) for decoding."""

    def pull_into(self, out: memoryview) -> int:
        """Decode into ``out`` (writable, not empty); bytes written, 0 when input is needed."""

    @property
    def pending(self) -> bool:
        """Whether queued input or buffered output is waiting to be pulled."""

    @property
    def complete(self) -> bool:
        """Whether the input so far ends exactly at the end of a frame (or stream)."""

    @property
    def last_frame_end(self) -> tuple[int, int] | None:
        """(input bytes, output bytes) at the end of the last frame decoded so far, counted
        from this decoder's first byte: decoding can start afresh there. None if unknown."""


class PassthroughDecoder:
    """``compression: none``: the payload is the image, handed out as it was fed (no copy)."""

    def __init__(self) -> None:
        self._queue: deque[bytes] = deque()
        self._pulled = 0

    def push(self, data: bytes) -> None:
        if data:
            self._queue.append(data)

    def pull(self) -> bytes | None:
        if not self._queue:
            return None
        data = self._queue.popleft()
        self._pulled += len(data)
        return data

    @property
    def last_frame_end(self) -> tuple[int, int] | None:
        return (self._pulled, self._pulled)  # the image is the payload: any byte will do

    @property
    def pending(self) -> bool:
        return bool(self._queue)

    @property
    def complete(self) -> bool:
        return True


class ZstdStreamDecoder:
    """zstd through libzstd's ``ZSTD_decompressStream`` with a fixed output buffer."""

    def __init__(self) -> None:
        if _lib is None:  # pragma: no cover
            raise RuntimeError("zstandard cffi backend unavailable")
        self._dctx = _ffi.gc(_lib.ZSTD_createDCtx(), _lib.ZSTD_freeDCtx)
        _check(_lib.ZSTD_DCtx_setParameter(self._dctx, _lib.ZSTD_d_windowLogMax, WINDOW_LOG_MAX))
        self._outbuf = _ffi.new("ZSTD_outBuffer *")
        self._inbuf = _ffi.new("ZSTD_inBuffer *")
        self._current: Any = None  # keeps the cffi view of the input being decoded alive
        self._queue: deque[bytes] = deque()
        self._flush_pending = False  # output buffer came back full: libzstd may hold more
        self._frame_done = False
        self._started = False
        self._input_base = 0  # input bytes before the chunk being decoded
        self._output_total = 0
        self.last_frame_end: tuple[int, int] | None = None

    def push(self, data: bytes) -> None:
        if data:
            self._queue.append(data)

    def pull_into(self, out: memoryview) -> int:
        inbuf, outbuf = self._inbuf, self._outbuf
        target = _ffi.from_buffer(out, require_writable=True)
        outbuf.dst = target
        outbuf.size = len(out)
        outbuf.pos = 0
        while True:
            if inbuf.pos == inbuf.size:
                if self._queue:
                    self._input_base += inbuf.size
                    data = self._queue.popleft()
                    self._current = _ffi.from_buffer(data)
                    inbuf.src = self._current
                    inbuf.size = len(data)
                    inbuf.pos = 0
                elif not self._flush_pending:
                    break
            self._started = True
            hint = _check(_lib.ZSTD_decompressStream(self._dctx, outbuf, inbuf))
            # 0: a frame ended and everything decoded was flushed into the output buffer.
            # Otherwise a full output buffer means libzstd may still hold decoded bytes.
            self._frame_done = hint == 0
            self._flush_pending = hint != 0 and outbuf.pos == outbuf.size
            if self._frame_done:
                self.last_frame_end = (
                    self._input_base + inbuf.pos,
                    self._output_total + outbuf.pos,
                )
            if outbuf.pos == outbuf.size:
                break
        if inbuf.pos == inbuf.size and not self._queue:
            self._current = None
        outbuf.dst = _ffi.NULL  # ``target`` pins ``out``; it is released when this returns
        written: int = outbuf.pos
        self._output_total += written
        return written

    @property
    def pending(self) -> bool:
        return bool(self._queue) or self._inbuf.pos < self._inbuf.size or self._flush_pending

    @property
    def complete(self) -> bool:
        return self._started and self._frame_done and not self.pending


class ZstdObjectDecoder:
    """Fallback over ``zstandard``'s decompressobj, fed in small slices."""

    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor(max_window_size=1 << WINDOW_LOG_MAX)
        self._obj = self._dctx.decompressobj(write_size=_FALLBACK_WRITE)
        self._queue: deque[memoryview] = deque()
        self._ready = b""  # decoded but not yet handed out (at most one slice's output)
        self._ready_at = 0
        self._started = False
        self._in_frame = False
        self._input_total = 0  # taken from the queue (what went back to it not counted)
        self._output_total = 0  # decoded, handed out or not
        self.last_frame_end: tuple[int, int] | None = None

    def push(self, data: bytes) -> None:
        if data:
            self._queue.append(memoryview(data))

    def pull_into(self, out: memoryview) -> int:
        if self._ready_at == len(self._ready) and not self._decode_more():
            return 0
        size = min(len(out), len(self._ready) - self._ready_at)
        out[:size] = self._ready[self._ready_at : self._ready_at + size]
        self._ready_at += size
        return size

    def _decode_more(self) -> bool:
        """Decode input slices until some output is ready; False when the input ran out."""
        while self._queue:
            head = self._queue[0]
            piece, rest = head[:_FALLBACK_SLICE], head[_FALLBACK_SLICE:]
            if rest:
                self._queue[0] = rest
            else:
                self._queue.popleft()
            self._started = True
            self._in_frame = True
            self._input_total += len(piece)
            try:
                out = self._obj.decompress(piece)
            except zstandard.ZstdError as exc:
                raise DecompressFailed(f"bundle: payload does not decompress: {exc}") from exc
            self._output_total += len(out)
            if self._obj.eof:
                # A frame ended; anything after it starts the next frame.
                self._in_frame = False
                leftover = self._obj.unused_data
                self._input_total -= len(leftover)
                self.last_frame_end = (self._input_total, self._output_total)
                self._obj = self._dctx.decompressobj(write_size=_FALLBACK_WRITE)
                if leftover:
                    self._queue.appendleft(memoryview(leftover))
            if out:
                self._ready, self._ready_at = out, 0
                return True
        return False

    @property
    def pending(self) -> bool:
        return bool(self._queue) or self._ready_at < len(self._ready)

    @property
    def complete(self) -> bool:
        return self._started and not self._in_frame and not self.pending


def make_decoder(compression: str, *, fallback: bool = False) -> Decoder | PassthroughDecoder:
    if compression == "none":
        return PassthroughDecoder()
    if compression == "zstd":
        if fallback or _lib is None:
            return ZstdObjectDecoder()
        return ZstdStreamDecoder()
    raise DecompressFailed(f"bundle: no decoder for compression {compression!r}")


def _check(code: int) -> int:
    if _lib.ZSTD_isError(code):
        name = _ffi.string(_lib.ZSTD_getErrorName(code)).decode("ascii", "replace")
        raise DecompressFailed(f"bundle: payload does not decompress: {name}")
    return code

"""Build and sign a bundle from an image file, streaming, in constant memory.

The manifest precedes the payload but names the payload's size and hash, so the payload has to
exist before the manifest can be written. The builder compresses the image once into a temporary
file next to the output (same file system, so the final rename is atomic and no second disk is
involved), hashing the image and the compressed stream as they pass. It then writes the signed
preamble and copies the payload behind it. Compressing twice instead would double the dominant
cost and would rely on multi-threaded zstd being byte-for-byte deterministic between runs; the
temporary file costs one extra sequential write and read of the (compressed) payload.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final

import structlog
import zstandard

from otad.bundle.decode import WINDOW_LOG_MAX
from otad.bundle.header import FORMAT_VERSION, Header
from otad.bundle.keys import algorithm_of, key_id_of
from otad.bundle.manifest import COMPRESSIONS, KNOWN_FIELDS, Manifest
from otad.bundle.preamble import signed_message
from otad.bundle.signatures import SignatureEntry, encode_signatures
from otad.errors import ConfigError

if TYPE_CHECKING:
    from otad.bundle.signing import PrivateKey

__layer__ = "pure"

log = structlog.get_logger(__name__)

Progress = Callable[[int, int], None]
READ_SIZE: Final = 1 << 20
DEFAULT_LEVEL: Final = 3
# A zstd payload is a run of independent frames, one per this many image bytes: a device whose
# download was interrupted (the agent restarted, the power failed) resumes at the start of a
# frame instead of at byte 0. What it costs: the window starts empty in each frame (~0.03 %
# larger payloads at the default level).
FRAME_SIZE: Final = 32 << 20


class _HashingWriter:
    """File-like sink that counts and hashes what the compressor writes."""

    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self._sink.write(data)
        return len(data)

    def flush(self) -> None:
        self._sink.flush()


def build_bundle(
    image: Path,
    out: Path,
    *,
    key: PrivateKey | Sequence[PrivateKey],
    version: str,
    compatible: str,
    security_version: int = 0,
    compression: str = "zstd",
    expires: datetime | None = None,
    device: str | None = None,
    extra: dict[str, Any] | None = None,
    progress: Progress | None = None,
    level: int = DEFAULT_LEVEL,
    threads: int = -1,
    created: datetime | None = None,
    frame_size: int = FRAME_SIZE,
) -> Manifest:
    """Write a signed bundle of ``image`` to ``out`` and return its manifest.

    ``key`` may be several keys (rotation: sign with the old and the new key). ``threads`` is
    passed to zstd (-1: one worker per CPU, 0: single-threaded). ``progress(done, total)`` is
    called with image bytes read so far. ``out`` appears atomically, complete or not at all.
    ``frame_size``: image bytes per zstd frame (see :data:`FRAME_SIZE`).
    """
    keys = [key] if not isinstance(key, Sequence) else list(key)
    if not keys:
        raise ConfigError("bundle: at least one signing key is needed")
    if compression not in COMPRESSIONS:
        raise ConfigError(f"bundle: compression must be one of {', '.join(COMPRESSIONS)}")
    if not 1 <= level <= 19:
        raise ConfigError(f"bundle: zstd level {level} outside 1..19")
    if frame_size < 4096:
        raise ConfigError(f"bundle: frame size {frame_size} below 4096 bytes")
    clash = sorted(KNOWN_FIELDS & (extra or {}).keys())
    if clash:
        raise ConfigError(f"bundle: extra fields {', '.join(clash)} clash with manifest fields")
    for moment in (expires, created):
        if moment is not None and moment.tzinfo is None:
            raise ConfigError("bundle: expires and created must be timezone-aware")

    out_dir = out.parent if str(out.parent) else Path(".")
    try:
        source = image.open("rb")
    except OSError as exc:
        raise ConfigError(f"bundle: cannot read image {image}: {exc.strerror}") from exc
    payload_fd, payload_name = tempfile.mkstemp(
        dir=out_dir, prefix=f".{out.name}.", suffix=".payload"
    )
    payload_path = Path(payload_name)
    try:
        with source, os.fdopen(payload_fd, "w+b") as payload:
            image_size, image_sha256, writer = _compress(
                source, payload, compression, level, threads, progress, frame_size
            )
            manifest = Manifest(
                compatible=compatible,
                version=version,
                security_version=security_version,
                created=(created or datetime.now(UTC)).replace(microsecond=0),
                size=writer.size,
                compression=compression,
                sha256=writer.sha256.hexdigest(),
                image_size=image_size,
                image_sha256=image_sha256,
                key_ids=tuple(key_id_of(k) for k in keys),
                expires=expires.replace(microsecond=0) if expires is not None else None,
                device=device,
                format_version=FORMAT_VERSION,
                extra=dict(extra or {}),
            )
            preamble = _preamble(manifest, keys)
            payload.seek(0)
            _write_atomically(out, out_dir, preamble, payload)
    finally:
        payload_path.unlink(missing_ok=True)
    log.info(
        "bundle_built",
        path=str(out),
        version=version,
        compatible=compatible,
        image_size=manifest.image_size,
        payload_size=manifest.size,
        compression=compression,
        key_ids=list(manifest.key_ids),
    )
    return manifest


def _compress(
    source: io.BufferedReader,
    payload: BinaryIO,
    compression: str,
    level: int,
    threads: int,
    progress: Progress | None,
    frame_size: int,
) -> tuple[int, str, _HashingWriter]:
    total = _size_of(source)
    writer = _HashingWriter(payload)
    image_hash = hashlib.sha256()
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    done = 0
    compressor: zstandard.ZstdCompressor | None = None
    if compression == "zstd":
        # No zstd checksum: the manifest's image_sha256 is the integrity check.
        options: dict[str, Any] = {"threads": threads, "write_checksum": 0, "write_content_size": 1}
        frame_total = min(total, frame_size)
        params = zstandard.ZstdCompressionParameters.from_level(
            level, source_size=frame_total, **options
        )
        if params.window_log > WINDOW_LOG_MAX:
            params = zstandard.ZstdCompressionParameters.from_level(
                level, source_size=frame_total, window_log=WINDOW_LOG_MAX, **options
            )
        compressor = zstandard.ZstdCompressor(compression_params=params)
    frames = _Frames(compressor, writer, frame_size, total) if compressor is not None else None
    while (n := source.readinto(buffer)) > 0:
        chunk = view[:n]
        image_hash.update(chunk)
        if frames is not None:
            frames.write(chunk)
        else:
            writer.write(chunk)
        done += n
        if progress is not None:
            progress(done, max(total, done))
    if done != total:
        raise ConfigError(f"bundle: image changed size while reading ({total} -> {done} bytes)")
    if frames is not None:
        frames.finish()
    payload.flush()
    return done, image_hash.hexdigest(), writer


class _Frames:
    """Compresses a stream into independent zstd frames of ``frame_size`` input bytes each."""

    def __init__(
        self,
        compressor: zstandard.ZstdCompressor,
        sink: _HashingWriter,
        frame_size: int,
        total: int,
    ) -> None:
        self._compressor = compressor
        self._sink = sink
        self._frame_size = frame_size
        self._left_total = total  # bytes announced by the image's size and not yet framed
        self._frame: Any = None
        self._left = 0  # bytes still going into the current frame
        self._count = 0

    def write(self, data: memoryview) -> None:
        while len(data):
            if self._frame is None:
                self._start()
            take = min(self._left, len(data))
            self._frame.write(data[:take])
            self._left -= take
            self._left_total -= take
            data = data[take:]
            if self._left == 0:
                self._end()

    def finish(self) -> None:
        """End the last frame (the caller checked that the image had its announced size); an
        empty image is one empty frame."""
        if not self._count:
            self._start()
        self._end()

    def _start(self) -> None:
        size = min(self._frame_size, self._left_total)
        self._frame = self._compressor.stream_writer(
            self._sink,  # type: ignore[arg-type]  # any object with write() is accepted
            size=size if size > 0 or not self._count else -1,  # a frame states its content size
            write_size=READ_SIZE,
            closefd=False,
        )
        self._left = size if size > 0 else self._frame_size
        self._count += 1

    def _end(self) -> None:
        if self._frame is not None:
            self._frame.close()
            self._frame = None


def _size_of(source: io.BufferedReader) -> int:
    """Image size: works for regular files and block devices alike."""
    size = source.seek(0, os.SEEK_END)
    source.seek(0)
    return size


def _preamble(manifest: Manifest, keys: list[PrivateKey]) -> bytes:
    manifest_bytes = manifest.encode()
    # The signature block length is not signed (a signature cannot cover its own length), so
    # the header is built with a placeholder and fixed up; signed_fields() skips that field.
    provisional = Header(FORMAT_VERSION, 0, len(manifest_bytes), 0, manifest.size)
    message = signed_message(provisional, manifest_bytes)
    from otad.bundle.signing import sign  # cryptography: only where bundles are made

    entries = [SignatureEntry(key_id_of(k), algorithm_of(k), sign(k, message)) for k in keys]
    block = encode_signatures(entries)
    header = Header(FORMAT_VERSION, 0, len(manifest_bytes), len(block), manifest.size)
    return header.pack() + manifest_bytes + block


def _write_atomically(out: Path, out_dir: Path, preamble: bytes, payload: BinaryIO) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as target:
            target.write(preamble)
            shutil.copyfileobj(payload, target, READ_SIZE)
            target.flush()
            os.fsync(target.fileno())
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

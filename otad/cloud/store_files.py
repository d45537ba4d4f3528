"""The artifact catalogue on disk: verified bundles stored under their SHA-256.

``<dir>/<id>.bundle`` is the bundle, ``<dir>/<id>.json`` its manifest, size and uploader;
uploads stream into ``<dir>/.incoming`` and appear under their id only once verified. Every
method blocks (disk, fsync, hashing): an event loop calls them in a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from otad.bundle import Keyring, StreamVerifier, VerifyPolicy
from otad.cloud.store_auth import check_artifact_id
from otad.errors import ArtifactNotFound, ArtifactRejected, BundleError, StoreError

__layer__ = "adapter"

log = structlog.get_logger(__name__)

CHUNK = 1024 * 1024
INCOMING_MAX_AGE = 24 * 3600.0


@dataclass(frozen=True)
class ArtifactInfo:
    artifact_id: str
    path: Path
    size: int
    mtime: float
    manifest: dict[str, Any]

    @property
    def etag(self) -> str:
        return f'"{self.artifact_id}"'

    def to_json(self) -> dict[str, Any]:
        return {"id": self.artifact_id, "size": self.size, "manifest": self.manifest}


class BundleReader:
    """An open bundle file read by worker threads; its descriptor outlives every read.

    A download handler reads the next chunk in a worker thread while it sends the current one.
    When the handler is cancelled (client gone, server stopping) that read may still be running,
    and a worker thread cannot be interrupted. Closing the descriptor under it would let the
    read hit a closed - or worse, reused - descriptor. So :meth:`close` never waits and never
    races: if a read is in flight, the last read to finish closes the descriptor; a read that
    starts after :meth:`close` is refused. ``pread`` is the read primitive (a test slows it).
    """

    def __init__(self, path: Path, *, pread: Callable[[int, int, int], bytes] = os.pread) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # blocking: call in a thread
        self._pread = pread
        self._lock = threading.Lock()
        self._reading = 0
        self._closing = False
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        """True once the descriptor itself is closed (not merely asked to close)."""
        return self._closed.is_set()

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``. Blocking: run it in a worker thread."""
        with self._lock:
            if self._closing:
                raise StoreError(f"store: {self.path.name} was closed before this read")
            self._reading += 1
        try:
            return self._pread(self._fd, size, offset)
        finally:
            with self._lock:
                self._reading -= 1
                last = self._closing and self._reading == 0
            if last:
                self._close_fd()

    def close(self) -> None:
        """Close now if idle, else as soon as the read in flight returns. Never blocks."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            idle = self._reading == 0
        if idle:
            self._close_fd()

    def wait_closed(self, timeout: float) -> bool:
        """Blocking: wait until the descriptor is closed; False if ``timeout`` passed first."""
        return self._closed.wait(timeout)

    def _close_fd(self) -> None:
        try:
            os.close(self._fd)
        finally:
            self._closed.set()


class Upload:
    """One bundle arriving: written to a temporary file, hashed and verified as it streams.

    Synchronous and CPU-bound (verification decompresses the payload): callers run each method
    in a worker thread. Nothing becomes visible under an artifact id before :meth:`commit`
    has checked the signature, both hashes and the size.
    """

    def __init__(self, repository: ArtifactRepository, keyring: Keyring, max_bytes: int) -> None:
        self._repo = repository
        self._max = max_bytes
        incoming = repository.directory / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        self._tmp = incoming / f"{secrets.token_hex(8)}.part"
        self._file: BinaryIO | None = self._tmp.open("xb")
        self._hash = hashlib.sha256()
        self._verifier = StreamVerifier(keyring, VerifyPolicy(), threaded=False)
        self.size = 0
        self.created = False

    def feed(self, chunk: bytes) -> None:
        if self._file is None:
            raise StoreError("store: upload already finished")
        self.size += len(chunk)
        if self.size > self._max:
            raise ArtifactRejected(
                f"store: bundle larger than the limit of {self._max} bytes", status=413
            )
        self._file.write(chunk)
        self._hash.update(chunk)
        try:
            for _ in self._verifier.feed(chunk):
                pass  # the image bytes are only hashed by the verifier
        except BundleError as exc:
            raise ArtifactRejected(f"store: bundle rejected: {exc}", reason=exc.code) from exc

    def commit(self, uploader: str, expected_id: str | None = None) -> ArtifactInfo:
        """Finish verification and publish; ``expected_id`` (PUT) must equal the content hash."""
        if self._file is None:
            raise StoreError("store: upload already finished")
        try:
            manifest = self._verifier.finish()
        except BundleError as exc:
            raise ArtifactRejected(f"store: bundle rejected: {exc}", reason=exc.code) from exc
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        artifact_id = self._hash.hexdigest()
        if expected_id is not None and expected_id != artifact_id:
            raise ArtifactRejected(
                f"store: the bundle's SHA-256 is {artifact_id}, not the {expected_id} named "
                "in the URL",
                reason="artifact_id_mismatch",
            )
        self.created = not self._repo.bundle_path(artifact_id).exists()
        meta = {
            "id": artifact_id,
            "size": self.size,
            "uploaded_at": int(time.time()),
            "uploaded_by": uploader,
            "manifest": manifest.to_dict(),
        }
        return self._repo.publish(self._tmp, artifact_id, meta)

    def abort(self) -> None:
        self._verifier.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)


class ArtifactRepository:
    """Bundles on disk: ``<dir>/<id>.bundle`` and ``<dir>/<id>.json`` (manifest, size, uploader)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def bundle_path(self, artifact_id: str) -> Path:
        return self.directory / f"{check_artifact_id(artifact_id)}.bundle"

    def open(self, info: ArtifactInfo) -> BundleReader:
        """Blocking: open an artifact for reading (the handler closes the reader)."""
        try:
            return BundleReader(info.path)
        except FileNotFoundError:
            raise ArtifactNotFound(f"store: no artifact {info.artifact_id}") from None
        except OSError as exc:
            raise StoreError(
                f"store: artifact {info.artifact_id} is unreadable: {exc.strerror}"
            ) from exc

    def meta_path(self, artifact_id: str) -> Path:
        return self.directory / f"{check_artifact_id(artifact_id)}.json"

    def info(self, artifact_id: str) -> ArtifactInfo:
        """Blocking: stat + read the metadata (run in a thread on an event loop)."""
        path = self.bundle_path(artifact_id)
        try:
            st = path.stat()
            meta = json.loads(self.meta_path(artifact_id).read_text())
        except FileNotFoundError:
            raise ArtifactNotFound(f"store: no artifact {artifact_id}") from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"store: artifact {artifact_id} is unreadable: {exc}") from exc
        return ArtifactInfo(artifact_id, path, st.st_size, st.st_mtime, meta.get("manifest", {}))

    def ids(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.bundle"))

    def all(self) -> list[ArtifactInfo]:
        """Every complete artifact, oldest first. Blocking."""
        infos = []
        for artifact_id in self.ids():
            try:
                infos.append(self.info(artifact_id))
            except ArtifactNotFound:
                continue  # deleted between the listing and the read
        return sorted(infos, key=lambda info: (info.mtime, info.artifact_id))

    def sweep_incoming(self, older_than: float = INCOMING_MAX_AGE) -> int:
        """Delete upload leftovers of crashed processes; returns how many. Blocking.

        Only files untouched for ``older_than`` seconds: another store process sharing the
        directory may be receiving an upload right now.
        """
        incoming = self.directory / ".incoming"
        if not incoming.is_dir():
            return 0
        removed = 0
        deadline = time.time() - older_than
        for leftover in incoming.glob("*.part"):
            try:
                if leftover.stat().st_mtime < deadline:
                    leftover.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def begin(self, keyring: Keyring, max_bytes: int) -> Upload:
        return Upload(self, keyring, max_bytes)

    def import_file(
        self,
        bundle: Path,
        keyring: Keyring,
        *,
        uploader: str = "local",
        max_bytes: int | None = None,
    ) -> ArtifactInfo:
        """Verify and store a bundle file (``otad cloud upload``). Blocking."""
        upload = self.begin(keyring, max_bytes or 2**63)
        try:
            with bundle.open("rb") as src:
                while chunk := src.read(CHUNK):
                    upload.feed(chunk)
            return upload.commit(uploader)
        except OSError as exc:
            upload.abort()
            raise StoreError(f"store: cannot read {bundle}: {exc.strerror}") from exc
        except BaseException:
            upload.abort()
            raise

    def publish(self, tmp: Path, artifact_id: str, meta: dict[str, Any]) -> ArtifactInfo:
        target = self.bundle_path(artifact_id)
        if target.exists():
            tmp.unlink()  # content addressed: the same bytes are already here
        else:
            # beside the upload's own temp file: two uploads of the same bundle at once each
            # write their own (and a crash leaves it where the stale-upload sweep looks)
            meta_tmp = tmp.with_name(f"{tmp.stem}.meta.part")
            meta_tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
            with meta_tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(meta_tmp, self.meta_path(artifact_id))
            os.replace(tmp, target)  # the bundle last: its presence means "complete"
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            log.info("artifact_stored", artifact=artifact_id, size=meta["size"])
        return self.info(artifact_id)

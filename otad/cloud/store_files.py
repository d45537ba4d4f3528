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
import time
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
            meta_tmp = self.meta_path(artifact_id).with_suffix(".json.tmp")
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

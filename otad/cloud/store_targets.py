"""Which artifacts a device is targeted by: the artifact its desired shadow state names.

The store issues an artifact-scoped token, and honours an unscoped one, only for an artifact
that the device's desired ``software.url`` names (a rollout or an operator put it there). That
keeps invariant 5 ("a device fetches only bundles issued to it") for the token flow: holding a
device certificate and knowing an artifact id is not enough. Pre-signed URLs need no lookup:
the URL itself is the issuance.

The desired state is read from the replica's database, so the answer is durable and current:
the replica publishes a delta only after the desired state committed, hence a device that
reacts to its delta always finds its target here.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import structlog

from otad.cloud.db import ShadowStore, SqliteStore
from otad.errors import ShadowError, StoreError

__layer__ = "adapter"

log = structlog.get_logger(__name__)

# The artifact path at the end of a URL path: a proxy may put the store under a prefix.
_ARTIFACT_IN_PATH = re.compile(r"/v1/artifacts/([0-9a-f]{64})$")


def targeted_artifacts(desired: Mapping[str, Any]) -> frozenset[str]:
    """The artifact ids a desired state names (its ``software.url``, absolute or relative).

    Pure. Anything malformed names nothing: an odd desired state never opens an artifact.
    """
    software = desired.get("software")
    if not isinstance(software, Mapping):
        return frozenset()
    url = software.get("url")
    if not isinstance(url, str) or len(url) > 4096:
        return frozenset()
    try:
        path = urlsplit(url).path
    except ValueError:
        return frozenset()
    match = _ARTIFACT_IN_PATH.search(path)
    return frozenset({match.group(1)}) if match else frozenset()


class Targets(Protocol):
    """What the store asks before it lets a token open an artifact."""

    async def targeted(self, device_id: str) -> frozenset[str]:
        """The artifact ids ``device_id`` is currently targeted by (empty: none)."""
        ...

    async def close(self) -> None: ...


class ShadowTargets:
    """Targets read from a running shadow database (the replica's, in the same process)."""

    def __init__(self, shadows: ShadowStore) -> None:
        self._shadows = shadows

    async def targeted(self, device_id: str) -> frozenset[str]:
        try:
            document = await self._shadows.read(device_id)
        except ShadowError as exc:
            raise StoreError(f"store: cannot read the desired state of {device_id}: {exc}") from exc
        return frozenset() if document is None else targeted_artifacts(document.desired)

    async def close(self) -> None:
        return None  # the owner of the database closes it


class DatabaseTargets:
    """Targets of a store running on its own: it opens the replica's database file on first use.

    SQLite in WAL mode lets this process read while the replica writes; the connection notices
    the replica's commits (see :mod:`otad.cloud.db`). A store whose database does not exist
    (no replica ever ran there) knows no targets and so refuses every token-scoped download.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: SqliteStore | None = None
        self._opening = asyncio.Lock()  # two first requests at once open one connection

    async def targeted(self, device_id: str) -> frozenset[str]:
        async with self._opening:
            if self._db is None:
                if not await asyncio.to_thread(self.path.exists):
                    log.warning("store_targets_unknown", db=str(self.path))
                    return frozenset()
                db = SqliteStore(self.path)
                try:
                    await db.start()
                except ShadowError as exc:
                    raise StoreError(f"store: cannot open the shadow database: {exc}") from exc
                self._db = db
        return await ShadowTargets(self._db).targeted(device_id)

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

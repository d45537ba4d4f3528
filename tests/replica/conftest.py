"""Fixtures for replica tests: a replica in the test's event loop, a fleet shadow client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from replica_helpers import running_replica, settings

from otad.cloud.pki import CloudDir
from otad.cloud.replica import Replica, ShadowClient


@pytest.fixture
async def replica(cloud_dir: CloudDir, broker: Any, tmp_path: Path) -> AsyncIterator[Replica]:
    async with running_replica(cloud_dir, broker, tmp_path / "shadow.db") as r:
        yield r


@pytest.fixture
async def fleet(cloud_dir: CloudDir, broker: Any) -> AsyncIterator[ShadowClient]:
    async with ShadowClient(settings(cloud_dir, broker, "fleet"), timeout=10) as client:
        yield client

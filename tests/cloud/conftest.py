"""Shared bundles for the cloud tests (built once per session with the cloud dir's key)."""

from __future__ import annotations

from pathlib import Path

import pytest
from plugins.cloud_env import make_bundle

from otad.cloud.pki import CloudDir


@pytest.fixture(scope="session")
def signed_bundle(cloud_dir: CloudDir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~1.5 MiB signed bundle (zstd payload) trusted by the cloud dir's keyring."""
    out = tmp_path_factory.mktemp("bundles") / "v2.otab"
    return make_bundle(cloud_dir, out, version="2.0", image_size=3 * 1024 * 1024)


@pytest.fixture(scope="session")
def bundle_bytes(signed_bundle: Path) -> bytes:
    return signed_bundle.read_bytes()

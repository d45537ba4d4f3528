"""Fixtures for the bundle tests: keys, a keyring, a small image, built bundles."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bundle_helpers import Forge, make_image

from otad.bundle import Keyring, PrivateKey, build_bundle, generate_private_key


@pytest.fixture(scope="session")
def ed_key() -> PrivateKey:
    return generate_private_key("ed25519")


@pytest.fixture(scope="session")
def p256_key() -> PrivateKey:
    return generate_private_key("p256")


@pytest.fixture(scope="session")
def other_key() -> PrivateKey:
    return generate_private_key("ed25519")


@pytest.fixture(scope="session")
def keyring(ed_key: PrivateKey, p256_key: PrivateKey) -> Keyring:
    return Keyring.from_keys([ed_key.public_key(), p256_key.public_key()])


@pytest.fixture(scope="session")
def image() -> bytes:
    return make_image(300_000)


@pytest.fixture
def forge() -> Forge:
    return Forge()


@pytest.fixture(scope="session")
def built(
    tmp_path_factory: pytest.TempPathFactory, image: bytes, ed_key: PrivateKey
) -> Callable[..., bytes]:
    """build_bundle() into a temp file; returns the bundle bytes."""
    directory = tmp_path_factory.mktemp("built")
    source = directory / "image.img"
    source.write_bytes(image)
    counter = iter(range(1_000_000))

    def build(**kwargs: Any) -> bytes:
        options: dict[str, Any] = {
            "key": ed_key,
            "version": "1.0",
            "compatible": "test-board",
        }
        options.update(kwargs)
        image_path = options.pop("image_path", source)
        out = directory / f"b{next(counter)}.otab"
        build_bundle(image_path, out, **options)
        return out.read_bytes()

    return build


@pytest.fixture
def write_image(tmp_path: Path) -> Callable[[bytes], Path]:
    def write(data: bytes) -> Path:
        path = tmp_path / f"image-{os.urandom(4).hex()}.img"
        path.write_bytes(data)
        return path

    return write

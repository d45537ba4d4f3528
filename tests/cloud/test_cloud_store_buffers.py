"""Download buffers stay within ``store.download_buffer_bytes``: chunks shrink with concurrency."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from urllib.parse import urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st
from plugins.cloud_env import make_bundle

from otad.bundle import Keyring
from otad.cloud.pki import CloudDir
from otad.cloud.store import BUFFERS_PER_CHUNK, MIN_CHUNK, ArtifactStore, chunk_for
from otad.cloud.store_files import ArtifactInfo, ArtifactRepository, BundleReader

MIB = 1 << 20


def test_store_chunk_for_examples() -> None:
    budget = 256 * MIB
    assert chunk_for(0, budget, MIB) == MIB
    assert chunk_for(1, budget, MIB) == MIB
    assert chunk_for(64, budget, MIB) == MIB  # 256 MiB / (4 x 64) = 1 MiB
    assert chunk_for(65, budget, MIB) == 960 * 1024  # rounded down to 64 KiB
    assert chunk_for(256, budget, MIB) == 256 * 1024
    assert chunk_for(1000, budget, MIB) == MIN_CHUNK  # floor: per-chunk work would dominate
    assert chunk_for(10_000, budget, MIB) == MIN_CHUNK
    assert chunk_for(10_000, budget, 4096) == 4096  # a configured chunk below the floor stays


@settings(deadline=None)  # shared CI machine: no per-example wall-clock limit
@given(
    active=st.integers(0, 100_000),
    budget=st.integers(1, 1 << 34),
    largest=st.integers(1, 16 * MIB),
)
def test_store_chunk_for_stays_within_its_bounds(active: int, budget: int, largest: int) -> None:
    chunk = chunk_for(active, budget, largest)
    assert min(largest, MIN_CHUNK) <= chunk <= largest
    assert chunk == largest or chunk % MIN_CHUNK == 0
    if chunk > MIN_CHUNK:  # above the floor the budget holds
        assert chunk * BUFFERS_PER_CHUNK * max(1, active) <= budget
    assert chunk_for(active + 1, budget, largest) <= chunk  # more downloads, never larger


class RecordingRepository(ArtifactRepository):
    """Records the size of every read the store asks of the disk."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.sizes: list[int] = []

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        self.sizes.append(size)
        return os.pread(fd, size, offset)

    def open(self, info: ArtifactInfo) -> BundleReader:
        return BundleReader(info.path, pread=self.pread)


async def download(
    store: ArtifactStore,
    cloud_dir: CloudDir,
    artifact: str,
    go: asyncio.Event,
    writers: list[asyncio.StreamWriter],
    limit: int,
) -> int:
    """One device's download: nothing is read until ``go``, then ``limit`` bytes (or all).

    The connection stays open (the caller aborts ``writers``), so the download stays in flight.
    """
    url = urlsplit(store.signer.presign(artifact, "dev1", 60))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        store.port,
        ssl=cloud_dir.client_context(cloud_dir.device("dev1")),
        server_hostname="127.0.0.1",
    )
    writers.append(writer)
    writer.write(
        f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    await go.wait()
    got = 0
    async with asyncio.timeout(30):
        while got < limit and (data := await reader.read(1 << 16)):
            got += len(data)
    return got


async def test_store_many_downloads_read_smaller_chunks_within_the_budget(
    cloud_dir: CloudDir, tmp_path: Path
) -> None:
    budget = 8 * MIB  # 8 downloads at once: 8 MiB / (4 x 8) = 256 KiB each
    config = cloud_dir.config().with_overrides(
        artifacts_dir=tmp_path / "artifacts", download_buffer_bytes=budget
    )
    keyring = Keyring.load(cloud_dir.keyring_dir)
    bundle = make_bundle(
        cloud_dir, tmp_path / "b.otab", image_size=32 * MIB, seed=13, compression="none"
    )
    info = await asyncio.to_thread(
        ArtifactRepository(config.artifacts_dir).import_file, bundle, keyring
    )
    store = ArtifactStore(
        config, keyring=keyring, ssl_context=cloud_dir.server_context(), host="127.0.0.1", port=0
    )
    repository = RecordingRepository(config.artifacts_dir)
    store.repository = repository
    writers: list[asyncio.StreamWriter] = []
    async with store:
        try:
            go = asyncio.Event()
            go.set()
            alone = await download(store, cloud_dir, info.artifact_id, go, writers, info.size * 2)
            assert alone > info.size  # headers + the whole body
            # One download alone reads the full configured chunk (the last read: the rest).
            assert repository.sizes[:-1] and set(repository.sizes[:-1]) == {MIB}

            go = asyncio.Event()
            # Before ``go`` the store already reads what the socket buffers take (a few MiB
            # on loopback, varying with load): the clients read far more than that after it.
            limit = 24 * MIB
            tasks = [
                asyncio.create_task(
                    download(store, cloud_dir, info.artifact_id, go, writers, limit)
                )
                for _ in range(8)
            ]
            # Each download reads its next chunk while it sends one, sized when it is issued.
            # Wait until all eight are sending and the store stopped reading (the socket
            # buffers are full): no read sized with fewer downloads is still in flight, so
            # every read counted below was sized with all eight sending. (Not open_files: the
            # first download's file may not be closed yet.)
            seen = -1
            for _ in range(100):  # bounded: 30 s
                if store.sending == 8 and len(repository.sizes) == seen:
                    break
                seen = len(repository.sizes)
                await asyncio.sleep(0.3)
            assert store.sending == 8
            repository.sizes.clear()  # from here on, eight downloads share the budget
            go.set()
            assert all(got >= limit for got in await asyncio.gather(*tasks))
            shared = list(repository.sizes)  # all eight are still in flight
        finally:
            for writer in writers:
                writer.transport.abort()
    assert len(shared) >= 8 * 8  # over 2 MiB each, in chunks of at most 256 KiB
    assert max(shared) <= budget // (BUFFERS_PER_CHUNK * 8)

"""Downloads cancelled while the store stops: no read on a closed descriptor, no descriptor leak.

The store reads the next chunk in a worker thread while it sends the current one, and a worker
thread cannot be cancelled. These tests slow the disk down (a pread that sleeps, or waits for
the test) so that reads are really in flight when the handlers are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import structlog
from plugins.cloud_env import make_bundle

from otad.bundle import Keyring
from otad.cloud.pki import CloudDir
from otad.cloud.store import ArtifactStore
from otad.cloud.store_files import ArtifactInfo, ArtifactRepository, BundleReader
from otad.errors import StoreError


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class GatedPread:
    """os.pread that waits for the test to let it go (a disk that answers when told)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fds: list[int] = []

    def __call__(self, fd: int, size: int, offset: int) -> bytes:
        self.fds.append(fd)
        self.entered.set()
        if not self.release.wait(10):
            raise TimeoutError("test never released the read")
        return os.pread(fd, size, offset)


def test_store_reader_close_waits_for_the_read_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"0123456789" * 1000)
    gate = GatedPread()
    reader = BundleReader(path, pread=gate)
    result: list[bytes] = []
    worker = threading.Thread(target=lambda: result.append(reader.read(10, 5)))
    worker.start()
    try:
        assert gate.entered.wait(10)
        reader.close()  # returns at once although the read is running
        fd = gate.fds[0]
        assert not reader.closed and fd_is_open(fd)
        assert not reader.wait_closed(0.05)
        gate.release.set()
        worker.join(10)
        assert result == [b"01234"]
        assert reader.wait_closed(10) and reader.closed
        assert not fd_is_open(fd) or os.readlink(f"/proc/self/fd/{fd}") != str(path)
    finally:
        gate.release.set()
        worker.join(10)
    with pytest.raises(StoreError, match="closed before this read"):
        reader.read(0, 1)
    reader.close()  # twice is harmless


def test_store_reader_idle_close_is_immediate(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    before = open_fds()
    reader = BundleReader(path)
    assert reader.read(1, 10) == b"bc"
    assert open_fds() == before + 1
    reader.close()
    assert reader.closed and open_fds() == before


def test_store_reader_many_threads_one_close(tmp_path: Path) -> None:
    """Reads racing a close: every read either completes with the right bytes or is refused."""
    path = tmp_path / "f"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    before = open_fds()
    for _ in range(20):
        reader = BundleReader(path)
        outcomes: list[str] = []

        def read(at: int, r: BundleReader = reader, out: list[str] = outcomes) -> None:
            try:
                got = r.read(at, 4096)
            except StoreError:
                out.append("refused")
                return
            out.append("ok" if got == data[at : at + 4096] else "WRONG")

        threads = [threading.Thread(target=read, args=(i * 4096,)) for i in range(16)]
        for t in threads:
            t.start()
        reader.close()
        for t in threads:
            t.join(10)
        assert reader.wait_closed(10)
        assert len(outcomes) == 16 and "WRONG" not in outcomes
    assert open_fds() == before


class SlowDiskRepository(ArtifactRepository):
    """The store's repository on a slow disk: each read takes ``delay`` seconds.

    Records every error a read met, so a read on a closed descriptor (EBADF) cannot go unseen
    in a worker thread whose result nobody awaits any more.
    """

    def __init__(self, directory: Path, delay: float) -> None:
        super().__init__(directory)
        self.delay = delay
        self.read_errors: list[BaseException] = []
        self.reads = 0
        self.readers: list[BundleReader] = []

    def slow_pread(self, fd: int, size: int, offset: int) -> bytes:
        self.reads += 1
        time.sleep(self.delay)
        try:
            return os.pread(fd, size, offset)
        except BaseException as exc:
            self.read_errors.append(exc)
            raise

    def open(self, info: ArtifactInfo) -> BundleReader:
        reader = BundleReader(info.path, pread=self.slow_pread)
        self.readers.append(reader)
        return reader


async def start_downloads(
    store: ArtifactStore, cloud_dir: CloudDir, artifact: str, count: int
) -> list[asyncio.StreamWriter]:
    """``count`` devices start the download and keep reading, at full speed."""
    writers = []
    for i in range(count):
        device = f"dev{i % 4 + 1}"
        url = urlsplit(store.signer.presign(artifact, device, 60))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            store.port,
            ssl=cloud_dir.client_context(cloud_dir.device(device)),
            server_hostname="127.0.0.1",
        )
        writer.write(f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        writers.append(writer)
        asyncio.get_running_loop().create_task(drain(reader), name=f"drain-{i}")
    return writers


async def drain(reader: asyncio.StreamReader) -> None:
    try:
        async with asyncio.timeout(30):
            while await reader.read(1 << 16):
                pass
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return


async def eventually(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {seconds} s")


async def test_store_stop_cancels_many_downloads_with_reads_in_flight(
    cloud_dir: CloudDir, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = cloud_dir.config().with_overrides(artifacts_dir=tmp_path / "artifacts")
    keyring = Keyring.load(cloud_dir.keyring_dir)
    big = make_bundle(cloud_dir, tmp_path / "big.otab", image_size=6 * 1024 * 1024, seed=11)
    info = await asyncio.to_thread(
        ArtifactRepository(config.artifacts_dir).import_file, big, keyring
    )
    baseline = open_fds()
    for round_no in range(3):
        store = ArtifactStore(
            config,
            keyring=keyring,
            ssl_context=cloud_dir.server_context(),
            host="127.0.0.1",
            port=0,
            chunk_size=64 * 1024,  # many reads per download
            shutdown_grace=0.2,  # handlers are cancelled almost at once
        )
        repository = SlowDiskRepository(config.artifacts_dir, delay=0.03)
        store.repository = repository
        await store.start()
        writers: list[asyncio.StreamWriter] = []
        with structlog.testing.capture_logs() as logs, caplog.at_level(logging.WARNING):
            try:
                writers = await start_downloads(store, cloud_dir, info.artifact_id, 24)
                # Every download is streaming: its reader is open in the store (registered on
                # the loop after the open in a thread returned) and reads keep coming.
                await eventually(lambda r=repository, s=store: s.open_files == 24 and r.reads > 48)
                in_flight_before = store.open_files
                await store.stop()
            finally:
                for writer in writers:
                    writer.transport.abort()
        assert in_flight_before == 24, round_no
        assert repository.read_errors == [], round_no  # no read ever met a closed descriptor
        assert all(reader.closed for reader in repository.readers)
        assert store.open_files == 0
        stopped = [e for e in logs if e["event"] == "store_stopped"]
        assert stopped and stopped[0]["unclosed_files"] == 0
        assert not [e for e in logs if e["log_level"] in ("error", "critical")]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        await asyncio.sleep(0.05)  # the aborted client sockets are released by the loop
    await eventually(lambda: open_fds() <= baseline, 10)


class HungDiskRepository(ArtifactRepository):
    """Reads block until the test releases them: a disk that stopped answering."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.gate = GatedPread()
        self.readers: list[BundleReader] = []

    def open(self, info: ArtifactInfo) -> BundleReader:
        reader = BundleReader(info.path, pread=self.gate)
        self.readers.append(reader)
        return reader


async def test_store_stop_is_bounded_when_a_read_hangs(cloud_dir: CloudDir, tmp_path: Path) -> None:
    config = cloud_dir.config().with_overrides(artifacts_dir=tmp_path / "artifacts")
    keyring = Keyring.load(cloud_dir.keyring_dir)
    bundle = make_bundle(cloud_dir, tmp_path / "b.otab", image_size=256 * 1024, seed=12)
    info = await asyncio.to_thread(
        ArtifactRepository(config.artifacts_dir).import_file, bundle, keyring
    )
    store = ArtifactStore(
        config,
        keyring=keyring,
        ssl_context=cloud_dir.server_context(),
        host="127.0.0.1",
        port=0,
        shutdown_grace=0.2,
    )
    store.read_close_timeout = 0.5
    repository = HungDiskRepository(config.artifacts_dir)
    store.repository = repository
    await store.start()
    writers: list[asyncio.StreamWriter] = []
    try:
        writers = await start_downloads(store, cloud_dir, info.artifact_id, 1)
        await eventually(repository.gate.entered.is_set)
        with structlog.testing.capture_logs() as logs:
            started = time.monotonic()
            await store.stop()
            took = time.monotonic() - started
        assert took < 0.2 + 0.5 + 3  # grace + read wait + slack, not "forever"
        left_open = [e for e in logs if e["event"] == "store_files_left_open"]
        assert left_open and left_open[0]["files"] == 1
        assert [e["unclosed_files"] for e in logs if e["event"] == "store_stopped"] == [1]
        # The disk answers at last: the read returns and closes the file itself.
        repository.gate.release.set()
        assert await asyncio.to_thread(repository.readers[0].wait_closed, 10)
        assert store.open_files == 0
    finally:
        repository.gate.release.set()
        for writer in writers:
            writer.transport.abort()

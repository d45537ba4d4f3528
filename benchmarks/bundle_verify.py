"""Throughput of the streaming bundle verifier next to its two ingredients, in one run.

Generates a compressible image (default 1 GiB: random blocks, repeated random blocks, text-like
records and zero runs, about 3-4:1 with zstd -3), builds a bundle, then measures over the same
bytes, hot in the page cache:

* ``sha256``: hashlib.sha256 over the image (1 MiB updates),
* ``zstd``: python-zstandard stream_reader decompression of the payload (1 MiB reads, discarded),
* ``verifier``: StreamVerifier fed the bundle in 1 MiB chunks, output discarded (checks the
  signature, decompresses, hashes payload and image), with its hashing thread and without.

MiB/s counts image bytes. Prints min / median / max over ``--reps`` and the goal ratio
``verifier / min(sha256, zstd)`` (goal >= 0.8). Usage::

    .venv/bin/python benchmarks/bundle_verify.py [--size 256M] [--reps 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zstandard

from otad import logs
from otad.bundle import (
    Keyring,
    StreamVerifier,
    VerifyPolicy,
    build_bundle,
    generate_private_key,
    load_private_key,
    private_key_pem,
    read_preamble,
)

CHUNK = 1 << 20
MIB = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def generate_image(path: Path, size: int, seed: int = 7) -> None:
    """A root-file-system-like mix that zstd -3 compresses about 3.5:1.

    Already-compressed data (random bytes), machine-code-like data (a skewed byte distribution,
    ~1.8:1), text-like records (~4:1) and free space (zeros), in 64-256 KiB runs. Every run is
    freshly generated, so nothing repeats across the zstd window by accident.
    """
    rng = random.Random(seed)
    # 0x00 and 0xff dominate machine code; the rest spreads over 64 values.
    skew = bytes(0 if b < 96 else 0xFF if b < 128 else b & 0x3F for b in range(256))
    words = [rng.randbytes(rng.randint(2, 6)).hex() for _ in range(3000)]
    text = "\n".join(" ".join(rng.choices(words, k=10)) + f" = {i}" for i in range(40000)).encode()
    zeros = bytes(256 << 10)
    written = 0
    with path.open("wb") as out:
        while written < size:
            kind = rng.random()
            if kind < 0.06:
                block = rng.randbytes(64 << 10)  # compressed media, archives
            elif kind < 0.36:
                block = rng.randbytes(128 << 10).translate(skew)  # executables, libraries
            elif kind < 0.78:
                start = rng.randrange(0, len(text) - (128 << 10))
                block = text[start : start + (128 << 10)]  # configuration, scripts, headers
            else:
                block = zeros  # free space
            block = block[: size - written]
            out.write(block)
            written += len(block)


def timed(fn: Callable[[], None]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds of the whole process, CPU seconds of the calling thread."""
    wall, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
    fn()
    return (
        time.perf_counter() - wall,
        time.process_time() - cpu,
        time.thread_time() - thread,
    )


def hash_image(image: Path) -> None:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with image.open("rb", buffering=0) as source:
        while n := source.readinto(buffer):
            digest.update(view[:n])


def decompress_payload(bundle: Path, offset: int) -> None:
    with bundle.open("rb") as source:
        source.seek(offset)
        reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=CHUNK)
        while reader.read(CHUNK):
            pass


def verify_bundle(bundle: Path, keyring: Keyring, *, threaded: bool) -> None:
    verifier = StreamVerifier(keyring, VerifyPolicy(compatible="bench"), threaded=threaded)
    with bundle.open("rb", buffering=0) as source:
        while chunk := source.read(CHUNK):
            for _ in verifier.feed(chunk):
                pass
    verifier.finish()


def warm(path: Path) -> None:
    with path.open("rb", buffering=0) as source:
        while source.read(8 * CHUNK):
            pass


def prepare(work: Path, size: int) -> tuple[Path, Path, Keyring, int]:
    """Image, bundle and keyring in ``work``; reused when a previous run left matching files."""
    image, bundle, key_file = work / "image.img", work / "image.otab", work / "key.pem"
    reuse = (
        image.exists() and image.stat().st_size == size and bundle.exists() and key_file.exists()
    )
    if not reuse:
        generate_image(image, size)
        key = generate_private_key()
        key_file.write_bytes(private_key_pem(key))
        start = time.perf_counter()
        build_bundle(image, bundle, key=key, version="1", compatible="bench")
        build_s = time.perf_counter() - start
        print(f"built in {build_s:.1f} s ({size / MIB / build_s:.0f} MiB/s)")
    key = load_private_key(key_file)
    with bundle.open("rb") as stream:
        payload_size = read_preamble(stream).header.payload_size
    return image, bundle, Keyring.from_keys([key.public_key()]), payload_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="image size, e.g. 256M or 1G")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep (and reuse) image and bundle here"
    )
    args = parser.parse_args()
    logs.configure(level="warning")
    size = parse_size(args.size)
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="otad-bench-")))
        else:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        image, bundle, keyring, payload_size = prepare(work, size)
        offset = bundle.stat().st_size - payload_size
        print(
            f"image {size / MIB:.0f} MiB, payload {payload_size / MIB:.1f} MiB "
            f"(ratio {size / payload_size:.2f}:1), cpus {os.cpu_count()}, "
            f"load {os.getloadavg()[0]:.1f}"
        )
        runs = {
            "sha256 (image)": lambda: hash_image(image),
            "zstd decompress (payload)": lambda: decompress_payload(bundle, offset),
            "StreamVerifier (bundle)": lambda: verify_bundle(bundle, keyring, threaded=True),
            "StreamVerifier, 1 thread": lambda: verify_bundle(bundle, keyring, threaded=False),
        }
        warm(image)
        warm(bundle)
        # Interleave the reps so a noisy neighbour hits all of them alike.
        samples: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for _ in range(args.reps):
            for name, fn in runs.items():
                wall, process, thread = timed(fn)
                samples[name].append(wall)
                cpu[name].append((process, thread))
        rates: dict[str, float] = {}
        for name, times in samples.items():
            mibs = sorted(size / MIB / t for t in times)
            rates[name] = statistics.median(mibs)
            print(
                f"{name:28s} MiB/s min {mibs[0]:7.0f}  median {rates[name]:7.0f}  "
                f"max {mibs[-1]:7.0f}"
            )
        slower = min(rates["sha256 (image)"], rates["zstd decompress (payload)"])
        ratio = rates["StreamVerifier (bundle)"] / slower
        per_rep = sorted(
            max(sha, dec) / ver
            for sha, dec, ver in zip(
                samples["sha256 (image)"],
                samples["zstd decompress (payload)"],
                samples["StreamVerifier (bundle)"],
                strict=True,
            )
        )
        # CPU seconds per GiB are far less sensitive to other load than wall time. With two free
        # cores the threaded verifier takes about max(caller thread, helper thread) of them.
        gib = size / (1 << 30)
        for name, pairs in cpu.items():
            process = min(p for p, _ in pairs) / gib
            thread = min(t for _, t in pairs) / gib
            print(
                f"{name:28s} CPU s/GiB: process {process:5.2f}, calling thread {thread:5.2f}, "
                f"other threads {max(process - thread, 0):5.2f}"
            )
        print(
            f"verifier / slower of the two: {ratio:.2f}x on medians, "
            f"{statistics.median(per_rep):.2f}x median per rep (goal >= 0.80), "
            f"load {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()

"""`otad bundle ...`: Build, sign, inspect and verify update bundles."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from otad.bundle import (
    ALGORITHMS,
    Keyring,
    StreamVerifier,
    VerifyPolicy,
    build_bundle,
    key_id_of,
    public_key_pem,
    read_preamble,
)
from otad.errors import ConfigError, Oversize, Truncated

__layer__ = "cli"

_CHUNK = 1 << 20


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = groups.add_parser(
        "bundle",
        help="Build, sign, inspect and verify update bundles.",
        description="Build, sign, inspect and verify update bundles.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    keygen = commands.add_parser(
        "keygen",
        help="create a signing key (KEY.pem) and its public key (KEY.pub.pem)",
        description="Create a signing key and its public key; prints the key id. Install the "
        "public key on devices as <keyring>/<key id>.pem.",
    )
    keygen.add_argument("--out", type=Path, required=True, metavar="KEY.pem")
    keygen.add_argument("--algorithm", choices=ALGORITHMS, default="ed25519")
    keygen.add_argument("--force", action="store_true", help="overwrite existing key files")
    keygen.set_defaults(handler=keygen_command)

    create = commands.add_parser(
        "create",
        help="build and sign a bundle from an image",
        description="Build and sign a bundle from a raw image, streaming (constant memory).",
    )
    create.add_argument("--image", type=Path, required=True)
    create.add_argument("--version", required=True)
    create.add_argument("--compatible", required=True)
    create.add_argument(
        "--key",
        type=Path,
        required=True,
        action="append",
        metavar="KEY.pem",
        help="signing key; repeat to sign with several keys (rotation)",
    )
    create.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.otab")
    create.add_argument("--security-version", type=_non_negative, default=0, metavar="N")
    create.add_argument("--compression", choices=["zstd", "none"], default="zstd")
    create.add_argument("--level", type=int, default=3, help="zstd level 1..19 (default 3)")
    create.add_argument("--expires", type=_timestamp, metavar="ISO8601")
    create.add_argument("--device", metavar="ID", help="bind the bundle to one device")
    create.set_defaults(handler=create_command)

    inspect = commands.add_parser(
        "inspect",
        help="show a bundle's header, manifest and signatures (not verified)",
        description="Show a bundle's header, manifest and signatures. Nothing is verified: "
        "use `otad bundle verify` for that.",
    )
    inspect.add_argument("bundle", type=Path, metavar="BUNDLE.otab")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(handler=inspect_command)

    verify = commands.add_parser(
        "verify",
        help="verify a bundle's signature, policy, sizes and hashes",
        description="Stream a bundle through the same verifier a device uses. Exit 0 only if "
        "every check passed.",
    )
    verify.add_argument("bundle", type=Path, metavar="BUNDLE.otab")
    verify.add_argument("--keyring", type=Path, required=True, metavar="DIR_OR_PEM")
    verify.add_argument("--compatible", metavar="C")
    verify.add_argument("--min-security-version", type=_non_negative, default=0, metavar="N")
    verify.add_argument("--device", metavar="ID", help="the device the bundle is for")
    verify.add_argument(
        "--allow-algorithm",
        action="append",
        choices=ALGORITHMS,
        metavar="ALG",
        help="accept only these signature algorithms (repeatable; default: all)",
    )
    verify.set_defaults(handler=verify_command)


# --- handlers ----------------------------------------------------------------------------------


def keygen_command(args: argparse.Namespace) -> int:
    # signing needs cryptography; importing it here keeps it out of every other otad process
    from otad.bundle.signing import generate_private_key, private_key_pem

    out: Path = args.out
    pub = _public_path(out)
    key = generate_private_key(args.algorithm)
    _write_new(out, private_key_pem(key), 0o600, force=args.force)
    _write_new(pub, public_key_pem(key), 0o644, force=args.force)
    key_id = key_id_of(key)
    print(f"key id:           {key_id}")
    print(f"algorithm:        {args.algorithm}")
    print(f"private key:      {out}")
    print(f"public key:       {pub} (install on devices as <keyring>/{key_id}.pem)")
    return 0


def create_command(args: argparse.Namespace) -> int:
    from otad.bundle.signing import load_private_key

    keys = [load_private_key(path) for path in args.key]
    with _progress("building") as progress:
        manifest = _io(
            lambda: build_bundle(
                args.image,
                args.output,
                key=keys,
                version=args.version,
                compatible=args.compatible,
                security_version=args.security_version,
                compression=args.compression,
                expires=args.expires,
                device=args.device,
                level=args.level,
                progress=progress,
            )
        )
    print(f"bundle:           {args.output}")
    _print_manifest(manifest.to_dict())
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    path: Path = args.bundle
    try:
        with path.open("rb") as stream:
            preamble = read_preamble(stream)
            file_size = os.fstat(stream.fileno()).st_size
    except OSError as exc:
        raise ConfigError(f"bundle: cannot read {path}: {exc.strerror}") from exc
    header = preamble.header
    manifest = preamble.manifest()
    if file_size < header.total_size:
        raise Truncated(f"bundle: {path} is {file_size} bytes, its header says {header.total_size}")
    if file_size > header.total_size:
        raise Oversize(f"bundle: {path} is {file_size} bytes, its header says {header.total_size}")
    info: dict[str, Any] = {
        "format_version": header.format_version,
        "total_size": header.total_size,
        "header_size": header.preamble_size,
        "payload_size": header.payload_size,
        "manifest": manifest.to_dict(),
        "signatures": [
            {"key_id": s.key_id, "algorithm": s.algorithm, "size": len(s.signature)}
            for s in preamble.signatures
        ],
        "verified": False,
    }
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"bundle:           {path} (NOT verified; use `otad bundle verify`)")
    print(f"format:           {header.format_version}")
    print(f"total size:       {header.total_size} bytes (preamble {header.preamble_size})")
    _print_manifest(info["manifest"])
    for sig in info["signatures"]:
        print(f"signature:        {sig['algorithm']} by key {sig['key_id']}")
    return 0


def verify_command(args: argparse.Namespace) -> int:
    keyring = Keyring.load(args.keyring)
    policy = VerifyPolicy(
        compatible=args.compatible,
        min_security_version=args.min_security_version,
        device_id=args.device,
        algorithms=frozenset(args.allow_algorithm or ALGORITHMS),
    )
    path: Path = args.bundle
    verifier = StreamVerifier(keyring, policy)
    try:
        stream = path.open("rb", buffering=0)
    except OSError as exc:
        raise ConfigError(f"bundle: cannot read {path}: {exc.strerror}") from exc
    with stream, _progress("verifying") as progress:
        done = 0
        # Fresh bytes, not a reused buffer: the verifier keeps fed bytes until they are hashed
        # and would have to copy a buffer the caller reuses.
        while data := _io(lambda: stream.read(_CHUNK)):
            for _ in verifier.feed(data):
                pass
            done += len(data)
            if progress is not None and verifier.total_size is not None:
                progress(done, verifier.total_size)
        manifest = verifier.finish()
    print(f"verified:         {path}")
    print(f"signed by:        {verifier.signer}")
    _print_manifest(manifest.to_dict())
    return 0


# --- helpers -----------------------------------------------------------------------------------


#: the manifest fields ``inspect`` prints first, in this order; others follow as JSON
_PRINTED_FIRST = (
    "version",
    "compatible",
    "security_version",
    "created",
    "expires",
    "device",
    "compression",
    "size",
    "sha256",
    "image_size",
    "image_sha256",
    "key_ids",
)
#: printed elsewhere or above, never again as an unknown field
_KNOWN_PRINTED = ("format_version", *_PRINTED_FIRST)


def _print_manifest(document: dict[str, Any]) -> None:
    for name in _PRINTED_FIRST:
        if name in document:
            value = document[name]
            text = ", ".join(value) if isinstance(value, list) else value
            print(f"{name + ':':<18}{text}")
    for name in sorted(set(document) - set(_KNOWN_PRINTED)):
        print(f"{name + ':':<18}{json.dumps(document[name])}")


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _io(action: Callable[[], Any]) -> Any:
    """Run ``action``, turning an OS error into a one-line CLI error."""
    try:
        return action()
    except OSError as exc:
        name = f" {exc.filename}" if exc.filename else ""
        raise ConfigError(f"bundle: I/O error{name}: {exc.strerror or exc}") from exc


def _write_new(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as exc:
        raise ConfigError(f"bundle: {path} exists (use --force to overwrite)") from exc
    except OSError as exc:
        raise ConfigError(f"bundle: cannot write {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), mode)
        out.write(data)


def _public_path(private: Path) -> Path:
    if private.suffix == ".pem":
        return private.with_suffix(".pub.pem")
    return private.with_name(private.name + ".pub.pem")


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _timestamp(text: str) -> datetime:
    """ISO 8601; a time without an offset is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)

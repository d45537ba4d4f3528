"""`otad cloud ...`: The backend: PKI, broker, replica, artifact store."""

from __future__ import annotations

import argparse
from pathlib import Path

__layer__ = "cli"


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = groups.add_parser(
        "cloud",
        help="The backend: PKI, broker, replica, artifact store.",
        description="The backend: PKI, broker, replica, artifact store.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    init = commands.add_parser(
        "init",
        help="create a cloud dir: CA, certificates, signing key, broker config, cloud config",
    )
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument(
        "--devices",
        type=_device_list,
        default=[],
        metavar="ID[,ID...]",
        help="device identities to issue now (more later with add-device)",
    )
    init.add_argument("--broker-port", type=int, default=8883)
    init.add_argument("--store-port", type=int, default=8443)
    init.add_argument(
        "--topic-template",
        default="state/{device_id}",
        help="shadow topic prefix, e.g. '$aws/things/{device_id}/shadow'",
    )
    init.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="extra IP address or DNS name for the server certificate (repeatable), "
        "e.g. the address a VM guest reaches the host on",
    )
    init.add_argument(
        "--signing-algorithm",
        choices=["p256", "ed25519"],
        default="p256",
        help="bundle signing key type (default p256: verifies faster with common OpenSSL)",
    )
    init.set_defaults(handler=_init)

    add = commands.add_parser(
        "add-device",
        help="issue a certificate and key per device (one batch: all or none)",
        description="Issue a certificate and key per device. The batch is checked first: one "
        "invalid, repeated or already enrolled id refuses all of them and writes nothing.",
    )
    add.add_argument("dir", type=Path, metavar="DIR")
    add.add_argument("device_ids", nargs="+", metavar="ID")
    add.set_defaults(handler=_add_device)

    revoke = commands.add_parser(
        "revoke-device",
        help="revoke a device certificate (CRL); restart broker and serve to apply",
    )
    revoke.add_argument("dir", type=Path, metavar="DIR")
    revoke.add_argument("device_id", metavar="ID")
    revoke.set_defaults(handler=_revoke_device)

    broker_cmd = commands.add_parser(
        "broker",
        help="run mosquitto with DIR's TLS + ACL config (foreground)",
        description="Regenerate broker/mosquitto.conf and broker/acl from otad-cloud.toml, then "
        "run the system mosquitto in their place (exec): signals go to mosquitto itself.",
    )
    broker_cmd.add_argument("dir", type=Path, metavar="DIR")
    broker_cmd.set_defaults(handler=_broker)

    serve_cmd = commands.add_parser(
        "serve",
        help="run the replica, the artifact store and the rollout service (foreground)",
        description="Run the replica, the artifact store and the rollout service of DIR in one "
        "process. The first SIGTERM/SIGINT stops it gracefully; a second one exits at once (130).",
    )
    serve_cmd.add_argument("dir", type=Path, metavar="DIR")
    serve_cmd.add_argument(
        "--store-host", help="listen address (default: store.host of the config)"
    )
    serve_cmd.add_argument("--store-port", type=int, help="listen port (default: store.port)")
    serve_cmd.add_argument(
        "--public-url", help="base of pre-signed URLs (default: store.public_url of the config)"
    )
    serve_cmd.add_argument(
        "--no-rollouts", action="store_true", help="do not run the rollout service here"
    )
    serve_cmd.set_defaults(handler=_serve)

    upload_cmd = commands.add_parser(
        "upload", help="verify a bundle against DIR's keyring and store it; prints the artifact id"
    )
    upload_cmd.add_argument("dir", type=Path, metavar="DIR")
    upload_cmd.add_argument("bundle", type=Path, metavar="BUNDLE")
    upload_cmd.set_defaults(handler=_upload)

    artifacts_cmd = commands.add_parser(
        "artifacts", help="list the stored artifacts: id, version, compatible, size"
    )
    artifacts_cmd.add_argument("dir", type=Path, metavar="DIR")
    artifacts_cmd.add_argument("--json", action="store_true", help="one JSON document")
    artifacts_cmd.set_defaults(handler=_artifacts)

    presign_cmd = commands.add_parser(
        "presign", help="print a pre-signed download URL of ARTIFACT for DEVICE"
    )
    presign_cmd.add_argument("dir", type=Path, metavar="DIR")
    presign_cmd.add_argument("artifact", metavar="ARTIFACT")
    presign_cmd.add_argument("device", metavar="DEVICE")
    presign_cmd.add_argument(
        "--expires",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="lifetime like 90s, 15m, 1h, 2d (default: store.presign_default_ttl)",
    )
    presign_cmd.set_defaults(handler=_presign)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds of ``90``, ``90s``, ``15m``, ``1h`` or ``2d``."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _UNITS else "s"
    number = value[:-1] if value[-1:] in _UNITS else value
    if not number.isdigit() or int(number) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 15m, 1h, 2d)")
    return int(number) * _UNITS[unit]


def _device_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# Handlers import the cloud modules themselves: `otad --help` and `otad bundle` stay fast and
# work on hosts without the cloud's dependencies.


def _init(args: argparse.Namespace) -> int:
    from otad.cloud import pki

    cloud = pki.init_cloud(
        args.dir,
        args.devices,
        broker_port=args.broker_port,
        store_port=args.store_port,
        topic_template=args.topic_template,
        server_sans=args.san,
        signing_algorithm=args.signing_algorithm,
    )
    print(f"cloud dir: {cloud.root}")
    print(f"  config:   {cloud.config_file}")
    print(f"  CA:       {cloud.ca_cert}")
    for device_id in cloud.device_ids():
        print(f"  device:   {device_id} ({cloud.device(device_id).cert})")
    print(f"  signing:  {cloud.signing_key} (public keys in {cloud.keyring_dir})")
    print(f"next: otad cloud broker {cloud.root} & otad cloud serve {cloud.root}")
    return 0


def _add_device(args: argparse.Namespace) -> int:
    from otad.cloud import pki

    for identity in pki.add_devices(args.dir, args.device_ids):
        print(identity.cert)
        print(identity.key)
    return 0


def _revoke_device(args: argparse.Namespace) -> int:
    from otad.cloud import pki

    archived = pki.revoke_device(args.dir, args.device_id)
    print(f"revoked {args.device_id}; certificate kept as {archived}")
    print("restart `otad cloud broker` and `otad cloud serve` to refuse it everywhere")
    return 0


def _broker(args: argparse.Namespace) -> int:
    from otad.cloud import broker, pki

    broker.exec_broker(pki.CloudDir(args.dir))


async def _serve(args: argparse.Namespace) -> int:
    from otad.cloud import pki, server

    cloud = pki.CloudDir(args.dir)
    cloud_server = server.CloudServer(
        cloud,
        store_host=args.store_host,
        store_port=args.store_port,
        public_url=args.public_url,
        rollouts=not args.no_rollouts,
    )
    return await server.serve(cloud_server)


def _upload(args: argparse.Namespace) -> int:
    from otad.bundle import Keyring
    from otad.cloud import pki, store

    cloud = pki.CloudDir(args.dir)
    config = cloud.config()
    repository = store.ArtifactRepository(config.artifacts_dir)
    info = repository.import_file(
        args.bundle,
        Keyring.load(cloud.keyring_dir),
        uploader="cli",
        max_bytes=config.max_upload_bytes,
    )
    print(info.artifact_id)
    return 0


def _presign(args: argparse.Namespace) -> int:
    from otad.cloud import pki, store

    config = pki.CloudDir(args.dir).config()
    repository = store.ArtifactRepository(config.artifacts_dir)
    repository.info(args.artifact)  # ArtifactNotFound: no URL for something that is not there
    print(store.presign(config, args.artifact, args.device, args.expires))
    return 0


def _artifacts(args: argparse.Namespace) -> int:
    import json

    from otad.cloud import pki, store

    config = pki.CloudDir(args.dir).config()
    infos = store.ArtifactRepository(config.artifacts_dir).all()
    if args.json:
        print(json.dumps({"artifacts": [info.to_json() for info in infos]}, indent=1))
        return 0
    print(f"{'ID':<64}  {'VERSION':<12} {'COMPATIBLE':<20} {'SECVER':>6} {'SIZE':>12}")
    for info in infos:
        manifest = info.manifest
        print(
            f"{info.artifact_id:<64}  {manifest.get('version', '?')!s:<12} "
            f"{manifest.get('compatible', '?')!s:<20} "
            f"{manifest.get('security_version', '?')!s:>6} {info.size:>12}"
        )
    return 0

"""`otad cloud ...`: The backend: PKI, broker, replica, artifact store."""

from __future__ import annotations

import argparse
from pathlib import Path

from otad.cloud import pki

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

    add = commands.add_parser("add-device", help="issue a certificate and key for a device")
    add.add_argument("dir", type=Path, metavar="DIR")
    add.add_argument("device_id", metavar="ID")
    add.set_defaults(handler=_add_device)


def _device_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _init(args: argparse.Namespace) -> int:
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
    identity = pki.add_device(args.dir, args.device_id)
    print(identity.cert)
    print(identity.key)
    return 0

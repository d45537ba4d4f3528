"""`otad shadow ...`: operator tools for device shadows, and a stand-alone replica process.

``otad shadow get DIR ID`` and ``otad shadow update DIR ID --desired JSON`` talk to the replica
over the broker with the cloud dir's fleet identity and print the answer as JSON.
``otad shadow serve DIR`` runs one replica process (``otad cloud serve`` runs the replica and the
artifact store together); start several to split the load over the shared subscription.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from otad import shadow
from otad.errors import ShadowBadRequest

if TYPE_CHECKING:
    from otad.cloud.pki import CloudDir
    from otad.cloud.replica import BrokerSettings

# otad.cloud.* (and aiomqtt behind it) is imported inside the handlers: `otad bundle ...` must
# start on a build host that has none of the network libraries.

__layer__ = "cli"

log = structlog.get_logger(__name__)


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = groups.add_parser(
        "shadow",
        help="Operator tools for device shadows.",
        description="Read and change device shadows; run a replica process.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    get = commands.add_parser("get", help="print a device's shadow document")
    get.add_argument("dir", type=Path, help="cloud dir (otad cloud init)")
    get.add_argument("device_id")
    get.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    get.set_defaults(handler=_get)

    update = commands.add_parser(
        "update", help="merge desired and/or reported state into a device's shadow"
    )
    update.add_argument("dir", type=Path, help="cloud dir (otad cloud init)")
    update.add_argument("device_id")
    update.add_argument("--desired", help="JSON object to merge into desired (null deletes)")
    update.add_argument("--reported", help="JSON object to merge into reported (null deletes)")
    update.add_argument(
        "--version", type=int, help="apply only if the shadow is at this version (else 409)"
    )
    update.add_argument("--timeout", type=float, default=10.0)
    update.set_defaults(handler=_update)

    serve = commands.add_parser("serve", help="run a replica process (until SIGTERM/SIGINT)")
    serve.add_argument("dir", type=Path, help="cloud dir (otad cloud init)")
    serve.add_argument("--db", type=Path, help="database file (default: from the cloud config)")
    serve.add_argument(
        "--share-group",
        help="MQTT shared subscription group; replicas in one group split the load (default: "
        "the cloud dir's own, derived from its pre-sign secret)",
    )
    serve.add_argument(
        "--session",
        metavar="ID",
        help="keep a persistent MQTT session under this client id: the broker queues requests "
        "while this replica is down (default: a clean session; requests sent meanwhile are lost)",
    )
    serve.set_defaults(handler=_serve)


def _broker(cloud: CloudDir, who: str) -> tuple[BrokerSettings, str]:
    from otad.cloud.replica import BrokerSettings

    config = cloud.config()
    settings = BrokerSettings(
        config.broker_host, config.broker_port, cloud.client_context(cloud.service(who))
    )
    return settings, config.topic_template


def _section(text: str | None, name: str) -> Any:
    if text is None:
        return shadow.ABSENT
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ShadowBadRequest(f"shadow: --{name} is not valid JSON: {exc}") from exc
    if value is not None and not isinstance(value, dict):
        raise ShadowBadRequest(f"shadow: --{name} must be a JSON object or null")
    return value


def _print(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


async def _get(args: argparse.Namespace) -> int:
    from otad.cloud.pki import CloudDir
    from otad.cloud.replica import ShadowClient

    settings, template = _broker(CloudDir(args.dir), "fleet")
    async with ShadowClient(settings, template, timeout=args.timeout) as client:
        _print(await client.get(args.device_id))
    return 0


async def _update(args: argparse.Namespace) -> int:
    desired = _section(args.desired, "desired")
    reported = _section(args.reported, "reported")
    if desired is shadow.ABSENT and reported is shadow.ABSENT:
        raise ShadowBadRequest("shadow: give --desired and/or --reported")
    from otad.cloud.pki import CloudDir
    from otad.cloud.replica import ShadowClient

    settings, template = _broker(CloudDir(args.dir), "fleet")
    async with ShadowClient(settings, template, timeout=args.timeout) as client:
        accepted = await client.update(
            args.device_id, desired=desired, reported=reported, version=args.version
        )
    _print(accepted)
    return 0


async def _serve(args: argparse.Namespace) -> int:
    from otad.cloud.db import SqliteStore
    from otad.cloud.pki import CloudDir
    from otad.cloud.replica import Replica

    cloud = CloudDir(args.dir)
    settings, template = _broker(cloud, "replica")
    if args.session:
        settings = dataclasses.replace(settings, identifier=args.session, persistent=True)
    db = args.db or cloud.config().db_path
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with SqliteStore(db) as store:
        group = args.share_group or cloud.config().replica_share_group()
        replica = Replica(store, settings, template=template, share_group=group)
        log.info("replica_starting", db=str(db), template=template)
        await replica.run(stop)
        log.info(
            "replica_stopped",
            commits=store.batches,
            units=store.units,
            writer_busy_s=round(store.busy_seconds, 3),
            commit_s=round(store.commit_seconds, 3),
            **vars(replica.stats),
        )
    return 0

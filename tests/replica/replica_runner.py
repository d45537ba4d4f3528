"""A replica process for crash tests: like `otad shadow serve`, plus a SIGKILL fault point.

    python replica_runner.py CLOUD_DIR DB [--kill-at received|committed] [--kill-after N]

Prints ``ready`` on stdout once subscribed. With ``--kill-at``, the process SIGKILLs itself the
N-th time the replica reaches that point: a real crash at an exact place (after the commit and
before any publish, say), which no timing from outside can hit reliably.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path

from otad import logs
from otad.cloud.db import SqliteStore
from otad.cloud.pki import CloudDir
from otad.cloud.replica import BrokerSettings, Replica


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cloud_dir", type=Path)
    parser.add_argument("db", type=Path)
    parser.add_argument("--kill-at", choices=["received", "committed"])
    parser.add_argument("--kill-after", type=int, default=1)
    args = parser.parse_args()
    logs.configure()
    cloud = CloudDir(args.cloud_dir)
    config = cloud.config()
    settings = BrokerSettings(
        config.broker_host, config.broker_port, cloud.client_context(cloud.service("replica"))
    )
    seen = 0

    def fault(point: str) -> None:
        nonlocal seen
        if point == args.kill_at:
            seen += 1
            if seen >= args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with SqliteStore(args.db) as store:
        replica = Replica(store, settings, template=config.topic_template, fault=fault)
        task = asyncio.create_task(replica.run(stop))
        await asyncio.wait_for(replica.ready.wait(), 20)
        print("ready", flush=True)
        await task
        print("stats", json.dumps(vars(replica.stats)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())

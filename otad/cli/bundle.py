"""`otad bundle ...`: Build, sign, inspect and verify update bundles."""

from __future__ import annotations

import argparse

__layer__ = "cli"


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = groups.add_parser(
        "bundle",
        help="Build, sign, inspect and verify update bundles.",
        description="Build, sign, inspect and verify update bundles.",
    )
    parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

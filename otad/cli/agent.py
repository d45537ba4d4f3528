"""`otad agent ...`: The device agent: run the daemon, local status and installs."""

from __future__ import annotations

import argparse

__layer__ = "cli"


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = groups.add_parser(
        "agent",
        help="The device agent: run the daemon, local status and installs.",
        description="The device agent: run the daemon, local status and installs.",
    )
    parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

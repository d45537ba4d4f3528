"""`otad shadow ...`: Operator tools for device shadows."""

from __future__ import annotations

import argparse

__layer__ = "cli"


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = groups.add_parser(
        "shadow",
        help="Operator tools for device shadows.",
        description="Operator tools for device shadows.",
    )
    parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

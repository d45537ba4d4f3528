"""`otad demo ...`: Run the end-to-end demo on loopback."""

from __future__ import annotations

import argparse

__layer__ = "cli"


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = groups.add_parser(
        "demo",
        help="Run the end-to-end demo on loopback.",
        description="Run the end-to-end demo on loopback.",
    )
    parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

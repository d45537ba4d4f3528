"""`otad cloud ...`: The backend: PKI, broker, replica, artifact store."""

from __future__ import annotations

import argparse

__layer__ = "cli"


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = groups.add_parser(
        "cloud",
        help="The backend: PKI, broker, replica, artifact store.",
        description="The backend: PKI, broker, replica, artifact store.",
    )
    parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

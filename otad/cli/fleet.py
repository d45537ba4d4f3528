"""`otad fleet ...`: Rollouts across a fleet, fleet status, simulated devices."""

from __future__ import annotations

import argparse

__layer__ = "cli"


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = groups.add_parser(
        "fleet",
        help="Rollouts across a fleet, fleet status, simulated devices.",
        description="Rollouts across a fleet, fleet status, simulated devices.",
    )
    parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

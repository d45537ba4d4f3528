"""The ``otad`` command line: argument parsing only; every command calls into the modules.

Each group lives in its own module with a ``register(subparsers)`` function. A command's handler
takes the parsed ``argparse.Namespace`` and returns an exit code (it may be a coroutine
function). Errors from the tree in :mod:`otad.errors` end the command with exit code 1 and one
line on stderr naming the problem; nothing else prints a traceback for expected failures.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys
from collections.abc import Sequence

from otad import logs
from otad.cli import agent, bundle, cloud, demo, fleet, shadow
from otad.errors import OtadError

__layer__ = "cli"

_GROUPS = (bundle, agent, cloud, shadow, fleet, demo)


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked: importlib.metadata costs ~1 MiB resident in
    every process that builds the parser, the agent included."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS) -> None:
        super().__init__(
            option_strings, dest, default=argparse.SUPPRESS, nargs=0, help="show the version"
        )

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        import otad

        print(f"otad {otad.__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otad", description="Safe over-the-air A/B updates for embedded-Linux fleets."
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument(
        "--log-json", action="store_true", help="log JSON lines instead of key=value"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    groups = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    for module in _GROUPS:
        module.register(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(json=args.log_json, level=args.log_level)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "--help"])
        return 2
    try:
        result = handler(args)
        if inspect.isawaitable(result):
            result = asyncio.run(result)  # type: ignore[arg-type]
    except OtadError as exc:
        print(f"otad: error: {exc.code}: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        # a device image carries the agent's libraries only (the cloud side needs aiohttp)
        library = (exc.name or "").partition(".")[0]
        if not library or library == "otad":
            raise
        print(
            f"otad: error: missing_library: `otad {args.group}` needs the Python package "
            f"{library!r}, which this installation does not have",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("otad: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

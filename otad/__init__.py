"""otad: safe over-the-air A/B updates for fleets of embedded-Linux devices."""

import sys

__layer__ = "pure"

if "structlog" not in sys.modules and "rich" not in sys.modules:
    # structlog imports rich at import time when it is installed, for tracebacks rendered in
    # colour (~5 MiB resident in every process, the agent included). otad's logs are one plain
    # line per event, so structlog is imported without it; an explicit `import rich` later (the
    # CLI's progress bars and tables) still works, the entry is removed again.
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


def __getattr__(name: str) -> str:
    # importlib.metadata costs ~4 MiB resident (email, zipfile, csv): only --version needs it
    if name != "__version__":
        raise AttributeError(name)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("otad")
    except PackageNotFoundError:  # running from a source tree without an install
        return "0.0.0"

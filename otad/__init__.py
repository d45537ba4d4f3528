"""otad: safe over-the-air A/B updates for fleets of embedded-Linux devices."""

from importlib.metadata import PackageNotFoundError, version

__layer__ = "pure"

try:
    __version__ = version("otad")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

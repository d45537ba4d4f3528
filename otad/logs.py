"""Structured logging: one event per line, key=value or JSON, secrets never written.

Every process calls :func:`configure` once. Modules get a logger with
``structlog.get_logger(__name__)`` and log past-tense snake_case events with fields.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import structlog

__layer__ = "adapter"

_SECRET_KEYS = re.compile(r"(token|secret|password|signature|authorization|key_pem)", re.I)
_URL_IN_TEXT = re.compile(r"https?://[^\s\"']+")


def redact_url(url: str) -> str:
    """Drop the query and fragment of a URL: pre-signed URLs carry their credential there."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if not parts.query and not parts.fragment:
        return url
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "<redacted>", ""))


def redact_text(text: str) -> str:
    """``text`` with the query and fragment of every URL in it dropped.

    For free text that may quote a URL (an exception's message): it may reach a log line or
    the shadow, and a pre-signed URL carries its credential in the query."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: blank secret-looking fields, strip query strings from URLs."""
    for key in list(event_dict):
        if _SECRET_KEYS.search(key):
            event_dict[key] = "<redacted>"
        else:
            event_dict[key] = _redact_value(event_dict[key])
    return event_dict


def configure(*, json: bool = False, level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog for this process; safe to call more than once."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )

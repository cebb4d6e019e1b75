"""structlog set-up: readable in a terminal, JSON when not a TTY or when asked, and never a
credential in a log line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer

from decision_router.settings import MASK, SECRET_NAMES, redact_text

# structlog's dict_tracebacks without the frames' locals: each is cut to 80 characters, which can cut a URL
# before its "@" so that no pattern knows it for one, and a local may hold a secret under a plain name.
_DICT_TRACEBACKS = structlog.processors.ExceptionRenderer(
    ExceptionDictTransformer(show_locals=False)
)


def _secret_key(key: object) -> bool:
    # `secret_file` / `..._env` name where a secret is kept, not the secret: shown as is.
    return isinstance(key, str) and SECRET_NAMES.search(key) is not None and not key.endswith(("_file", "_env", "_path"))


def _redact(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if depth > 20:  # a log value this deep is a bug elsewhere; do not recurse for ever
        return value
    if isinstance(value, Mapping):
        return {
            k: MASK if _secret_key(k) and v not in (None, "") else _redact(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(_redact(v, depth + 1) for v in value)
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    return value


def redact_secrets(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: values under secret-looking keys (password, token, secret,
    authorization, api_key, ...) are masked anywhere in the event, and URL passwords,
    secret query parameters and bearer tokens are masked in every string, exception text
    and rendered traceback included. Runs after exceptions are formatted."""
    return _redact(event_dict)  # type: ignore[no-any-return]


def configure_logging(*, fmt: str = "auto", level: str = "info", stream=None) -> None:
    stream = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Exceptions are rendered as one field, never a multi-line dump in JSON mode.
            _DICT_TRACEBACKS if as_json else structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        # One write per line (print() writes the newline separately): worker processes share
        # stderr, and a line written whole is not interleaved with another worker's.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )

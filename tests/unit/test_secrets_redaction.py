"""No credential in a log line: URL passwords, secret query parameters, bearer tokens and
values under secret-looking keys are masked wherever they sit in an event, exception text
and tracebacks included."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from decision_router.logs import configure_logging
from decision_router.settings import redact_text, redact_url

SECRET = "hunter2-Zq9"


@pytest.fixture(autouse=True)
def _reset_structlog():
    yield
    structlog.reset_defaults()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://:{SECRET}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        (f"rediss://default:{SECRET}@cache:6380/0?ssl_cert_reqs=required", "rediss://default:***@cache:6380/0?ssl_cert_reqs=required"),
        (f"redis://cache:6379/0?password={SECRET}&db=1", "redis://cache:6379/0?password=***&db=1"),
        (f"postgresql+psycopg://app:{SECRET}@db:5432/router", "postgresql+psycopg://app:***@db:5432/router"),
        (f"postgresql+psycopg://app:p@ss:{SECRET}@db/router", "postgresql+psycopg://app:***@db/router"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("postgresql+psycopg://app@db/router", "postgresql+psycopg://app@db/router"),
    ],
)
def test_redact_url_and_redact_text(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert redact_text(f"cannot reach {url} (timeout)") == f"cannot reach {shown} (timeout)"


def test_redact_text_masks_tokens_and_leaves_ordinary_text() -> None:
    assert redact_text(f"Authorization: Bearer {SECRET}abcdef") == "Authorization: Bearer ***"
    assert redact_text(f"call https://hooks.example/x?token={SECRET}") == "call https://hooks.example/x?token=***"
    plain = "routed 3 predictions at 12:30; see http://example.com/a@b and user@example.com"
    assert redact_text(plain) == plain


def logged(fmt: str, emit) -> str:
    stream = io.StringIO()
    configure_logging(fmt=fmt, stream=stream)
    emit(structlog.get_logger("t"))
    return stream.getvalue()


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_secrets_are_masked_anywhere_in_an_event(fmt: str) -> None:
    def emit(log) -> None:
        log.info(
            "connecting",
            url=f"redis://:{SECRET}@cache:6379/0",
            password=SECRET,
            smtp={"host": "mail", "password": SECRET, "port": 25},
            headers=[{"Authorization": f"Bearer {SECRET}xyz"}],
            api_key=SECRET,
            secret_file="/run/secrets/webhook",  # where a secret is kept: not itself a secret
            tokens_used=3,
        )

    text = logged(fmt, emit)
    assert SECRET not in text
    assert "connecting" in text and "redis://:***@cache:6379/0" in text
    assert "/run/secrets/webhook" in text
    if fmt == "json":
        event = json.loads(text)
        assert event["password"] == "***" and event["smtp"] == {"host": "mail", "password": "***", "port": 25}
        assert event["headers"] == [{"Authorization": "***"}] and event["api_key"] == "***"
        assert event["tokens_used"] == 3


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_exception_text_and_tracebacks_are_masked(fmt: str) -> None:
    def emit(log) -> None:
        dsn = f"postgresql+psycopg://app:{SECRET}@db:5432/router"  # a local in the failing frame
        try:
            raise ConnectionError(f"cannot connect to {dsn}: refused")
        except ConnectionError:
            log.exception("store unavailable", dsn=dsn)
        log.error("failed", error=ValueError(f"bad url redis://:{SECRET}@x:1/0"))

    text = logged(fmt, emit)
    assert SECRET not in text
    assert "cannot connect to postgresql+psycopg://app:***@db:5432/router: refused" in text
    assert "ConnectionError" in text and "ValueError" in text


def test_a_traceback_never_carries_the_failing_frames_locals() -> None:
    """JSON tracebacks (structlog's dict_tracebacks) used to list each frame's locals, each cut to 80
    characters: a URL whose password ran past the cut lost its `@`, so no pattern knew it for a URL and
    the password's start was logged; and a local holding a secret under a plain name (a webhook's HMAC
    key, a password read from a file) was logged as it was."""
    long_secret = SECRET * 8  # puts the URL's "@" past the 80-character cut

    def emit(log) -> None:
        target = f"postgresql+psycopg://router_service_account:{long_secret}@db.internal:5432/router"
        key = SECRET.encode()  # a secret no name or pattern tells apart
        try:
            raise ConnectionError("cannot connect to the database: refused")
        except ConnectionError:
            log.exception("store unavailable", target_len=len(target), key_len=len(key))

    text = logged("json", emit)
    assert SECRET[:6] not in text
    frames = json.loads(text)["exception"][0]["frames"]
    assert frames and all("locals" not in frame for frame in frames)
    assert "cannot connect to the database: refused" in text

"""Small helpers shared by the route modules: app state, filter parsing, store access."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import Header, HTTPException, Request
from pydantic import BeforeValidator
from sqlmodel import Session

from decision_router import durations
from decision_router.keys import Keys
from decision_router.pipeline import utcnow
from decision_router.rules import RuleSet
from decision_router.settings import Settings

T = TypeVar("T")


def settings_of(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def keys_of(request: Request) -> Keys:
    return Keys(settings_of(request).stream_prefix)


def ruleset_of(request: Request) -> RuleSet:
    return request.app.state.ruleset()  # type: ignore[no-any-return]


# The description of a name filter checked as stats_filters checks it (/v1/stats, the dashboard's ops view).
UNKNOWN_IS_422 = "; when nothing matches, one that neither the rules nor the store know is a 422 with the close match."


def query_error(field: str, message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=[{"loc": ["query", field], "msg": message, "type": "value_error"}])


def body_error(field: str | None, message: str) -> HTTPException:
    """A 422 naming a field of the body, or (`field` None) the body as a whole, as FastAPI names it."""
    loc = ["body"] if field is None else ["body", field]
    return HTTPException(status_code=422, detail=[{"loc": loc, "msg": message, "type": "value_error"}])


def _unsupported_media_type(request: Request) -> HTTPException:
    kind = request.headers.get("content-type", "")
    return HTTPException(status_code=415, detail=[{
        "loc": ["body"], "type": "unsupported_media_type",
        "msg": f"send JSON with Content-Type: application/json, not {kind[:100]!r}",
    }])


def json_body(request: Request, body: Any) -> Any:
    """A `Body()` of any JSON: FastAPI hands a body sent with another Content-Type (a form, text)
    over as its bytes, unparsed; refuse it as a 415 naming the body, as malformed JSON is a 422."""
    if isinstance(body, bytes):
        raise _unsupported_media_type(request)
    return body


def _is_json(content_type: str | None) -> bool:
    """FastAPI's own test (strict: a body without a Content-Type is not read as JSON): application/json or
    application/*+json, parameters aside."""
    if not content_type:
        return False
    kind = content_type.partition(";")[0].strip().lower()
    main, _, sub = kind.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


async def json_content(request: Request) -> None:
    """A dependency for the endpoints whose body is a model: FastAPI validates a form or text body as
    its bytes, a 422 "not a dictionary" that names nothing (curl -d sends a form); a 415 as json_body's."""
    if not _is_json(request.headers.get("content-type")) and await request.body():
        raise _unsupported_media_type(request)


IDEMPOTENCY_KEY_MAX = 200


def idempotency_key(
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Any text (printable ASCII, at most 200 characters) unique to this request: a retry with "
            "the same key, from the same token, applies its events once.",
        ),
    ] = None,
) -> str | None:
    if key is None:
        return None
    if not 0 < len(key) <= IDEMPOTENCY_KEY_MAX or not all("!" <= c <= "~" for c in key):
        raise HTTPException(status_code=422, detail=[{
            "loc": ["header", "Idempotency-Key"], "type": "value_error",
            "msg": f"1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters, no spaces",
        }])
    return key


def _blank_is_none(value: Any) -> Any:
    return None if value == "" else value


# A query parameter of a fixed set of values (`?state=`, `?action=`) left blank is no filter, as a blank owner, rule
# or since is: a script's unset variable or a form's empty field. Pydantic still refuses any other value not in the
# set, naming the allowed ones.
BlankIsNone = BeforeValidator(_blank_is_none)


def query_a_store_can_hold(request: Request) -> None:
    """An app-wide dependency: a NUL in a query parameter (`?rule=a%00b`) is a 422 naming it. PostgreSQL
    refuses NUL in text, so any filter holding one was a 500 there (SQLite answered an empty list)."""
    for name, value in request.query_params.multi_items():
        if "\x00" in value:
            raise query_error(name, "text holds a NUL character, which no stored value holds")


def parse_since(value: str | None, field: str = "since") -> datetime | None:
    """The CLI's `--since`: a duration ago (7d, 24h) or an ISO date/time (UTC if naive)."""
    if value is None or value == "":
        return None
    try:
        return durations.parse_since(value, now=utcnow())
    except ValueError as exc:
        raise query_error(field, str(exc)) from None


def parse_window(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    """`since` and `until` as parse_since reads them; an empty window is the caller's mistake, not "no data"."""
    start, end = parse_since(since, "since"), parse_since(until, "until")
    if start is not None and end is not None and start >= end:
        raise query_error("until", "must be after since")
    return start, end


def parse_entity(value: str | None, field: str = "entity") -> tuple[str, str] | None:
    """`account:acct-17` -> ("account", "acct-17")."""
    if value is None or value == "":
        return None
    entity_type, sep, entity_id = value.partition(":")
    if not sep or not entity_type or not entity_id:
        raise query_error(field, f"must look like TYPE:ID (e.g. account:acct-17), not {value!r}")
    return entity_type, entity_id


async def read_store(request: Request, work: Callable[[Session], T]) -> T:
    """Run a blocking store read in a thread, so the event loop keeps serving."""
    engine = request.app.state.engine

    def run() -> T:
        with Session(engine) as session:
            return work(session)

    return await asyncio.to_thread(run)


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value

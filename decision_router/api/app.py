"""The FastAPI application: wiring only; the endpoints live in routes_*.py.

Served by `decision-router serve` next to the stream consumers (sharing their pipeline)
or alone by `decision-router api`; see api/server.py.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import structlog
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.asyncio import Redis
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from decision_router import __version__
from decision_router.api.actions import QueueOnlyChannels
from decision_router.api.auth import Principal, require
from decision_router.api.common import query_a_store_can_hold
from decision_router.api.limits import BodyLimit, max_body_bytes
from decision_router.pipeline import Pipeline
from decision_router.redis_client import REDIS_ERRORS
from decision_router.rules import RuleSet
from decision_router.settings import Settings

log = structlog.get_logger("decision_router.api")


def create_app(
    settings: Settings,
    *,
    engine: Engine,
    redis: Redis,
    ruleset: RuleSet | Callable[[], RuleSet],
    reload_rules: Callable[[], Awaitable[Any]] | None = None,
    reload_origin: str | None = None,
    pipeline: Pipeline | None = None,
) -> FastAPI:
    """`pipeline`: the running service's, so actions use its channels and current rules;
    without one the app builds its own for outcome events (see api/actions.py). `reload_origin`:
    the service whose rules `reload_rules` reloads (RouterService.instance), so that its reload
    broadcast does not reload it twice."""
    app = FastAPI(
        title="decision-router",
        version=__version__,
        description="Route model predictions to named owners; track what they did and whether it worked.",
        docs_url=None,  # /docs is served by routes_docs without CDN assets
        redoc_url=None,
        dependencies=[Depends(query_a_store_can_hold)],
    )
    current: Callable[[], RuleSet] = ruleset if callable(ruleset) else (lambda: ruleset)
    app.state.settings = settings
    app.state.engine = engine
    app.state.redis = redis
    app.state.ruleset = current
    app.state.reload_rules = reload_rules
    app.state.reload_origin = reload_origin
    app.state.owns_pipeline = pipeline is None
    if pipeline is None:
        rules = current()
        pipeline = Pipeline(settings=settings, ruleset=rules, engine=engine, redis=redis)
        pipeline.channels = QueueOnlyChannels(settings, rules)  # type: ignore[assignment]
    app.state.pipeline = pipeline

    _install_error_handlers(app)

    @app.middleware("http")
    async def log_request(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        # DEBUG only: a busy dashboard or scraper must not flood the INFO log.
        log.debug(
            "http request",
            method=request.method,
            path=request.url.path,
            status=response.status_code,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return response

    @app.get("/v1/whoami", tags=["auth"], summary="The caller's role and owner id (any token)")
    def whoami(
        principal: Annotated[Principal, Depends(require("publisher", "owner", "ops", "admin"))],
    ) -> dict[str, Any]:
        return {"role": principal.role, "owner": principal.owner}

    from decision_router.api import (
        routes_admin,
        routes_alerts,
        routes_docs,
        routes_health,
        routes_outcomes,
        routes_predictions,
        routes_stats,
    )

    for module in (
        routes_health,
        routes_predictions,
        routes_alerts,
        routes_outcomes,
        routes_stats,
        routes_admin,
        routes_docs,
    ):
        app.include_router(module.router)

    from decision_router.api.dashboard import router as dashboard_router

    app.include_router(dashboard_router)
    # Outermost, so an oversized body is refused before any other work.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes(settings))
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's shape ({"detail": [{"loc": [...], "msg": ...}]}) names the field; the
        # rejected input is left out so a large or secret body is not echoed back.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        why = unreadable_json(exc)
        if why is None:
            return await http_exception_handler(request, exc)
        # Malformed JSON too, so the same 422 naming the body as a syntax error, not FastAPI's bare 400.
        return JSONResponse(
            {"detail": [{"loc": ["body"], "msg": f"the body is not JSON that can be read: {why}", "type": "json_invalid"}]},
            status_code=422,
        )

    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("redis unavailable for a request", path=request.url.path, error=str(exc))
        return JSONResponse({"detail": "Redis is unavailable; retry later"}, status_code=503)

    for error in REDIS_ERRORS:  # a cluster client's own errors too (no node reachable)
        app.add_exception_handler(error, redis_down)

    @app.exception_handler(OperationalError)
    async def database_down(request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable for a request", path=request.url.path, error=exc.__class__.__name__)
        return JSONResponse({"detail": "the database is unavailable; retry later"}, status_code=503)


def unreadable_json(exc: StarletteHTTPException) -> str | None:
    """Why FastAPI could not parse a JSON body, when that is what its 400 stands for: it answers a syntax error
    itself (a 422), but a body json.loads fails on otherwise becomes "There was an error parsing the body",
    raised from the parser's error."""
    cause = exc.__cause__
    if exc.status_code != 400:
        return None
    if isinstance(cause, UnicodeDecodeError):
        return f"not UTF-8 (byte {cause.object[cause.start]:#04x} at offset {cause.start})"
    if isinstance(cause, RecursionError):
        return "nested too deep to parse"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return f"a number has more than {sys.get_int_max_str_digits()} digits"
    return None

"""GET /healthz, /readyz (no token: they say nothing about the data) and /metrics (ops)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from decision_router import metrics
from decision_router.api.auth import Principal, require
from decision_router.api.common import keys_of, settings_of
from decision_router.redis_client import REDIS_ERRORS
from decision_router.settings import redact_text
from decision_router.streams import as_text

log = structlog.get_logger("decision_router.api")
router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 2.0


@router.get("/healthz", summary="The process is up (no token)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _redis_ok(request: Request) -> str | None:
    try:
        await asyncio.wait_for(request.app.state.redis.ping(), CHECK_TIMEOUT_S)
    except (*REDIS_ERRORS, OSError, TimeoutError) as exc:
        # /readyz needs no token: mask anything credential-like a driver puts in its message.
        return f"{exc.__class__.__name__}: {redact_text(str(exc))}" if str(exc) else exc.__class__.__name__
    return None


def _database_ok(engine: Any) -> str | None:
    try:
        with engine.connect() as connection:
            connection.execute(text("select 1"))
    except Exception as exc:  # noqa: BLE001  (any driver error means "not ready"; its name is enough to act on)
        return exc.__class__.__name__
    return None


@router.get("/readyz", summary="Redis and the database answer and rules are loaded (no token)")
async def readyz(request: Request) -> JSONResponse:
    checks: dict[str, str] = {}
    redis_problem = await _redis_ok(request)
    try:
        db_problem = await asyncio.wait_for(asyncio.to_thread(_database_ok, request.app.state.engine), CHECK_TIMEOUT_S)
    except TimeoutError:
        db_problem = "timeout"
    try:
        ruleset = request.app.state.ruleset()
        rules_problem = None if ruleset is not None and ruleset.rules else "no rules loaded"
    except Exception as exc:  # noqa: BLE001  (a broken rules provider is "not ready", never a 500)
        rules_problem = exc.__class__.__name__
    for name, problem in (("redis", redis_problem), ("database", db_problem), ("rules", rules_problem)):
        checks[name] = problem or "ok"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


# HEAD too: uptime checkers and load balancers often probe with it (a 405 reads as "down"). Kept out of
# the OpenAPI description, which would otherwise hold each operation twice.
router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)


async def _read_group_state(request: Request) -> None:
    keys, group = keys_of(request), settings_of(request).consumer_group
    redis = request.app.state.redis
    for name, stream in (("predictions", keys.predictions), ("outcomes", keys.outcomes)):
        try:
            groups = await redis.xinfo_groups(stream)
        except REDIS_ERRORS:
            continue  # no such stream yet: nothing consumed, nothing lagging
        for info in groups:
            if as_text(info.get("name", b"")) == group:
                lag = info.get("lag")
                metrics.set_group_state(
                    name, group, lag=int(lag) if lag is not None else None, pending=int(info.get("pending", 0))
                )


@router.get("/metrics", summary="Prometheus metrics (role: ops, admin)", response_class=Response)
async def prometheus(request: Request, principal: Annotated[Principal, Depends(require("ops"))]) -> Response:
    try:
        await _read_group_state(request)
    except (*REDIS_ERRORS, OSError) as exc:
        log.warning("consumer-group lag not read for /metrics", error=str(exc))
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

"""The FastAPI application: wiring only; the endpoints live in routes_*.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI
from redis.asyncio import Redis
from sqlalchemy.engine import Engine

from decision_router.api.auth import Principal, require
from decision_router.rules import RuleSet
from decision_router.settings import Settings


def create_app(
    settings: Settings,
    *,
    engine: Engine,
    redis: Redis,
    ruleset: RuleSet | Callable[[], RuleSet],
    reload_rules: Callable[[], Awaitable[Any]] | None = None,
) -> FastAPI:
    app = FastAPI(title="decision-router", docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.engine = engine
    app.state.redis = redis
    app.state.ruleset = ruleset if callable(ruleset) else (lambda: ruleset)
    app.state.reload_rules = reload_rules

    @app.get("/v1/whoami")
    def whoami(principal: Principal = Depends(require("publisher", "owner", "ops", "admin"))) -> dict[str, Any]:
        return {"role": principal.role, "owner": principal.owner}

    from decision_router.api.dashboard import router as dashboard_router

    app.include_router(dashboard_router)
    return app

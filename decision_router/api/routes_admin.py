"""POST /v1/rules/reload (admin): re-read the rules now, here and in every router process.

This process reloads first (so the answer can name the new version, or the problems that
keep the old one); then the request is published on the prefix's `rules:reload` channel,
which each `serve` process (every `--workers` worker, any host) and each standalone `api`
follows and answers by re-reading its own files at once. A process that misses the message (cut
off from Redis at that moment) picks the change up at its next file poll (DECISION_ROUTER_RULES_POLL_INTERVAL).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, HTTPException, Request

from decision_router.api.auth import Principal, require
from decision_router.api.common import keys_of, ruleset_of, settings_of
from decision_router.redis_client import REDIS_ERRORS
from decision_router.reloads import request_reload
from decision_router.rules import check_rules

router = APIRouter(tags=["admin"])
log = structlog.get_logger("decision_router.api")


@router.post("/v1/rules/reload", summary="Reload routing.yaml and owners.yaml in every router process (role: admin)")
async def reload_rules(request: Request, principal: Annotated[Principal, Depends(require("admin"))]) -> dict[str, Any]:
    reload = request.app.state.reload_rules
    if reload is None:
        raise HTTPException(status_code=503, detail="this process cannot reload rules")
    settings = settings_of(request)
    # Invalid files keep the running rules (as the watcher does); say why instead of swapping.
    problems = await asyncio.to_thread(check_rules, settings.rules_dir)
    if problems:
        raise HTTPException(
            status_code=422,
            detail=[{"loc": [p.file, p.rule, p.field], "msg": str(p), "type": "rules_invalid"} for p in problems],
        )
    previous = ruleset_of(request).version
    await reload()
    current = ruleset_of(request)
    try:
        notified: int | None = await request_reload(
            request.app.state.redis, keys_of(request), rules_version=current.version, by=settings.consumer_name,
            origin=request.app.state.reload_origin,
        )
    except REDIS_ERRORS as exc:
        # Reloaded here; the others will see the files at their next poll.
        log.warning("rules reload not broadcast: Redis is unavailable", error=str(exc))
        notified = None
    return {
        "rules_version": current.version,
        "previous": previous,
        "changed": current.version != previous,
        "rules": len(current.rules),
        "owners": len(current.owners),
        # Processes on this prefix that received the request (this one included: it follows them
        # too, and skips its own); null when Redis could not be reached.
        "notified_processes": notified,
    }

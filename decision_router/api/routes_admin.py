"""POST /v1/rules/reload (admin): re-read the rules now, as SIGHUP does for `serve`."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request

from decision_router.api.auth import Principal, require
from decision_router.api.common import ruleset_of, settings_of
from decision_router.rules import check_rules

router = APIRouter(tags=["admin"])


@router.post("/v1/rules/reload", summary="Reload routing.yaml and owners.yaml (role: admin)")
async def reload_rules(request: Request, principal: Annotated[Principal, Depends(require("admin"))]) -> dict[str, Any]:
    reload = request.app.state.reload_rules
    if reload is None:
        raise HTTPException(status_code=503, detail="this process cannot reload rules")
    rules_dir = settings_of(request).rules_dir
    # Invalid files keep the running rules (as the watcher does); say why instead of swapping.
    problems = await asyncio.to_thread(check_rules, rules_dir)
    if problems:
        raise HTTPException(
            status_code=422,
            detail=[{"loc": [p.file, p.rule, p.field], "msg": str(p), "type": "rules_invalid"} for p in problems],
        )
    previous = ruleset_of(request).version
    await reload()
    current = ruleset_of(request)
    return {
        "rules_version": current.version,
        "previous": previous,
        "changed": current.version != previous,
        "rules": len(current.rules),
        "owners": len(current.owners),
    }

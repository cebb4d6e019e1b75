"""GET /v1/stats: the numbers and filters of `decision-router stats` (stats.compute_stats)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from sqlmodel import Session

from decision_router.api.auth import Principal, require
from decision_router.api.common import parse_window, read_store, ruleset_of
from decision_router.stats import GroupBy, compute_quality, compute_stats

router = APIRouter(tags=["stats"])


@router.get("/v1/stats", summary="Outcome and uplift statistics, as `decision-router stats` (role: owner, ops, admin)")
async def stats(
    request: Request,
    principal: Annotated[Principal, Depends(require("owner", "ops"))],
    by: Annotated[GroupBy, Query(description="rule, owner, model, model_version, priority or week")] = GroupBy.RULE,
    since: Annotated[str | None, Query(description="Alerts created since: 7d, 24h or an ISO date.")] = None,
    until: Annotated[str | None, Query(description="Alerts created before: 1d or an ISO date.")] = None,
    rule: Annotated[str | None, Query()] = None,
    owner: Annotated[
        str | None, Query(description="Only alerts owned by this owner (owner tokens: their own).")
    ] = None,
    model: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    owner, rule, model = owner or None, rule or None, model or None  # blank is no filter, as in /v1/alerts
    if principal.role == "owner":
        if owner is not None and owner != principal.owner:
            raise HTTPException(status_code=403, detail="an owner token reads only its own statistics")
        owner = principal.owner
    start, end = parse_window(since, until)
    holdouts = {r.name: r.holdout for r in ruleset_of(request).rules}

    def compute(session: Session) -> list[dict[str, Any]]:
        rows = compute_stats(
            session, by=by, since=start, until=end, rule=rule, owner=owner, model=model, holdouts=holdouts
        )
        return [row.as_dict(by) for row in rows]

    return {"by": by.value, "rows": await read_store(request, compute)}


@router.get(
    "/v1/stats/quality", summary="Data quality per model, as `decision-router stats quality` (role: ops, admin)"
)
async def quality(
    request: Request,
    principal: Annotated[Principal, Depends(require("ops"))],
    since: Annotated[str | None, Query()] = None,
    until: Annotated[str | None, Query()] = None,
    model: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    start, end = parse_window(since, until)
    model = model or None
    report = await read_store(request, lambda session: compute_quality(session, since=start, until=end, model=model))
    return report.as_dict()

"""GET /v1/stats: the numbers and filters of `decision-router stats` (stats.compute_stats).

A filter that selects nothing and that neither the rules the API runs nor the store know is a 422 naming it,
with the close match, as the CLI's exit 2 (stats_filters): a typo does not read as "no data"."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from sqlmodel import Session

from decision_router.api.auth import Principal, require
from decision_router.api.common import parse_window, query_error, read_store, ruleset_of
from decision_router.stats import GroupBy, QualityReport, compute_quality, compute_stats
from decision_router.stats_filters import Unknown, unknown_model, unknown_rule_or_owner

router = APIRouter(tags=["stats"])

UNKNOWN_IS_422 = "; when nothing matches, one that neither the rules nor the store know is a 422 with the close match."


@router.get("/v1/stats", summary="Outcome and uplift statistics, as `decision-router stats` (role: owner, ops, admin)")
async def stats(
    request: Request,
    principal: Annotated[Principal, Depends(require("owner", "ops"))],
    by: Annotated[GroupBy, Query(description="rule, owner, model, model_version, priority or week")] = GroupBy.RULE,
    since: Annotated[str | None, Query(description="Alerts created since: 7d, 24h or an ISO date.")] = None,
    until: Annotated[str | None, Query(description="Alerts created before: 1d or an ISO date.")] = None,
    rule: Annotated[str | None, Query(description=f"Only this rule{UNKNOWN_IS_422}")] = None,
    owner: Annotated[
        str | None, Query(description=f"Only alerts owned by this owner (owner tokens: their own){UNKNOWN_IS_422}")
    ] = None,
    model: Annotated[str | None, Query(description=f"Only this model{UNKNOWN_IS_422}")] = None,
) -> dict[str, Any]:
    owner, rule, model = owner or None, rule or None, model or None  # blank is no filter, as in /v1/alerts
    checked_owner = owner  # an owner token's own is set by the token, not typed: never checked
    if principal.role == "owner":
        if owner is not None and owner != principal.owner:
            raise HTTPException(status_code=403, detail="an owner token reads only its own statistics")
        owner, checked_owner = principal.owner, None
    start, end = parse_window(since, until)
    ruleset = ruleset_of(request)  # once: the holdouts and the check of an empty result read the same rules
    holdouts = {r.name: r.holdout for r in ruleset.rules}

    def compute(session: Session) -> tuple[list[dict[str, Any]], Unknown | None]:
        rows = compute_stats(
            session, by=by, since=start, until=end, rule=rule, owner=owner, model=model, holdouts=holdouts
        )
        if rows:
            return [row.as_dict(by) for row in rows], None
        unknown = unknown_rule_or_owner(
            session, lambda: ruleset, rule=rule, owner=checked_owner, rules_dir=None, prefix=None
        )
        return [], unknown or unknown_model(session, model, lambda: ruleset, rules_dir=None, prefix=None)

    rows, unknown = await read_store(request, compute)
    if unknown is not None:
        raise query_error(unknown.parameter, unknown.message)
    return {"by": by.value, "rows": rows}


@router.get(
    "/v1/stats/quality", summary="Data quality per model, as `decision-router stats quality` (role: ops, admin)"
)
async def quality(
    request: Request,
    principal: Annotated[Principal, Depends(require("ops"))],
    since: Annotated[str | None, Query()] = None,
    until: Annotated[str | None, Query()] = None,
    model: Annotated[str | None, Query(description=f"Only this model{UNKNOWN_IS_422}")] = None,
) -> dict[str, Any]:
    start, end = parse_window(since, until)
    model = model or None
    ruleset = ruleset_of(request)

    def compute(session: Session) -> tuple[QualityReport, Unknown | None]:
        report = compute_quality(session, since=start, until=end, model=model)
        if report.models:
            return report, None
        return report, unknown_model(session, model, lambda: ruleset, rules_dir=None, prefix=None)

    report, unknown = await read_store(request, compute)
    if unknown is not None:
        raise query_error(unknown.parameter, unknown.message)
    return report.as_dict()

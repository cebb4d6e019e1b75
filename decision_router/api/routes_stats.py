"""GET /v1/stats: the numbers and filters of `decision-router stats` (stats.compute_stats).

A filter that selects nothing and that neither the rules the API runs nor the store know is a 422 naming it,
with the close match, as the CLI's exit 2 (stats_filters): a typo does not read as "no data". An owner token's
filters are checked against its own alerts only, so the 422 names nothing it could not already see."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from sqlmodel import Session

from decision_router.api.auth import Principal, require
from decision_router.api.common import UNKNOWN_IS_422, parse_window, query_error, read_store, ruleset_of
from decision_router.stats import GroupBy, QualityReport, compute_quality, compute_stats
from decision_router.stats_filters import Unknown, unknown_model, unknown_to_api, unknown_to_owner

router = APIRouter(tags=["stats"])

OWNERS_OWN = " Owner tokens: one on none of their own alerts, the close match being one of theirs."


@router.get("/v1/stats", summary="Outcome and uplift statistics, as `decision-router stats` (role: owner, ops, admin)")
async def stats(
    request: Request,
    principal: Annotated[Principal, Depends(require("owner", "ops"))],
    by: Annotated[GroupBy, Query(description="rule, owner, model, model_version, priority or week")] = GroupBy.RULE,
    since: Annotated[str | None, Query(description="Alerts created since: 7d, 24h or an ISO date.")] = None,
    until: Annotated[str | None, Query(description="Alerts created before: 1d or an ISO date.")] = None,
    rule: Annotated[str | None, Query(description=f"Only this rule{UNKNOWN_IS_422}{OWNERS_OWN}")] = None,
    owner: Annotated[
        str | None, Query(description=f"Only alerts owned by this owner (owner tokens: their own){UNKNOWN_IS_422}")
    ] = None,
    model: Annotated[str | None, Query(description=f"Only this model{UNKNOWN_IS_422}{OWNERS_OWN}")] = None,
) -> dict[str, Any]:
    owner, rule, model = owner or None, rule or None, model or None  # blank is no filter, as in /v1/alerts
    # An owner token's own owner is set by the token, not typed: never checked.
    as_owner = principal.role == "owner"
    if as_owner:
        if owner is not None and owner != principal.owner:
            raise HTTPException(status_code=403, detail="an owner token reads only its own statistics")
        owner = principal.owner
    start, end = parse_window(since, until)
    ruleset = ruleset_of(request)  # once: the holdouts and the check of an empty result read the same rules
    holdouts = {r.name: r.holdout for r in ruleset.rules}

    def compute(session: Session) -> tuple[list[dict[str, Any]], Unknown | None]:
        rows = compute_stats(
            session, by=by, since=start, until=end, rule=rule, owner=owner, model=model, holdouts=holdouts
        )
        if rows:
            return [row.as_dict(by) for row in rows], None
        if as_owner:
            return [], unknown_to_owner(session, owner, rule=rule, model=model)
        return [], unknown_to_api(session, ruleset, rule=rule, owner=owner, model=model)

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

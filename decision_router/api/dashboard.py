"""The dashboard: one static page at `/` (login by token) and the JSON it reads.

The page and its assets are files in api/static, served by the service itself: no CDN, no
network asset, charts drawn as inline SVG by vanilla JS. A strict Content-Security-Policy
(no inline script, no eval) keeps a pasted token from being read by injected code.

JSON endpoints (bearer token, like the rest of /v1):
- GET /v1/dashboard/ops (ops, admin): funnel, uplift, time to act, owners' SLA, rejections
  per day, for a period (since/until or the last N days), a model and a rule (a rule or model
  that selects nothing and that neither the rules nor the store know is a 422 with the close
  match, as on /v1/stats: a typo is not an empty view);
- GET /v1/dashboard/owner (owner): the caller's open alerts and those escalated to it, with
  context and deadlines.
The owner view's buttons call the alert endpoints (/v1/alerts/{id}/ack, ...).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlmodel import Session

from decision_router import insights
from decision_router.api.auth import Principal, require
from decision_router.api.common import UNKNOWN_IS_422, parse_window, query_error, read_store, ruleset_of
from decision_router.audit import iso
from decision_router.pipeline import utcnow
from decision_router.stats_filters import Unknown, unknown_to_api
from decision_router.tables import AlertRecord
from decision_router.uplift import MIN_N

STATIC = Path(__file__).resolve().parent / "static"
# Served by name only: nothing else under the package can be reached through /assets.
ASSETS = {"app.js": "text/javascript", "charts.js": "text/javascript", "app.css": "text/css"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page holds a token in sessionStorage: never serve a stale copy from a cache.
    "Cache-Control": "no-store",
}

router = APIRouter()


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/assets/{name}", include_in_schema=False)
def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(status_code=404, detail=f"no asset {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)


def _period(since: str | None, until: str | None, days: int | None) -> tuple[datetime | None, datetime | None]:
    if days is not None and (since or until):
        raise query_error("days", "give either days or since/until, not both")
    if days is not None:
        return utcnow() - timedelta(days=days), None
    return parse_window(since, until)


def _choices(session: Session, column: Any) -> list[str]:
    return sorted(session.scalars(select(column).distinct()))


@router.get("/v1/dashboard/ops", tags=["dashboard"])
async def ops_view(
    request: Request,
    _: Annotated[Principal, Depends(require("ops", "admin"))],
    since: Annotated[str | None, Query(description="A duration ago (7d) or an ISO date; alerts created since")] = None,
    until: Annotated[str | None, Query(description="A duration ago or an ISO date; alerts created before")] = None,
    days: Annotated[int | None, Query(ge=1, le=3660, description="The last N days (instead of since/until)")] = None,
    model: Annotated[str | None, Query(description=f"Only this model{UNKNOWN_IS_422}")] = None,
    rule: Annotated[str | None, Query(description=f"Only this rule{UNKNOWN_IS_422}")] = None,
) -> dict[str, Any]:
    """Everything the ops view draws, for one period, model and rule."""
    start, end = _period(since, until, days)
    model, rule = model or None, rule or None
    ruleset = ruleset_of(request)
    holdouts = {r.name: r.holdout for r in ruleset.rules}
    now = utcnow()

    def read(session: Session) -> dict[str, Any] | Unknown:
        rows = insights.rule_stats(session, since=start, until=end, rule=rule, model=model, holdouts=holdouts)
        if not rows:  # a name with alerts in the period is known: only an empty view is checked, as in /v1/stats
            unknown = unknown_to_api(session, ruleset, rule=rule, owner=None, model=model)
            if unknown is not None:
                return unknown
        histogram = insights.time_to_act_histogram(session, since=start, until=end, rule=rule, model=model)
        return {
            "window": {"since": iso(start), "until": iso(end)},
            "filters": {
                "models": _choices(session, AlertRecord.model),
                "rules": sorted({r.name for r in ruleset.rules} | set(_choices(session, AlertRecord.rule))),
                "model": model,
                "rule": rule,
            },
            "min_n": MIN_N,
            "funnel": insights.as_json(insights.funnel(rows)),
            "uplift": insights.as_json(insights.uplift(rows, holdouts)),
            "time_to_act": insights.as_json(histogram),
            "sla": insights.as_json(
                insights.owner_sla(session, now=now, since=start, until=end, rule=rule, model=model)
            ),
            # Rejections are not tied to a rule: the rule filter does not apply to them.
            "rejections": insights.as_json(insights.rejections_per_day(session, since=start, until=end, model=model)),
        }

    view = await read_store(request, read)
    if isinstance(view, Unknown):
        raise query_error(view.parameter, view.message)
    return view


def _owner_alert(
    record: AlertRecord, now: datetime, to_me: tuple[int, str] | None, last_step: str | None
) -> dict[str, Any]:
    # Overdue by the owner's own deadlines, as the escalation sweep reads them: after a reassignment, the
    # fresh ones, not ack_by / act_by (the alert's first deadlines, shown as they are documented).
    ack_overdue, act_overdue = insights.overdue(record, now, last_step)
    return {
        "alert_id": record.alert_id,
        # Someone else's alert escalated to the caller: the owner stays accountable, the caller may act.
        "owner": record.owner,
        "escalated_to_me": to_me is not None,
        "escalated_to_me_level": to_me[0] if to_me else None,
        "escalated_from": to_me[1] if to_me else None,
        "rule": record.rule,
        "priority": record.priority,
        "model": record.model,
        "entity_type": record.entity_type,
        "entity_id": record.entity_id,
        "score": record.score,
        "context": record.context,
        "missing_context": record.missing_context,
        "created_at": iso(record.created_at),
        "ack_by": iso(record.ack_by),
        "act_by": iso(record.act_by),
        # The deadlines pending now (null once met or breached), as GET /v1/alerts/{id} shows them.
        "ack_due_at": iso(record.ack_due_at),
        "act_due_at": iso(record.act_due_at),
        "acknowledged_at": iso(record.acknowledged_at),
        "intervened_at": iso(record.intervened_at),
        "intervention": record.intervention,
        "ack_overdue": ack_overdue,
        "act_overdue": act_overdue,
        "escalation_level": record.escalation_level,
        "escalated_to": record.escalated_to,
    }


@router.get("/v1/dashboard/owner", tags=["dashboard"])
async def owner_view(
    request: Request, principal: Annotated[Principal, Depends(require("owner"))]
) -> dict[str, Any]:
    """The caller's open alerts and those escalated to it (never anyone else's), the nearest deadline first."""
    owner = principal.owner
    if not owner:  # an owner token is always bound to an owner id; refuse rather than show all
        raise HTTPException(status_code=403, detail="this owner token is bound to no owner")
    now = utcnow()

    def read(session: Session) -> list[dict[str, Any]]:
        records = insights.open_alerts(session, owner=owner)
        others = [record.alert_id for record in records if record.owner != owner]
        steps = insights.escalations_to(session, to_owner=owner, alert_ids=others)
        last = insights.last_steps(session, records)
        return [
            _owner_alert(record, now, steps.get(record.alert_id), last.get(record.alert_id)) for record in records
        ]

    return {"owner": owner, "now": iso(now), "alerts": await read_store(request, read)}

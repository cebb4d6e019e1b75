"""POST /v1/outcomes: the CRM webhook. A business system is a `publisher` (it writes events,
reads nothing); ops and admin may post too. Owners act through /v1/alerts/{id}/... instead,
where the alert is checked to be theirs. Reassigning is for ops and admin, here as on
/v1/alerts/{id}/reassign: a publisher's `reassigned` event is refused (403)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Request

from decision_router.api.actions import apply_event, http_entry_id
from decision_router.api.auth import Principal, require
from decision_router.api.common import body_error, idempotency_key, json_body

router = APIRouter(tags=["outcomes"])

MAX_EVENTS = 500


@router.post(
    "/v1/outcomes", summary="Record outcome events by alert, prediction or entity (role: publisher, ops, admin)"
)
async def post_outcomes(
    request: Request,
    body: Annotated[Any, Body(description="An OutcomeEvent object (see the contract) or a list of them.")],
    principal: Annotated[Principal, Depends(require("publisher", "ops"))],
    key: Annotated[str | None, Depends(idempotency_key)] = None,
) -> dict[str, Any]:
    body = json_body(request, body)
    events = body if isinstance(body, list) else [body]
    if not events:
        raise body_error(None, "an empty list: send one event or a non-empty list")
    if len(events) > MAX_EVENTS:
        raise body_error(None, f"{len(events)} events; at most {MAX_EVENTS} per request")
    if principal.role == "publisher" and any(isinstance(e, dict) and e.get("type") == "reassigned" for e in events):
        raise HTTPException(status_code=403, detail="reassigning needs an ops or admin token")
    results: list[dict[str, Any]] = []
    for index, event in enumerate(events):
        # Not a JSON object: the gate rejects it (invalid_json) and dead-letters it, as sent, like a stream entry.
        entry_id = http_entry_id(principal.token_id, key, event, "outcomes", index)
        applied = await apply_event(request, event, entry_id=entry_id)
        if applied.applied:
            item: dict[str, Any] = {"index": index, "status": "applied"}
            if applied.replayed:
                item["replayed"] = True
            if isinstance(event, dict) and event.get("type") == "reassigned":
                # As /v1/alerts/{id}/reassign answers it: true when its receiver held every alert it addressed.
                item["unchanged"] = applied.unchanged
            results.append(item)
        else:
            results.append({"index": index, "status": "rejected", "reason": applied.reason, "detail": applied.detail})
    done = sum(1 for r in results if r["status"] == "applied")
    return {"applied": done, "rejected": len(results) - done, "results": results}

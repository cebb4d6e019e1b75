"""POST /v1/predictions: one prediction or a batch, through the same gate as the stream.

Design: every item is appended to the predictions stream, exactly as a stream producer
would (`data` = the item as JSON), and the router does the rest. So an accepted
prediction is enriched, routed, stored, delivered and counted by the one code path that
handles stream input, with its exactly-once guarantees (stream entry ids, dedupe keys),
and the API process needs no router of its own. Items the gate rejects are appended too:
the router dead-letters them on predictions:dlq with the same reason and counts them, so
a rejection is recorded once whichever way it arrived.

The answer is per item, computed here by the same gate (quality.check_prediction) plus a
duplicate check against the store; 202 because routing happens just after the answer.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request

from decision_router import tracker
from decision_router.api.auth import Principal, require
from decision_router.api.common import body_error, json_body, keys_of, read_store, settings_of
from decision_router.contracts import Prediction, Rejection
from decision_router.pipeline import utcnow
from decision_router.quality import check_prediction
from decision_router.streams import xadd_all

router = APIRouter(tags=["predictions"])

MAX_ITEMS = 1000


@router.post(
    "/v1/predictions",
    status_code=202,
    summary="Submit one prediction or a list of them (role: publisher, ops, admin)",
)
async def post_predictions(
    request: Request,
    body: Annotated[Any, Body(description="A prediction object (see the Prediction contract) or a list of them.")],
    principal: Annotated[Principal, Depends(require("publisher", "ops"))],
) -> dict[str, Any]:
    body = json_body(request, body)
    items = body if isinstance(body, list) else [body]
    if not items:
        raise body_error(None, "an empty list: send one prediction or a non-empty list")
    if len(items) > MAX_ITEMS:
        raise body_error(None, f"{len(items)} items; at most {MAX_ITEMS} per request")
    settings, keys = settings_of(request), keys_of(request)
    now = utcnow()
    # ASCII escapes: text Redis cannot encode (a lone surrogate) reaches the gate, which rejects it.
    entries = [{"data": json.dumps(item)} for item in items]
    checked = [
        check_prediction(
            entry,
            now=now,
            max_age=settings.max_prediction_age,
            max_skew=settings.max_clock_skew,
            source_stream=keys.predictions,
            limits=settings.payload_limits,
        )
        for entry in entries
    ]
    ids = [c.prediction_id for c in checked if isinstance(c, Prediction)]
    known = await read_store(request, lambda session: tracker.known_predictions(session, ids)) if ids else {}
    results: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, item in enumerate(checked):
        if isinstance(item, Rejection):
            pid = items[index].get("prediction_id") if isinstance(items[index], dict) else None
            results.append(
                {
                    "index": index,
                    # Echoed only as text JSON can carry back (not a lone surrogate, say).
                    "prediction_id": pid if isinstance(pid, str) and pid.isprintable() else None,
                    "status": "rejected",
                    "reason": item.reason.value,
                    "detail": item.detail,
                }
            )
        elif item.prediction_id in known or item.prediction_id in seen:
            results.append(
                {
                    "index": index,
                    "prediction_id": item.prediction_id,
                    "status": "rejected",
                    "reason": "duplicate",
                    "detail": f"prediction_id {item.prediction_id} was already accepted",
                }
            )
        else:
            seen.add(item.prediction_id)
            results.append({"index": index, "prediction_id": item.prediction_id, "status": "accepted"})
    stream_ids = await xadd_all(request.app.state.redis, keys.predictions, entries)
    for result, stream_id in zip(results, stream_ids, strict=True):
        result["stream_id"] = stream_id
    accepted = sum(1 for r in results if r["status"] == "accepted")
    return {"accepted": accepted, "rejected": len(results) - accepted, "results": results}

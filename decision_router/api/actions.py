"""Outcome events from HTTP, applied through the outcome stream's own code path.

An action (acknowledge, intervene, outcome, reassign, or a CRM's outcome webhook) is one
entry handed to Pipeline.process_outcomes: the same parse (quality.check_outcome, done
once, there), the same addressing (tracker.find_alerts), the same audit trail,
dead-lettering on outcomes:dlq and counting as an entry read from the outcomes stream;
a rejection's reason and detail are the DLQ entry's. It runs
synchronously, so the caller learns at once whether it applied, and the dashboard shows
the change on its next read.

A request with an `Idempotency-Key` header gives each of its events an entry id made of the
token, the key and where the event came from: a retry with the same key is then a redelivered
entry, applied once (or rejected again, without a second DLQ entry). Without the header, a
retried call is a new event, like a second stream entry: the alert's first
ack/intervention/outcome wins, and the audit trail shows both.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from decision_router.notify import build_receivers, smtp_settings, usable_channels
from decision_router.pipeline import Pipeline
from decision_router.rules import RuleSet
from decision_router.settings import Settings


class QueueOnlyChannels:
    """The API's stand-in for ChannelDelivery when it runs without the consumers
    (`decision-router api`): a reassigned alert's webhook/email deliveries are queued in
    the store, and the worker's channel loop sends them (one sender per deployment)."""

    def __init__(self, settings: Settings, ruleset: RuleSet) -> None:
        self.receivers, _warnings = build_receivers(ruleset, smtp_settings(settings))

    def channels_for(self, owner_id: str) -> tuple[str, ...]:
        return usable_channels(self.receivers, owner_id)

    async def pump(self) -> int:
        return 0

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class Applied:
    applied: bool
    reason: str | None = None
    detail: str | None = None
    replayed: bool = False  # applied by an earlier request with the same Idempotency-Key
    unchanged: bool = False  # a reassignment that changed nothing: its receiver held every alert it addressed


def http_entry_id(token_id: int | str, key: str | None, document: Any, *where: object) -> str | None:
    """The entry id of an event sent with an Idempotency-Key: per token (two clients never share
    keys), per place in the API (`where`: the endpoint's words and the event's position), and per
    content: the same key on a different event (a batch retried in part, a note edited before the
    click again) is another request, applied, not answered "applied" for what was sent before."""
    if key is None:
        return None
    content = hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return ":".join(["http", str(token_id), *(str(w) for w in where), key, content])


def outcome_pipeline(request: Request) -> Pipeline:
    """The service's pipeline when served by `serve`, else the app's own (rules kept current)."""
    state = request.app.state
    pipeline: Pipeline = state.pipeline
    if state.owns_pipeline:
        ruleset = state.ruleset()
        if pipeline.ruleset is not ruleset:
            pipeline.ruleset = ruleset
            pipeline.channels = QueueOnlyChannels(state.settings, ruleset)  # type: ignore[assignment]
    return pipeline


async def apply_event(request: Request, document: Any, *, entry_id: str | None = None) -> Applied:
    """One outcome event (a JSON object; any other JSON value is rejected as invalid_json) through the
    outcomes path; applied or rejected with its reason.
    `entry_id` (from http_entry_id) makes a retry of the same event a no-op."""
    pipeline = outcome_pipeline(request)
    # ASCII escapes: a lone surrogate stays an escape for the gate to reject, not a crash in XADD.
    result = await pipeline.process_outcomes([(entry_id, {"data": json.dumps(document, default=str)})])
    if result.accepted or result.redelivered:
        return Applied(True, replayed=not result.accepted, unchanged=bool(result.unchanged) and not result.handed_over)
    # The pipeline parsed the event once and says why it refused it (the DLQ entry's detail).
    [rejection] = result.rejections  # one entry, not applied: rejected
    return Applied(False, rejection.reason.value, rejection.detail)

"""Prometheus counters for `GET /metrics`, fed by the pipeline and the delivery channels.

Kept in one small module that imports nothing of ours, so the hot path can count without
pulling in the HTTP layer. Consumer-group lag is not counted here: it is read from Redis
(XINFO GROUPS) when /metrics is scraped.

Under `serve --workers N` each worker counts in its own files in PROMETHEUS_MULTIPROC_DIR (set
for them by the supervisor; prometheus_client's multiprocess mode, chosen when it is imported),
and `exposition` sums them, so the one worker serving /metrics reports all of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable

REGISTRY = CollectorRegistry(auto_describe=True)

CONSUMED = Counter(
    "decision_router_entries_consumed", "Stream entries read and processed.", ["stream"], registry=REGISTRY
)
PREDICTIONS_ROUTED = Counter(
    "decision_router_predictions_routed", "Predictions accepted and routed (each once).", registry=REGISTRY
)
DECISIONS = Counter(
    "decision_router_decisions",
    "Routing decisions by effective action (alert, record, control, suppressed).",
    ["action"],
    registry=REGISTRY,
)
REJECTED = Counter(
    "decision_router_rejected", "Entries sent to a dead-letter stream, by stream and reason.", ["stream", "reason"],
    registry=REGISTRY,
)
DELIVERIES_FAILED = Counter(
    "decision_router_deliveries_failed", "Channel deliveries that failed for good (sent to deliveries:dlq).",
    ["channel"], registry=REGISTRY,
)
OUTBOX_PARKED = Counter(
    "decision_router_outbox_parked",
    "Alerts the outbox drain set aside, undelivered: writing them to their inbox stopped the worker each time.",
    registry=REGISTRY,
)
ESCALATIONS = Counter(
    "decision_router_escalations", "Escalation steps taken: an alert's missed deadline sent up to a manager.",
    registry=REGISTRY,
)
SLA_BREACHES = Counter(
    "decision_router_sla_breaches", "Deadlines missed with no manager left to escalate to (each deadline once).",
    registry=REGISTRY,
)
CONTEXT_LOOKUP_FAILURES = Counter(
    "decision_router_context_lookup_failures",
    "Batches in which a context source failed or timed out, for all or some of its predictions (their fields missing).",
    ["source"], registry=REGISTRY,
)
CONTEXT_LOOKUP_OVERSIZED = Counter(
    "decision_router_context_lookup_oversized",
    "Batches in which a context source gave values over the size or depth limits, or text no store can hold"
    " (a NUL character, not UTF-8): those fields dropped.",
    ["source"], registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "decision_router_batch_processing_seconds",
    "Time to gate, route, persist and deliver one batch read from a stream.",
    ["stream"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)


def observe_batch(
    stream: str, *, size: int, seconds: float, rejected: Mapping[str, int], routed: int = 0,
    decisions: Mapping[str, int] | None = None,
) -> None:
    """One processed batch of `size` entries from `stream` (predictions or outcomes)."""
    CONSUMED.labels(stream).inc(size)
    BATCH_SECONDS.labels(stream).observe(seconds)
    if routed:
        PREDICTIONS_ROUTED.inc(routed)
    for action, count in (decisions or {}).items():
        if count:
            DECISIONS.labels(action).inc(count)
    for reason, count in rejected.items():
        REJECTED.labels(stream, reason).inc(count)


def observe_sweep(*, escalated: int, breached: int) -> None:
    """One SLA sweep's committed steps (escalation.py: each step is taken by one worker, so counted once)."""
    if escalated:
        ESCALATIONS.inc(escalated)
    if breached:
        SLA_BREACHES.inc(breached)


def context_lookup_failed(source: str) -> None:
    CONTEXT_LOOKUP_FAILURES.labels(source).inc()


def context_lookup_oversized(source: str) -> None:
    CONTEXT_LOOKUP_OVERSIZED.labels(source).inc()


def delivery_failed(channel: str) -> None:
    DELIVERIES_FAILED.labels(channel).inc()


# Read from Redis when /metrics is scraped (see api/routes_health.py), not counted.
CONSUMER_LAG = Gauge(
    "decision_router_consumer_group_lag",
    "Entries in the stream not yet delivered to the consumer group (XINFO GROUPS lag).",
    ["stream", "group"], registry=REGISTRY, multiprocess_mode="mostrecent",  # only the API's worker sets it
)
CONSUMER_PENDING = Gauge(
    "decision_router_consumer_group_pending",
    "Entries delivered to the consumer group but not yet acknowledged (XINFO GROUPS pending).",
    ["stream", "group"], registry=REGISTRY, multiprocess_mode="mostrecent",
)


def set_group_state(stream: str, group: str, *, lag: int | None, pending: int) -> None:
    """The group's state at scrape time; lag None (Redis cannot tell, e.g. after XDEL) is left unset."""
    if lag is not None:
        CONSUMER_LAG.labels(stream, group).set(lag)
    CONSUMER_PENDING.labels(stream, group).set(pending)


def exposition() -> bytes:
    """The Prometheus text of every worker's counts (multiprocess mode), else of this process's."""
    if os.environ.get(MULTIPROCESS_DIR):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)

"""`audit`: an alert's and an entity's story, assembled from rows with known answers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlmodel import Session

from decision_router.audit import alert_story, describe, entity_story
from decision_router.store import create_schema, make_engine
from decision_router.tables import AlertRecord, AuditEvent, PredictionRecord

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
SYSTEM = "decision-router"


def prediction(pid: str, entity_id: str, at: datetime, score: float = 0.91) -> PredictionRecord:
    return PredictionRecord(
        prediction_id=pid, stream_id=f"1-{pid}", model="churn", model_version="2026.11", entity_type="account",
        entity_id=entity_id, score=score, predicted_at=at - timedelta(minutes=5), received_at=at, rules_version="v1",
        document={"prediction_id": pid},
    )


def alert(aid: str, pid: str, rule: str, owner: str, at: datetime, entity_id: str = "acct-17", **extra: Any) -> AlertRecord:
    return AlertRecord(
        alert_id=aid, prediction_id=pid, rule=rule, owner=extra.pop("owner_now", owner), original_owner=owner,
        owner_source=extra.pop("owner_source", "field"), priority="high", action=extra.pop("action", "alert"),
        model="churn", model_version="2026.11", entity_type="account", entity_id=entity_id, score=0.91,
        rules_version="v1", predicted_at=at - timedelta(minutes=5), created_at=at, ack_by=at + timedelta(hours=2),
        act_by=at + timedelta(days=1), **extra,
    )


def event(kind: str, at: datetime, aid: str | None, /, pid: str | None = "p1", actor: str = SYSTEM,
          **detail: Any) -> AuditEvent:
    return AuditEvent(alert_id=aid, prediction_id=pid, type=kind, actor=actor, at=at, detail=detail)


ROUTED = {"rule": "enterprise-churn-risk", "rules_version": "v1", "owner": "alice", "owner_source": "field",
          "fallback_reason": None, "delegated_from": None, "priority": "high", "action": "alert", "held_out": False,
          "suppressed_by": None}
H = timedelta(hours=1)


def received(at: datetime, pid: str, score: float = 0.91) -> AuditEvent:
    """A "received" row as stores written before issue 8 hold it (new ones build it from the prediction row)."""
    return event("received", at, None, pid=pid, stream_id=f"1-{pid}", model="churn", score=score)


@pytest.fixture(params=["new store", "old store with received rows"])
def session(request: pytest.FixtureRequest):
    old_store = request.param != "new store"
    engine = make_engine("sqlite:///:memory:")
    create_schema(engine)
    with Session(engine) as s:
        s.add_all([
            prediction("p1", "acct-17", T0),
            alert("al-a", "p1", "enterprise-churn-risk", "alice", T0, owner_now="bob", delivered_at=T0,
                  acknowledged_at=T0 + 3 * H, intervened_at=T0 + 5 * H, intervention="exec-call", outcome="success",
                  outcome_value=120000.0, status="closed", escalation_level=1),
            alert("al-v", "p1", "key-account-visibility", "dir-enterprise", T0, owner_source="static"),
            # A later prediction for the same entity: one control record, one suppressed by cooldown.
            prediction("p2", "acct-17", T0 + 48 * H, score=0.7),
            alert("al-c", "p2", "enterprise-churn-watch", "alice", T0 + 48 * H, held_out=True),
            alert("al-s", "p2", "key-account-visibility", "dir-enterprise", T0 + 48 * H, suppressed_by="al-v",
                  status="suppressed", owner_source="static"),
            # Another entity: never part of acct-17's story.
            prediction("p9", "acct-99", T0), alert("al-z", "p9", "enterprise-churn-risk", "alice", T0, entity_id="acct-99"),
        ])
        # Inserted out of time order on purpose; same-instant events keep their insertion order.
        s.add_all([
            event("outcome", T0 + 30 * 24 * H, "al-a", actor="crm", result="success", value=120000.0),
            *([received(T0, "p1")] if old_store else []),
            event("routed", T0, "al-a", **ROUTED),
            event("routed", T0, "al-v", **{**ROUTED, "rule": "key-account-visibility", "owner": "dir-enterprise",
                                           "owner_source": "static"}),
            event("delivered", T0 + timedelta(seconds=1), "al-a", channel="inbox", owner="alice"),
            event("intervened", T0 + 5 * H, "al-a", actor="bob", action="exec-call"),
            event("escalated", T0 + 2 * H, "al-a", kind="ack", level=1, from_owner="alice", to_owner="lead-strategic",
                  reason="not acknowledged within 2h", original_owner="alice"),
            event("delivered", T0 + 2 * H, "al-a", pid=None, channel="inbox", owner="lead-strategic", escalation_level=1),
            event("acknowledged", T0 + 3 * H, "al-a", actor="lead-strategic"),
            event("reassigned", T0 + 4 * H, "al-a", actor="lead-strategic", from_owner="alice", to_owner="bob",
                  note="alice is on leave"),
            *([received(T0 + 48 * H, "p2", score=0.7)] if old_store else []),
            event("held_out", T0 + 48 * H, "al-c", pid="p2", **{**ROUTED, "rule": "enterprise-churn-watch", "held_out": True}),
            event("suppressed", T0 + 48 * H, "al-s", pid="p2", **{**ROUTED, "rule": "key-account-visibility",
                                                             "owner": "dir-enterprise", "owner_source": "static",
                                                             "suppressed_by": "al-v"}),
            *([received(T0, "p9")] if old_store else []),
            event("routed", T0, "al-z", pid="p9", **ROUTED),
        ])
        s.commit()
        yield s
    engine.dispose()


def test_alert_story_in_time_order(session: Session) -> None:
    story = alert_story(session, "al-a")
    assert story is not None
    assert [(e.at - T0, e.type, e.actor) for e in story.events] == [
        (timedelta(0), "received", SYSTEM),
        (timedelta(0), "routed", SYSTEM),
        (timedelta(seconds=1), "delivered", SYSTEM),
        (2 * H, "escalated", SYSTEM),
        (2 * H, "delivered", SYSTEM),
        (3 * H, "acknowledged", "lead-strategic"),
        (4 * H, "reassigned", "lead-strategic"),
        (5 * H, "intervened", "bob"),
        (30 * 24 * H, "outcome", "crm"),
    ]
    assert [e.summary for e in story.events] == [
        "prediction p1 received (model churn, score 0.91)",
        "rule enterprise-churn-risk matched (rules v1): owner alice (field), priority high",
        "delivered to alice via inbox",
        "escalated (ack deadline missed, level 1) alice -> lead-strategic: not acknowledged within 2h",
        "delivered to lead-strategic via inbox (escalation level 1)",
        "acknowledged",
        "reassigned alice -> bob (note: alice is on leave)",
        "intervened: exec-call",
        "outcome success, value 120000",
    ]
    assert [(s.alert_id, s.rule, s.owner, s.effective_action) for s in story.siblings] == [
        ("al-v", "key-account-visibility", "dir-enterprise", "alert")
    ]
    summary = story.alert
    assert (summary.owner, summary.original_owner, summary.status, summary.outcome, summary.escalation_level) == (
        "bob", "alice", "closed", "success", 1
    )
    assert story.prediction is not None and story.prediction.received_at == T0


def test_alert_story_json(session: Session) -> None:
    document = json.loads(json.dumps(alert_story(session, "al-a").as_dict()))
    assert set(document) == {"alert", "prediction", "siblings", "events"}
    assert document["alert"]["created_at"] == "2026-11-02T09:00:00Z"
    assert document["alert"]["effective_action"] == "alert" and document["alert"]["outcome_value"] == 120000.0
    assert document["prediction"]["prediction_id"] == "p1"
    assert document["siblings"] == [{"alert_id": "al-v", "rule": "key-account-visibility", "owner": "dir-enterprise",
                                     "priority": "high", "effective_action": "alert"}]
    assert document["events"][0] == {
        "at": "2026-11-02T09:00:00Z", "type": "received", "actor": SYSTEM, "alert_id": None, "prediction_id": "p1",
        "summary": "prediction p1 received (model churn, score 0.91)",
        "detail": {"model": "churn", "score": 0.91, "stream_id": "1-p1"},
    }
    assert [e["type"] for e in document["events"]][-2:] == ["intervened", "outcome"]


def test_unknown_alert_and_entity(session: Session) -> None:
    assert alert_story(session, "al-nope") is None
    assert entity_story(session, "account", "acct-nope") is None
    assert entity_story(session, "invoice", "acct-17") is None


def test_entity_story_groups_every_decision(session: Session) -> None:
    story = entity_story(session, "account", "acct-17")
    assert story is not None
    assert [p.prediction_id for p in story.predictions] == ["p1", "p2"]
    assert [(s.alert.alert_id, s.alert.effective_action) for s in story.alerts] == [
        ("al-a", "alert"), ("al-v", "alert"), ("al-c", "control"), ("al-s", "suppressed"),
    ]
    by_id = {s.alert.alert_id: s for s in story.alerts}
    assert [e.type for e in by_id["al-a"].events] == [
        "received", "routed", "delivered", "escalated", "delivered", "acknowledged", "reassigned", "intervened", "outcome"
    ]
    assert [e.type for e in by_id["al-v"].events] == ["received", "routed"]
    assert [e.summary for e in by_id["al-c"].events] == [
        "prediction p2 received (model churn, score 0.7)",
        "rule enterprise-churn-watch matched (rules v1): owner alice (field), priority high; held out as control, not delivered",
    ]
    assert by_id["al-s"].events[-1].summary == (
        "rule key-account-visibility matched (rules v1): owner dir-enterprise (static), priority high; "
        "suppressed by cooldown (alert al-v), not delivered"
    )
    document = json.loads(json.dumps(story.as_dict()))
    assert document["entity"] == {"type": "account", "id": "acct-17"}
    assert [a["alert"]["alert_id"] for a in document["alerts"]] == ["al-a", "al-v", "al-c", "al-s"]
    assert all(e["prediction_id"] != "p9" for a in document["alerts"] for e in a["events"])
    # The whole story once, in time order: each received event once, not once per decision.
    assert [(e["type"], e["alert_id"]) for e in document["events"]] == [
        ("received", None), ("routed", "al-a"), ("routed", "al-v"), ("delivered", "al-a"), ("escalated", "al-a"),
        ("delivered", "al-a"), ("acknowledged", "al-a"), ("reassigned", "al-a"), ("intervened", "al-a"),
        ("received", None), ("held_out", "al-c"), ("suppressed", "al-s"), ("outcome", "al-a"),
    ]


@pytest.mark.parametrize(
    ("kind", "detail", "text"),
    [
        ("recorded", {"rule": "r", "rules_version": "v", "owner": "desk", "owner_source": "fallback",
                      "fallback_reason": "context.account_manager missing", "priority": "low"},
         ("rule r matched (rules v): owner desk (fallback: context.account_manager missing), priority low; "
          "recorded only (action: record)")),
        ("routed", {"rule": "r", "rules_version": "v", "owner": "felix", "owner_source": "delegate",
                    "delegated_from": "hugo", "priority": "high"},
         "rule r matched (rules v): owner felix (delegate for away owner hugo), priority high"),
        ("routed", {"rule": "r", "rules_version": "v", "owner": "felix", "owner_source": "delegate",
                    "delegated_from": "hugo", "fallback_reason": "owner 'zed' not in directory", "priority": "high"},
         ("rule r matched (rules v): owner felix (delegate for away owner hugo; fallback: owner 'zed' not in directory), "
          "priority high")),
        ("sla_breached", {"kind": "act", "reason": "no intervention recorded within 1d", "top_of_chain": "vp"},
         "SLA breached (act): no intervention recorded within 1d; no manager above vp"),
        # The same deadline breached again by a reassigned alert's new chain: not a second, separate breach.
        ("sla_breached", {"kind": "ack", "reason": "not acknowledged within 1h", "top_of_chain": "desk-lead",
                          "again": True},
         "SLA breached again (ack): not acknowledged within 1h; no manager above desk-lead"),
        ("reassigned", {"from_owner": "alice", "to_owner": "felix", "delegated_from": "hugo", "note": "key account"},
         "reassigned alice -> felix (delegate for away owner hugo) (note: key account)"),
        # A reassignment to the owner holding it: no hand-off from them to themselves.
        ("reassigned", {"from_owner": "felix", "to_owner": "felix", "unchanged": True, "note": "again"},
         "reassigned to felix, who already held it: nothing changed (note: again)"),
        ("reassigned", {"from_owner": "felix", "to_owner": "felix", "delegated_from": "hugo", "unchanged": True},
         "reassigned to felix (delegate for away owner hugo), who already held it: nothing changed"),
        # A closed alert: accountable for the record, nothing to receive (no "delivered" follows).
        ("reassigned", {"from_owner": "alice", "to_owner": "bob", "closed": True},
         "reassigned alice -> bob (closed: not delivered again)"),
        ("intervened", {}, "intervened: no action named"),
        # A channel's failure read as a list of fields ("delivery_failed channel=webhook owner=...").
        ("delivery_failed", {"channel": "webhook", "owner": "alice", "status_code": 503, "attempts": 3,
                             "latency_ms": 12.5, "error": "HTTP 503"},
         "delivery to alice via webhook failed after 3 attempts (status 503): HTTP 503"),
        ("delivery_failed", {"channel": "email", "owner": "lead", "status_code": None, "attempts": 1,
                             "error": "connection refused", "escalation_level": 1, "digest": 4},
         "delivery to lead via email in a digest of 4 (escalation level 1) failed after 1 attempt: connection refused"),
        ("delivered", {"channel": "webhook", "owner": "alice", "status_code": 200, "attempts": 2, "digest": 3},
         "delivered to alice via webhook in a digest of 3"),
        # Not the first of its type: kept in the audit log only, which the story must say.
        ("outcome", {"result": "failure", "value": None, "already_at": "2026-11-02T10:00:00Z",
                     "already_result": "success"},
         "outcome failure; outcome success already recorded at 2026-11-02T10:00:00Z: not recorded"),
        ("acknowledged", {"already_at": "2026-11-02T10:00:00Z"},
         "acknowledged; already acknowledged at 2026-11-02T10:00:00Z: not recorded"),
        ("intervened", {"action": "email", "already_at": "2026-11-02T10:00:00Z", "note": "again"},
         "intervened: email; already intervened at 2026-11-02T10:00:00Z: not recorded (note: again)"),
        ("outcome", {"result": "failure", "value": None}, "outcome failure"),
        ("acknowledged", {"note": "on it"}, "acknowledged (note: on it)"),
        ("something-new", {"a": 1, "b": None}, "something-new a=1"),
    ],
)
def test_describe(kind: str, detail: dict[str, Any], text: str) -> None:
    assert describe(kind, "p1", detail) == text


def test_new_stores_hold_no_received_rows_but_old_ones_do(session: Session) -> None:
    # The two stores the story tests above run on, told apart: both tell the same stories.
    stored = set(session.scalars(select(AuditEvent.prediction_id).where(AuditEvent.type == "received")))
    assert stored in (set(), {"p1", "p2", "p9"})


def received_events(events: Any) -> list[tuple[str | None, int | None]]:
    return [(e.prediction_id, e.id) for e in events if e.type == "received"]


def test_a_stored_received_row_is_shown_once_in_place_of_the_built_one(session: Session) -> None:
    # A received row (as an older store holds) added to whichever store: shown, and only it.
    extra = received(T0, "p1")
    session.add(extra)
    session.commit()
    first_stored = session.scalars(
        select(AuditEvent.id).where(AuditEvent.type == "received", AuditEvent.prediction_id == "p1")
        .order_by(AuditEvent.id)).first()
    story = alert_story(session, "al-a")
    assert received_events(story.events) == [("p1", first_stored)]
    assert story.events[0].as_dict()["detail"] == {"stream_id": "1-p1", "model": "churn", "score": 0.91}
    entity = entity_story(session, "account", "acct-17")
    assert [pid for pid, _ in received_events(entity.events)] == ["p1", "p2"]
    assert received_events(entity.events)[0] == ("p1", first_stored)
    for alert_story_ in entity.alerts:
        assert len(received_events(alert_story_.events)) == 1 and alert_story_.events[0].type == "received"


@pytest.mark.parametrize("old_store", [False, True], ids=["new store", "old store"])
def test_predictions_of_one_instant_keep_the_order_they_were_written_in(old_store: bool) -> None:
    # One batch: two predictions of the same entity, each followed by its decision, then a delivery.
    engine = make_engine("sqlite:///:memory:")
    create_schema(engine)
    with Session(engine) as s:
        s.add_all([prediction("p2", "acct-5", T0), prediction("p1", "acct-5", T0),
                   alert("al-2", "p2", "r", "alice", T0, entity_id="acct-5"),
                   alert("al-1", "p1", "r", "alice", T0, entity_id="acct-5", suppressed_by="al-2")])
        s.commit()
        for row in [*([received(T0, "p2")] if old_store else []), event("routed", T0, "al-2", pid="p2", **ROUTED),
                    *([received(T0, "p1")] if old_store else []), event("suppressed", T0, "al-1", **ROUTED),
                    event("delivered", T0, "al-2", pid="p2", channel="inbox", owner="alice")]:
            s.add(row)
            s.flush()  # ids in this order, as one bulk insert writes them
        s.commit()
        story = entity_story(s, "account", "acct-5")
        assert [(e.type, e.prediction_id) for e in story.events] == [
            ("received", "p2"), ("routed", "p2"), ("received", "p1"), ("suppressed", "p1"), ("delivered", "p2"),
        ]
        assert [e.type for e in alert_story(s, "al-1").events] == ["received", "suppressed"]
    engine.dispose()


def test_a_delivery_stored_without_its_prediction_id_shows_its_alerts(session: Session) -> None:
    """The channels' and the escalated copies' delivery events are stored without the prediction id: the JSON
    story showed `prediction_id: null` on those alone."""
    session.add_all([
        event("delivered", T0 + 2 * H, "al-a", pid=None, channel="inbox", owner="lead", escalation_level=1),
        event("delivery_failed", T0 + 2 * H, "al-a", pid=None, channel="webhook", owner="alice", attempts=3),
    ])
    session.commit()
    story = alert_story(session, "al-a")
    assert story is not None
    late = [e for e in story.events if e.at == T0 + 2 * H and e.detail.get("owner") in ("lead", "alice")]
    assert [(e.type, e.prediction_id) for e in late] == [("delivered", "p1"), ("delivery_failed", "p1")]
    entity = entity_story(session, "account", "acct-17")
    assert entity is not None
    assert all(e.prediction_id is not None for e in entity.events)

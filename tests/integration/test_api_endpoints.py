"""Each endpoint's behaviour against the real pipeline: real Redis streams, consumers,
SQLite and PostgreSQL. Access control is in test_api_access.py."""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router.api.app import create_app
from decision_router.api.server import api_for_service
from decision_router.keys import Keys
from decision_router.rules import RuleSet, load_rules
from decision_router.service import running_service
from decision_router.settings import Settings
from decision_router.stats import GroupBy, compute_stats
from decision_router.tables import DELIVERED_TO_OWNER, AlertRecord, AuditEvent, RejectionRecord
from decision_router.tokens import create_token
from decision_router.tracker import alert_id_for
from tests.integration.conftest import RULES_DIR, wait_until
from tests.integration.test_api_access import ALICE, ELENA, RULE, for_owner, route
from tests.integration.test_router_loop import count, inbox, prediction
from tests.unit.test_stats import alert

pytestmark = pytest.mark.redis


class Client:
    def __init__(self, client: httpx.AsyncClient, engine: Engine, ruleset: RuleSet) -> None:
        self.http, self.engine = client, engine
        self.ops = {"Authorization": f"Bearer {create_token(engine, role='ops')[0]}"}
        self.admin = {"Authorization": f"Bearer {create_token(engine, role='admin')[0]}"}
        self.publisher = {"Authorization": f"Bearer {create_token(engine, role='publisher')[0]}"}
        self.alice = {
            "Authorization": f"Bearer {create_token(engine, role='owner', owner=ALICE, owners=ruleset.owners)[0]}"
        }


@pytest.fixture
async def served(service, settings: Settings, ruleset: RuleSet, engine: Engine) -> AsyncIterator[Client]:
    """The app as `serve` builds it: on the running service's pipeline, consumers running."""
    pipeline = service.pipeline
    app = create_app(settings, engine=engine, redis=pipeline.redis, ruleset=lambda: pipeline.ruleset, pipeline=pipeline)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        yield Client(client, engine, ruleset)


@pytest.fixture
async def standalone(settings: Settings, ruleset: RuleSet, engine: Engine) -> AsyncIterator[tuple[Client, object]]:
    """The app as `decision-router api` builds it: no consumers, its own pipeline for outcome events."""
    redis = Redis.from_url(settings.effective_redis_url)
    app = create_app(settings, engine=engine, redis=redis, ruleset=ruleset)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        yield Client(client, engine, ruleset), app
    await redis.aclose()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    return 0.0


# predictions ------------------------------------------------------------------------------


async def test_posted_predictions_are_gated_and_routed_like_stream_ones(served: Client, service, r, engine) -> None:
    keys = service.keys
    before = (await served.http.get("/metrics", headers=served.ops)).text
    stale = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    batch = [
        prediction("h1"),
        prediction("h2", score=1.5),
        prediction("h1", entity_id="acct-other"),  # same prediction_id again
        prediction("h3", predicted_at=stale),
        "not an object",
    ]
    response = await served.http.post("/v1/predictions", json=batch, headers=served.publisher)
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["accepted"], body["rejected"]) == (1, 4)
    assert [(i["status"], i.get("reason")) for i in body["results"]] == [
        ("accepted", None),
        ("rejected", "score_out_of_range"),
        ("rejected", "duplicate"),
        ("rejected", "stale"),
        ("rejected", "invalid_json"),
    ]
    assert "1.5" in body["results"][1]["detail"]
    # The router does the rest: stored, delivered to the owner's inbox, rejections dead-lettered once.
    alert_id = alert_id_for("h1", RULE)
    await wait_until(
        lambda: (
            count(engine, AlertRecord, AlertRecord.alert_id == alert_id, AlertRecord.delivered_at.is_not(None)) == 1
        ),
        what="h1 routed and delivered",
    )
    assert [a.alert_id for a in inbox(r, keys, ALICE)] == [alert_id]
    await wait_until(lambda: r.xlen(keys.predictions_dlq) == 4, what="4 dead letters")
    reasons = sorted(fields["reason"] for _, fields in r.xrange(keys.predictions_dlq))
    assert reasons == ["duplicate", "invalid_json", "score_out_of_range", "stale"]
    with Session(engine) as session:
        stored = sorted(session.scalars(select(RejectionRecord.reason)))
    assert stored == reasons
    after = (await served.http.get("/metrics", headers=served.ops)).text
    for reason in reasons:
        delta = metric(after, "decision_router_rejected_total", stream="predictions", reason=reason) - metric(
            before, "decision_router_rejected_total", stream="predictions", reason=reason
        )
        assert delta == 1, reason
    assert (
        metric(after, "decision_router_predictions_routed_total")
        - metric(before, "decision_router_predictions_routed_total")
        == 1
    )
    # One object (not a list) is a batch of one; posting h1 again is now a stored duplicate.
    again = await served.http.post("/v1/predictions", json=prediction("h1"), headers=served.publisher)
    assert again.json()["results"][0]["reason"] == "duplicate"


# alerts: list, filters, pages ----------------------------------------------------------------


async def test_alert_list_filters_and_pages(standalone) -> None:
    api, app = standalone
    await route(app, *(for_owner(f"l{i}", ALICE) for i in range(5)), for_owner("m1", ELENA))
    # pages of 2, newest first, every alert once
    seen, cursor, pages = [], None, 0
    while True:
        response = await api.http.get(
            "/v1/alerts", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=api.ops
        )
        assert response.status_code == 200
        page = response.json()
        seen += [a["alert_id"] for a in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and len(seen) == len(set(seen)) == 6
    with Session(api.engine) as session:
        expected = list(
            session.scalars(
                select(AlertRecord.alert_id).order_by(AlertRecord.created_at.desc(), AlertRecord.alert_id.desc())
            )
        )
    assert seen == expected

    async def ids(**params: str) -> set[str]:
        response = await api.http.get("/v1/alerts", params=params, headers=api.ops)
        assert response.status_code == 200, response.text
        return {a["alert_id"] for a in response.json()["items"]}

    assert await ids(owner=ELENA) == {alert_id_for("m1", RULE)}
    assert await ids(entity="account:acct-l3") == {alert_id_for("l3", RULE)}
    assert await ids(rule=RULE, model="churn") == set(expected)
    assert await ids(rule="no-such-rule") == set()
    assert await ids(since="1h") == set(expected)
    assert await ids(since=(datetime.now(UTC) + timedelta(days=1)).date().isoformat()) == set()
    acked = alert_id_for("l1", RULE)
    assert (await api.http.post(f"/v1/alerts/{acked}/ack", headers=api.alice)).status_code == 200
    assert await ids(state="acknowledged") == {acked}
    assert await ids(state="open", owner=ALICE) == {alert_id_for(f"l{i}", RULE) for i in (0, 2, 3, 4)}
    assert await ids(state="closed") == set()
    item = (await api.http.get("/v1/alerts", params={"entity": "account:acct-l1"}, headers=api.alice)).json()["items"][
        0
    ]
    assert item["state"] == "acknowledged" and item["owner"] == ALICE and item["ack_by"] and item["ack_due_at"] is None
    assert set(item["context"]) == {
        "context.arr",
        "context.renewal_date",
        "context.region",
        "features.top_drivers",
    } - set(item["missing_context"])


async def test_a_blank_filter_is_no_filter_on_alerts_and_stats(standalone) -> None:
    """`?owner=&rule=&model=` (a script's unset variables, a form's empty fields) answers what no filter does,
    as a blank since or entity did and as the dashboard's JSON reads blanks: no owner, rule or model is named ""
    (an owner token got a 403 for "another owner", the others an empty list that looked like "none")."""
    api, app = standalone
    await route(app, for_owner("e1", ALICE), for_owner("e2", ELENA))
    blank = {"owner": "", "rule": "", "model": ""}
    for headers in (api.ops, api.alice):
        everything = (await api.http.get("/v1/alerts", headers=headers)).json()
        response = await api.http.get("/v1/alerts", params=blank, headers=headers)
        assert everything["items"] and (response.status_code, response.json()) == (200, everything)
        stats = await api.http.get("/v1/stats", params=blank, headers=headers)
        expected = (await api.http.get("/v1/stats", headers=headers)).json()
        assert expected["rows"] and (stats.status_code, stats.json()) == (200, expected)
    quality = await api.http.get("/v1/stats/quality", params={"model": ""}, headers=api.ops)
    expected = (await api.http.get("/v1/stats/quality", headers=api.ops)).json()
    assert expected["models"] and quality.json() == expected


async def test_the_action_filter_splits_decisions_into_delivered_recorded_control_and_suppressed(standalone) -> None:
    """Each decision is listed under exactly one action; `alert` is tables.DELIVERED_TO_OWNER."""
    api, app = standalone
    await route(
        app,
        for_owner("f-alert", ALICE),
        for_owner("f-control", ALICE),
        # The same entity and rule within the cooldown: suppressed by f-alert's alert.
        {**for_owner("f-again", ALICE), "entity_id": "acct-f-alert"},
        # A shadow model version: recorded for analytics-desk, nobody alerted.
        {**for_owner("f-shadow", ALICE), "model_version": "2026.11-shadow"},
    )
    with Session(api.engine) as session:
        control = session.get(AlertRecord, alert_id_for("f-control", RULE))
        control.held_out = True  # as if drawn into the control group
        session.add(control)
        session.commit()
        delivered = set(session.scalars(select(AlertRecord.alert_id).where(DELIVERED_TO_OWNER)))

    async def listed(action: str) -> set[str]:
        response = await api.http.get("/v1/alerts", params={"action": action}, headers=api.ops)
        assert response.status_code == 200, response.text
        return {a["alert_id"] for a in response.json()["items"]}

    assert await listed("alert") == delivered == {alert_id_for("f-alert", RULE)}
    assert await listed("control") == {alert_id_for("f-control", RULE)}
    assert await listed("suppressed") == {alert_id_for("f-again", RULE)}
    assert await listed("record") == {alert_id_for("f-shadow", "shadow-models")}
    # An owner token's list is the delivered one.
    assert {a["alert_id"] for a in (await api.http.get("/v1/alerts", headers=api.alice)).json()["items"]} == delivered


# one alert and the actions on it -------------------------------------------------------------


async def test_actions_follow_the_outcome_path_into_the_audit_trail_and_stats(standalone) -> None:
    api, app = standalone
    await route(app, for_owner("x1", ALICE), for_owner("x2", ALICE))
    alert_id = alert_id_for("x1", RULE)
    for action, body in (
        ("ack", None),
        ("intervene", {"action": "exec-call", "note": "called the CFO"}),
        ("outcome", {"result": "success", "value": 120000}),
    ):
        response = await api.http.post(f"/v1/alerts/{alert_id}/{action}", json=body, headers=api.alice)
        assert response.status_code == 200, response.text
    story = (await api.http.get(f"/v1/alerts/{alert_id}", headers=api.alice)).json()
    assert [e["type"] for e in story["events"]] == [
        "received",
        "routed",
        "delivered",
        "acknowledged",
        "intervened",
        "outcome",
    ]
    assert all(e["actor"] == ALICE for e in story["events"][-3:])
    assert story["alert"]["state"] == "closed" and story["alert"]["intervention"] == "exec-call"
    assert story["alert"]["outcome_value"] == 120000 and story["prediction"]["prediction_id"] == "x1"
    # The API's stats are the CLI's numbers.
    response = await api.http.get("/v1/stats", params={"by": "owner"}, headers=api.ops)
    with Session(api.engine) as session:
        holdouts = {rule.name: rule.holdout for rule in load_rules(RULES_DIR).rules}
        expected = [row.as_dict(GroupBy.OWNER) for row in compute_stats(session, by=GroupBy.OWNER, holdouts=holdouts)]
    assert response.json() == {"by": "owner", "rows": json.loads(json.dumps(expected))}
    alice = response.json()["rows"][0]
    assert (alice["routed"], alice["acknowledged"], alice["intervened"], alice["successes"]) == (2, 1, 1, 1)
    filtered = (await api.http.get("/v1/stats", params={"rule": "payment-fraud-block"}, headers=api.ops)).json()
    assert filtered == {"by": "rule", "rows": []}  # a rule of the rules with no alerts yet


# stats filters: a name no one knows is a 422, as the CLI's exit 2 --------------------------------


def month_old_alert(engine: Engine) -> None:
    """An alert 30 days ago, by a rule, for an owner and of a model no longer in the rules."""
    with Session(engine) as session:
        session.add(alert(1, rule="retired-rule", owner="gone-owner", model="retired-model",
                          created=datetime.now(UTC) - timedelta(days=30)))
        session.commit()


def unseen(model: str) -> str:
    return f"the store has no prediction, decision or rejection of model '{model}', and the rules do not name it"


async def test_a_stats_filter_neither_the_rules_nor_the_store_know_is_a_422_naming_it_with_the_close_match(
    standalone,
) -> None:
    """`decision-router stats --rule chrun` exits 2 with "did you mean"; the API answered 200 with no rows, which
    reads as "no data yet". Same check, same words (stats_filters), without the server's rules directory."""
    api, _ = standalone
    month_old_alert(api.engine)
    cases = [
        ("/v1/stats", "rule", "enterprise-churn-rsk", "rule 'enterprise-churn-rsk' is not in the rules, and the "
                                                      "store has no alerts for it; did you mean 'enterprise-churn-risk'?"),
        ("/v1/stats", "owner", "alcie-moreau", "owner 'alcie-moreau' is not in the owner directory, and the store "
                                               "has no alerts for it; did you mean 'alice-moreau'?"),
        ("/v1/stats", "rule", "nope", "rule 'nope' is not in the rules, and the store has no alerts for it"),
        ("/v1/stats", "model", "retired-modl", unseen("retired-modl") + "; did you mean 'retired-model'?"),  # the store's
        ("/v1/stats", "model", "payment-frad", unseen("payment-frad") + "; did you mean 'payment-fraud'?"),  # the rules'
        ("/v1/stats/quality", "model", "chrun", unseen("chrun") + "; did you mean 'churn'?"),
        ("/v1/stats/quality", "model", "weather", unseen("weather")),
    ]
    for path, name, value, message in cases:
        response = await api.http.get(path, params={name: value}, headers=api.ops)
        assert response.status_code == 422, (path, name, response.text)
        assert response.json()["detail"] == [{"loc": ["query", name], "msg": message, "type": "value_error"}]
    # An owner token chooses its rule and model: checked too, against its own alerts (the test below).
    response = await api.http.get("/v1/stats", params={"model": "chrun"}, headers=api.alice)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", "model"], response.text


def not_alices(name: str, value: str) -> str:
    return f"the store has no alerts of owner '{ALICE}' with {name} '{value}'"


async def test_an_owner_tokens_stats_filters_are_checked_against_its_own_alerts_and_name_nothing_else(
    standalone,
) -> None:
    """An owner token reads its own statistics only, yet its 422 named rules and models from the rules and from
    other owners' alerts ("did you mean 'payment-fraud-block'?"), and a name known elsewhere was a 200 where one
    known nowhere was a 422: the answer said which names exist. Now both get the same 422, whose close match is
    one of the owner's own; ops tokens keep the rules' and the store's names."""
    api, _ = standalone
    month_old_alert(api.engine)  # gone-owner's: retired-rule, retired-model
    with Session(api.engine) as session:
        session.add(alert(2, rule=RULE, owner=ALICE, model="churn", created=datetime.now(UTC) - timedelta(days=30)))
        session.commit()
    elsewhere = ["retired-rule", "payment-fraud-block", "payment-fraud-blok"]  # another owner's, the rules' (+ typo)
    cases = [
        *[("rule", name, not_alices("rule", name)) for name in [*elsewhere, "nope"]],
        *[("model", name, not_alices("model", name)) for name in ["retired-model", "payment-fraud", "payment-frad"]],
        ("rule", "enterprise-churn-rsk", not_alices("rule", "enterprise-churn-rsk") + f"; did you mean '{RULE}'?"),
        ("model", "chrun", not_alices("model", "chrun") + "; did you mean 'churn'?"),
    ]
    for name, value, message in cases:
        response = await api.http.get("/v1/stats", params={name: value}, headers=api.alice)
        assert response.status_code == 422, (name, value, response.text)
        assert response.json()["detail"] == [{"loc": ["query", name], "msg": message, "type": "value_error"}]
    # Its own rule and model with nothing in the window: no rows, as for ops.
    for params in ({"rule": RULE}, {"model": "churn"}):
        response = await api.http.get("/v1/stats", params={**params, "since": "7d"}, headers=api.alice)
        assert (response.status_code, response.json()) == (200, {"by": "rule", "rows": []}), (params, response.text)
    # An ops token still learns what the rules and the store know.
    assert (await api.http.get("/v1/stats", params={"rule": "retired-rule"}, headers=api.ops)).status_code == 200
    response = await api.http.get("/v1/stats", params={"rule": "payment-fraud-blok"}, headers=api.ops)
    assert response.json()["detail"][0]["msg"].endswith("did you mean 'payment-fraud-block'?"), response.text


async def test_a_stats_filter_the_rules_or_the_store_know_is_no_error_with_nothing_in_the_window(standalone) -> None:
    """A rule or owner since removed that still has alerts, a model the store saw before the window, or one the
    rules route before its first prediction: no rows, 200, as the CLI prints its empty table."""
    api, _ = standalone
    month_old_alert(api.engine)
    for params in ({"rule": "retired-rule"}, {"owner": "gone-owner"}, {"model": "retired-model"},
                   {"model": "payment-fraud"}):
        response = await api.http.get("/v1/stats", params={**params, "since": "7d"}, headers=api.ops)
        assert (response.status_code, response.json()) == (200, {"by": "rule", "rows": []}), (params, response.text)
    [row] = (await api.http.get("/v1/stats", params={"rule": "retired-rule"}, headers=api.ops)).json()["rows"]
    assert row["rule"] == "retired-rule" and row["routed"] == 1
    for model in ("retired-model", "payment-fraud"):
        response = await api.http.get("/v1/stats/quality", params={"model": model, "since": "7d"}, headers=api.ops)
        assert response.status_code == 200 and response.json()["models"] == [], (model, response.text)


async def test_an_owner_tokens_own_owner_is_never_checked(standalone) -> None:
    """The token sets it: an owner of the directory with no alert yet reads empty stats. One since removed
    from the directory is refused as a leaver (403), never told its own owner is unknown (422)."""
    api, _ = standalone
    fresh = {"Authorization": f"Bearer {create_token(api.engine, role='owner', owner='giulia-conti')[0]}"}
    gone = {"Authorization": f"Bearer {create_token(api.engine, role='owner', owner='left-the-company')[0]}"}
    for params in ({}, {"owner": "giulia-conti"}, {"since": "7d"}):
        response = await api.http.get("/v1/stats", params=params, headers=fresh)
        assert (response.status_code, response.json()) == (200, {"by": "rule", "rows": []}), (params, response.text)
    for params in ({}, {"owner": "left-the-company"}, {"since": "7d"}):
        response = await api.http.get("/v1/stats", params=params, headers=gone)
        assert response.status_code == 403, (params, response.text)
        assert "'left-the-company' is no longer in the owner directory" in response.json()["detail"]


async def test_an_alerts_times_read_the_same_from_the_api_as_from_the_owners_inbox(
    standalone, r, settings: Settings
) -> None:
    """A client reading an alert from its inbox entry (or webhook) and from the API gets one string per time:
    UTC with a Z, as the streams and every documented example write it (the API wrote +00:00)."""
    api, app = standalone
    await route(app, for_owner("z1", ALICE))
    alert_id = alert_id_for("z1", RULE)
    [sent] = [json.loads(fields["data"]) for _, fields in r.xrange(Keys(settings.stream_prefix).inbox(ALICE))]
    story = (await api.http.get(f"/v1/alerts/{alert_id}", headers=api.alice)).json()
    [listed] = (await api.http.get("/v1/alerts", headers=api.alice)).json()["items"]
    owner_view = (await api.http.get("/v1/dashboard/owner", headers=api.alice)).json()
    [card] = owner_view["alerts"]
    for field in ("created_at", "ack_by", "act_by", "predicted_at"):
        assert story["alert"][field] == listed[field] == sent[field], field
    assert (card["created_at"], card["ack_by"], card["act_by"]) == (sent["created_at"], sent["ack_by"], sent["act_by"])
    ops_view = (await api.http.get("/v1/dashboard/ops", params={"since": "2026-01-01"}, headers=api.ops)).json()
    others = [owner_view["now"], ops_view["window"]["since"], story["prediction"]["received_at"], listed["ack_due_at"]]
    assert all(time.endswith("Z") for time in others + [e["at"] for e in story["events"]]), (others, story["events"])


async def test_reassign_hands_the_alert_over_and_delivers_it_to_the_new_owner(
    served: Client, service, r, engine
) -> None:
    keys = service.keys
    r.xadd(keys.predictions, {"data": json.dumps(for_owner("g1", ALICE))})
    alert_id = alert_id_for("g1", RULE)
    await wait_until(lambda: count(engine, AlertRecord, AlertRecord.delivered_at.is_not(None)) == 1, what="delivered")
    unknown = await served.http.post(
        f"/v1/alerts/{alert_id}/reassign", json={"owner": "alice-moreu"}, headers=served.ops
    )
    assert unknown.status_code == 422
    assert (
        unknown.json()["detail"][0]["loc"] == ["body", "owner"] and "alice-moreau" in unknown.json()["detail"][0]["msg"]
    )
    response = await served.http.post(
        f"/v1/alerts/{alert_id}/reassign", json={"owner": ELENA, "note": "on leave"}, headers=served.ops
    )
    assert response.status_code == 200, response.text
    assert response.json()["alert"]["owner"] == ELENA
    assert (response.json()["unchanged"], response.json()["note"]) == (False, None)
    assert [a.alert_id for a in inbox(r, keys, ELENA)] == [alert_id]  # delivered before the answer
    assert (await served.http.get(f"/v1/alerts/{alert_id}", headers=served.alice)).status_code == 404
    [event] = [e for e in response.json()["events"] if e["type"] == "reassigned"]
    assert (event["detail"]["from_owner"], event["detail"]["to_owner"], event["detail"]["note"]) == (
        ALICE,
        ELENA,
        "on leave",
    )


@pytest.mark.parametrize("alert_id", ["al-nope", "al-0%000", "al-" + "x" * 5000, "al-%C3%A9t%C3%A9", "%20", "al-%FF"])
async def test_reassigning_an_alert_that_does_not_exist_is_a_404_that_changes_and_audits_nothing(
    standalone, r, settings: Settings, alert_id: str
) -> None:
    api, _ = standalone
    response = await api.http.post(f"/v1/alerts/{alert_id}/reassign", json={"owner": ELENA}, headers=api.ops)
    assert response.status_code == 404, response.text
    assert response.json()["detail"].startswith("no alert ")
    with Session(api.engine) as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 0
        assert session.scalar(select(func.count()).select_from(RejectionRecord)) == 0
    assert r.xlen(f"{settings.stream_prefix}outcomes:dlq") == 0


async def test_reassign_to_the_owner_holding_it_says_nothing_changes_and_a_closed_alert_is_not_delivered(
    served: Client, service, r, engine
) -> None:
    """A reassignment to the present owner answered as if it handed the alert over (and restarted its deadlines);
    a closed alert reassigned went to the new owner's inbox."""
    keys = service.keys
    r.xadd(keys.predictions, {"data": json.dumps(for_owner("g2", ALICE))})
    alert_id = alert_id_for("g2", RULE)
    await wait_until(lambda: count(engine, AlertRecord, AlertRecord.delivered_at.is_not(None)) == 1, what="delivered")
    before = (await served.http.get(f"/v1/alerts/{alert_id}", headers=served.ops)).json()["alert"]
    retry = {**served.ops, "Idempotency-Key": "same-owner-1"}
    for _ in range(2):  # the retry is answered alike
        same = await served.http.post(f"/v1/alerts/{alert_id}/reassign", json={"owner": ALICE}, headers=retry)
        assert same.status_code == 200, same.text
        answer = same.json()
        assert (answer["unchanged"], answer["note"]) == (True, f"'{ALICE}' already holds the alert; nothing changes")
        assert answer["alert"] == before  # same deadlines, same delivery, same escalation state
    assert [e["type"] for e in answer["events"]][-2:] == ["delivered", "reassigned"]
    assert answer["events"][-1]["detail"] == {"from_owner": ALICE, "to_owner": ALICE, "unchanged": True}
    assert [a.alert_id for a in inbox(r, keys, ALICE)] == [alert_id]
    assert count(engine, AuditEvent, AuditEvent.type == "reassigned") == 1

    closed = await served.http.post(f"/v1/alerts/{alert_id}/outcome", json={"result": "success"}, headers=served.ops)
    assert closed.status_code == 200, closed.text
    moved = await served.http.post(f"/v1/alerts/{alert_id}/reassign", json={"owner": ELENA}, headers=served.ops)
    assert moved.status_code == 200, moved.text
    answer = moved.json()
    assert (answer["unchanged"], answer["alert"]["owner"], answer["alert"]["delivered_at"]) == (
        False, ELENA, before["delivered_at"]
    )
    # In the words of `decision-router reassign`'s note (tests/unit/test_cli_input.py).
    assert answer["note"] == f"the alert is closed; '{ELENA}' becomes accountable for it, and does not receive it"
    assert [e["type"] for e in answer["events"]][-1] == "reassigned"
    assert inbox(r, keys, ELENA) == []


async def test_outcome_webhook_addresses_by_alert_prediction_or_entity_and_dead_letters_the_rest(
    standalone, r, settings: Settings
) -> None:
    api, app = standalone
    await route(app, for_owner("w1", ALICE), for_owner("w2", ALICE), for_owner("w3", ALICE))
    events = [
        {"alert_id": alert_id_for("w1", RULE), "type": "acknowledged", "actor": "crm"},
        {"prediction_id": "w2", "type": "intervened", "actor": "crm", "action": "discount"},
        {"entity_type": "account", "entity_id": "acct-w3", "type": "outcome", "result": "success", "actor": "crm"},
        {"alert_id": "al-nope", "type": "acknowledged", "actor": "crm"},
        {"alert_id": alert_id_for("w1", RULE), "type": "outcome", "actor": "crm"},  # no result
    ]
    response = await api.http.post("/v1/outcomes", json=events, headers=api.publisher)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [(x["status"], x.get("reason")) for x in results] == [
        ("applied", None),
        ("applied", None),
        ("applied", None),
        ("rejected", "unknown_alert"),
        ("rejected", "schema"),
    ]
    assert "result" in results[4]["detail"]
    with Session(api.engine) as session:
        w1, w2, w3 = (session.get(AlertRecord, alert_id_for(p, RULE)) for p in ("w1", "w2", "w3"))
        assert w1.acknowledged_at is not None and w2.intervention == "discount" and w3.outcome == "success"
        assert session.scalar(select(AuditEvent.actor).where(AuditEvent.type == "outcome")) == "crm"
    dlq = [(fields["reason"], fields["detail"]) for _, fields in r.xrange(f"{settings.stream_prefix}outcomes:dlq")]
    # The answer's reason and detail are the DLQ entry's: the event was parsed once, by the pipeline.
    assert dlq == [("unknown_alert", results[3]["detail"]), ("schema", results[4]["detail"])]
    assert results[3]["detail"] == "no alert al-nope"


async def test_the_outcome_webhook_says_per_item_whether_a_reassignment_changed_nothing(standalone) -> None:
    """/v1/alerts/{id}/reassign answers `unchanged`; the batch answered a reassignment to the owner holding the
    alert "applied" like one that handed it over, also when retried."""
    api, app = standalone
    await route(app, for_owner("u1", ALICE), for_owner("u2", ALICE))
    events = [
        {"alert_id": alert_id_for("u1", RULE), "type": "reassigned", "actor": "ops", "owner": ALICE},
        {"prediction_id": "u2", "type": "reassigned", "actor": "ops", "owner": ELENA},
        {"alert_id": alert_id_for("u1", RULE), "type": "acknowledged", "actor": "crm"},
    ]
    keyed = {**api.ops, "Idempotency-Key": "batch-unchanged-1"}
    for replayed in (None, True):  # the retry is answered alike
        response = await api.http.post("/v1/outcomes", json=events, headers=keyed)
        assert response.status_code == 200, response.text
        assert response.json()["results"] == [
            {"index": 0, "status": "applied", "unchanged": True, **({"replayed": True} if replayed else {})},
            {"index": 1, "status": "applied", "unchanged": False, **({"replayed": True} if replayed else {})},
            {"index": 2, "status": "applied", **({"replayed": True} if replayed else {})},
        ]
    with Session(api.engine) as session:
        owners = [session.get(AlertRecord, alert_id_for(p, RULE)).owner for p in ("u1", "u2")]
    assert owners == [ALICE, ELENA]


def events_of(engine: Engine, alert_id: str, kind: str) -> list[AuditEvent]:
    with Session(engine) as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.alert_id == alert_id, AuditEvent.type == kind)))


async def test_a_retried_outcome_webhook_with_an_idempotency_key_applies_once(
    standalone, r, settings: Settings
) -> None:
    """CRMs retry webhooks after a timeout: with the same Idempotency-Key (from the same token) a retry
    applies nothing again and answers as the first did; without a key, or with another, it is a new event."""
    api, app = standalone
    await route(app, for_owner("k1", ALICE))
    alert_id = alert_id_for("k1", RULE)
    events = [
        {"alert_id": alert_id, "type": "intervened", "actor": "crm", "action": "call"},
        {"alert_id": "al-nope", "type": "acknowledged", "actor": "crm"},
    ]
    keyed = {**api.publisher, "Idempotency-Key": "crm-delivery-7f3a"}
    first = await api.http.post("/v1/outcomes", json=events, headers=keyed)
    retry = await api.http.post("/v1/outcomes", json=events, headers=keyed)
    assert first.status_code == retry.status_code == 200
    def answers(response: httpx.Response) -> list[tuple[str, bool | None]]:
        return [(x["status"], x.get("replayed")) for x in response.json()["results"]]

    assert answers(first) == [("applied", None), ("rejected", None)]
    assert answers(retry) == [("applied", True), ("rejected", None)]
    assert retry.json()["results"][1]["detail"] == first.json()["results"][1]["detail"] == "no alert al-nope"
    assert len(events_of(api.engine, alert_id, "intervened")) == 1
    # The rejected event was dead-lettered and counted once, not once per retry.
    assert [f["reason"] for _, f in r.xrange(f"{settings.stream_prefix}outcomes:dlq")] == ["unknown_alert"]
    with Session(api.engine) as session:
        assert session.scalar(select(func.count()).select_from(RejectionRecord)) == 1
    # Another token's same key is another client's request; no key is a new event each time.
    other = {"Authorization": f"Bearer {create_token(api.engine, role='publisher')[0]}",
             "Idempotency-Key": "crm-delivery-7f3a"}
    assert answers(await api.http.post("/v1/outcomes", json=events[:1], headers=other)) == [("applied", None)]
    await api.http.post("/v1/outcomes", json=events[:1], headers=api.publisher)
    assert len(events_of(api.engine, alert_id, "intervened")) == 3
    # The same key on a different event (a batch retried in part) is another request: applied, not "replayed".
    await route(app, for_owner("k3", ALICE))
    shifted = [{"alert_id": alert_id_for("k3", RULE), "type": "acknowledged", "actor": "crm"}]
    assert answers(await api.http.post("/v1/outcomes", json=shifted, headers=keyed)) == [("applied", None)]
    assert len(events_of(api.engine, alert_id_for("k3", RULE), "acknowledged")) == 1


async def test_a_retried_alert_action_with_an_idempotency_key_writes_one_event(standalone) -> None:
    api, app = standalone
    await route(app, for_owner("k2", ALICE))
    alert_id = alert_id_for("k2", RULE)
    keyed = {**api.alice, "Idempotency-Key": "ack-1"}
    for _ in range(2):
        response = await api.http.post(f"/v1/alerts/{alert_id}/ack", json={"note": "on it"}, headers=keyed)
        assert response.status_code == 200, response.text
        assert [e["type"] for e in response.json()["events"]].count("acknowledged") == 1
    # The key is per action: the same key on another endpoint is another request.
    response = await api.http.post(f"/v1/alerts/{alert_id}/intervene", json={"action": "call"}, headers=keyed)
    assert [e["type"] for e in response.json()["events"]].count("intervened") == 1
    assert len(events_of(api.engine, alert_id, "acknowledged")) == 1


@pytest.mark.parametrize("path", ["/v1/stats", "/v1/stats/quality", "/v1/dashboard/ops"])
async def test_an_inverted_window_is_a_422_not_an_empty_answer(served: Client, path: str) -> None:
    response = await served.http.get(path, params={"since": "1d", "until": "7d"}, headers=served.ops)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", "until"]


async def test_a_boolean_outcome_value_is_a_422_on_the_alert_endpoint_too(standalone) -> None:
    api, app = standalone
    await route(app, for_owner("b1", ALICE))
    response = await api.http.post(f"/v1/alerts/{alert_id_for('b1', RULE)}/outcome",
                                   json={"result": "success", "value": True}, headers=api.alice)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][-1] == "value"


async def test_a_blank_required_text_is_refused_by_each_endpoint_as_the_gate_refuses_it(standalone) -> None:
    """Whitespace alone in model_version or actor names nothing: refused with the stream gate's reason and detail."""
    api, app = standalone
    await route(app, for_owner("bl1", ALICE))
    posted = await api.http.post("/v1/predictions", json=prediction("bl2", model_version=" "), headers=api.publisher)
    assert posted.status_code == 202, posted.text
    assert [(i["status"], i.get("reason"), i.get("detail")) for i in posted.json()["results"]] == [
        ("rejected", "schema", "model_version: blank (only whitespace)")]
    event = {"alert_id": alert_id_for("bl1", RULE), "type": "acknowledged", "actor": " "}
    webhook = await api.http.post("/v1/outcomes", json=[event], headers=api.publisher)
    assert webhook.status_code == 200, webhook.text
    assert [(x["status"], x.get("reason"), x.get("detail")) for x in webhook.json()["results"]] == [
        ("rejected", "schema", "actor: blank (only whitespace)")]
    acked = await api.http.post(f"/v1/alerts/{alert_id_for('bl1', RULE)}/ack", json={"actor": "\t"}, headers=api.ops)
    assert acked.status_code == 422, acked.text
    assert acked.json()["detail"] == [
        {"loc": ["body", "actor"], "msg": "schema: actor: blank (only whitespace)", "type": "value_error"}]
    assert events_of(api.engine, alert_id_for("bl1", RULE), "acknowledged") == []


async def test_a_blank_address_or_new_owner_on_the_webhook_is_refused_as_blank_not_unknown(standalone) -> None:
    """Whitespace alone was looked up as an alert id or owner: unknown_alert / unknown_owner, not schema."""
    api, app = standalone
    await route(app, for_owner("bl3", ALICE))
    events = [
        {"alert_id": " ", "type": "acknowledged", "actor": "crm"},
        {"entity_type": "account", "entity_id": "\t", "type": "acknowledged", "actor": "crm"},
        {"alert_id": alert_id_for("bl3", RULE), "type": "reassigned", "actor": "crm", "owner": "  "},
    ]
    webhook = await api.http.post("/v1/outcomes", json=events, headers=api.ops)  # a reassignment needs ops
    assert webhook.status_code == 200, webhook.text
    assert [(x["status"], x.get("reason"), x.get("detail")) for x in webhook.json()["results"]] == [
        ("rejected", "schema", "alert_id: blank (only whitespace)"),
        ("rejected", "schema", "entity_id: blank (only whitespace)"),
        ("rejected", "schema", "owner: blank (only whitespace)"),
    ]
    assert events_of(api.engine, alert_id_for("bl3", RULE), "reassigned") == []


@pytest.mark.parametrize("key", ["", "x" * 201, "two words", "caf\u00e9"])
async def test_a_bad_idempotency_key_is_a_422_naming_the_header(standalone, key) -> None:
    api, _ = standalone
    headers = {**api.publisher, "Idempotency-Key": key}
    response = await api.http.post("/v1/outcomes", json={"alert_id": "al-x", "type": "acknowledged", "actor": "crm"},
                                   headers={k: v.encode() if k == "Idempotency-Key" else v for k, v in headers.items()})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]


async def test_text_no_store_can_hold_is_rejected_per_item_never_a_500(standalone, r, settings: Settings) -> None:
    """A lone surrogate (valid JSON, not encodable text) is the gate's invalid_encoding, not a crash."""
    api, _ = standalone
    body = b'[{"prediction_id": "s\\ud800", "model": "churn"}]'
    headers = {**api.publisher, "content-type": "application/json"}
    response = await api.http.post("/v1/predictions", content=body, headers=headers)
    assert response.status_code == 202, response.text
    assert [(i["status"], i.get("reason")) for i in response.json()["results"]] == [("rejected", "invalid_encoding")]
    outcome = b'[{"alert_id": "al-\\udfff", "type": "acknowledged", "actor": "crm"}]'
    response = await api.http.post("/v1/outcomes", content=outcome, headers=headers)
    assert response.status_code == 200, response.text
    assert [(x["status"], x.get("reason")) for x in response.json()["results"]] == [("rejected", "invalid_encoding")]
    dlq = [fields["reason"] for _, fields in r.xrange(f"{settings.stream_prefix}outcomes:dlq")]
    assert dlq == ["invalid_encoding"]  # dead-lettered, not only counted


# rules reload, readiness, metrics, serving ---------------------------------------------------


async def test_serve_runs_the_api_on_a_port_and_reload_swaps_valid_rules_only(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    settings = settings.model_copy(update={"rules_dir": rules_dir, "api_port": 0})
    ruleset = load_rules(rules_dir)
    admin = {"Authorization": f"Bearer {create_token(engine, role='admin')[0]}"}
    async with running_service(settings, ruleset, engine, watch_rules=True) as service:
        async with api_for_service(service, engine) as server:
            assert server is not None and server.port > 0
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                assert (await client.get("/healthz")).json() == {"status": "ok"}
                # Probes that send HEAD (uptime checkers, load balancers): the status, no body.
                for path in ("/healthz", "/readyz"):
                    probed = await client.head(path)
                    assert (probed.status_code, probed.content) == (200, b""), path
                unchanged = (await client.post("/v1/rules/reload", headers=admin)).json()
                assert unchanged["changed"] is False and unchanged["rules_version"] == ruleset.version
                routing = rules_dir / "routing.yaml"
                routing.write_text(routing.read_text().replace("priority: normal}", "priority: low}", 1))
                changed = (await client.post("/v1/rules/reload", headers=admin)).json()
                assert changed["changed"] is True and changed["previous"] == ruleset.version
                assert service.pipeline.ruleset.version == changed["rules_version"] != ruleset.version
                routing.write_text(routing.read_text().replace("owner: analytics-desk", "owner: nobody-known", 1))
                refused = await client.post("/v1/rules/reload", headers=admin)
                assert refused.status_code == 422 and "nobody-known" in json.dumps(refused.json())
                assert service.pipeline.ruleset.version == changed["rules_version"]
        with pytest.raises(httpx.ConnectError):  # stopped with the service's context
            async with httpx.AsyncClient() as client:
                await client.get(f"http://127.0.0.1:{server.port}/healthz")


async def test_readyz_names_what_is_not_ready(settings: Settings, ruleset: RuleSet, engine: Engine) -> None:
    from tests.e2e.helpers import free_port

    down = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    app = create_app(settings, engine=engine, redis=down, ruleset=ruleset)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert (await client.head("/readyz")).status_code == 503
        checks = response.json()["checks"]
        assert checks["database"] == "ok" and checks["rules"] == "ok" and checks["redis"] != "ok"
        # An endpoint that needs Redis says so with a 503, not a 500.
        token = create_token(engine, role="publisher")[0]
        posted = await client.post(
            "/v1/predictions", json=prediction("z1"), headers={"Authorization": f"Bearer {token}"}
        )
        assert posted.status_code == 503 and "Redis" in posted.json()["detail"]
    await down.aclose()


async def test_metrics_read_consumer_group_lag_and_pending_at_scrape_time(standalone, r, settings: Settings) -> None:
    api, _app = standalone
    stream = f"{settings.stream_prefix}predictions"
    r.xgroup_create(stream, settings.consumer_group, id="0", mkstream=True)
    for i in range(5):
        r.xadd(stream, {"data": json.dumps(prediction(f"lag{i}"))})
    r.xreadgroup(settings.consumer_group, "slow-worker", {stream: ">"}, count=2)  # read, never acknowledged
    text = (await api.http.get("/metrics", headers=api.ops)).text
    labels = {"stream": "predictions", "group": settings.consumer_group}
    assert metric(text, "decision_router_consumer_group_lag", **labels) == 3
    assert metric(text, "decision_router_consumer_group_pending", **labels) == 2
    # Declared whether or not this process has counted any yet (a labelled one shows samples once used: its
    # bucket lines were there only when an earlier test in the process had routed a batch).
    for name, kind in (("decision_router_batch_processing_seconds", "histogram"),
                       ("decision_router_deliveries_failed_total", "counter"),
                       ("decision_router_escalations_total", "counter"), ("decision_router_sla_breaches_total", "counter")):
        assert f"# TYPE {name} {kind}" in text, name


# bad input ---------------------------------------------------------------------------------


def cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def test_bad_requests_get_4xx_json_naming_the_field_never_500(standalone) -> None:
    api, app = standalone
    await route(app, for_owner("b1", ALICE))
    alert = alert_id_for("b1", RULE)
    deep = cursor("[" * 3000 + "]" * 3000)
    surrogate, not_text = (cursor(json.dumps(["2026-01-01T00:00:00+00:00", x])) for x in ("\ud800", 7))
    cases = [
        ("POST", "/v1/predictions", {"content": b"{not json"}, api.publisher, 422, "body"),
        ("POST", "/v1/predictions", {"json": []}, api.publisher, 422, "body"),
        ("POST", "/v1/predictions", {"json": [prediction(f"n{i}") for i in range(1001)]}, api.publisher, 422, "body"),
        ("GET", "/v1/alerts?limit=abc", {}, api.ops, 422, "limit"),
        ("GET", "/v1/alerts?limit=0", {}, api.ops, 422, "limit"),
        ("GET", "/v1/alerts?state=sleeping", {}, api.ops, 422, "state"),
        ("GET", "/v1/alerts?entity=acct-17", {}, api.ops, 422, "entity"),
        ("GET", "/v1/alerts?since=last-tuesday", {}, api.ops, 422, "since"),
        ("GET", "/v1/alerts?cursor=%%%", {}, api.ops, 422, "cursor"),
        ("GET", "/v1/alerts?cursor=bm90IGpzb24", {}, api.ops, 422, "cursor"),
        ("GET", f"/v1/alerts?cursor={deep}", {}, api.ops, 422, "cursor"),  # a RecursionError to decode
        ("GET", f"/v1/alerts?cursor={surrogate}", {}, api.ops, 422, "cursor"),  # an id no store can encode
        ("GET", f"/v1/alerts?cursor={not_text}", {}, api.ops, 422, "cursor"),
        ("GET", "/v1/alerts/al-does-not-exist", {}, api.ops, 404, None),
        ("POST", "/v1/alerts/al-does-not-exist/ack", {}, api.ops, 404, None),
        ("POST", f"/v1/alerts/{alert}/ack", {"json": ["a", "list"]}, api.alice, 422, "body"),
        ("POST", f"/v1/alerts/{alert}/ack", {"json": {"at": "yesterday"}}, api.alice, 422, "at"),
        ("POST", f"/v1/alerts/{alert}/outcome", {"json": {}}, api.alice, 422, "result"),
        (
            "POST",
            f"/v1/alerts/{alert}/outcome",
            {"json": {"result": "success", "value": "lots"}},
            api.alice,
            422,
            "value",
        ),
        ("POST", f"/v1/alerts/{alert}/intervene", {"json": {"acton": "typo"}}, api.alice, 422, "acton"),
        ("POST", f"/v1/alerts/{alert}/reassign", {"json": {}}, api.ops, 422, "owner"),
        ("POST", "/v1/outcomes", {"content": b"[1,"}, api.publisher, 422, "body"),
        ("GET", "/v1/stats?by=colour", {}, api.ops, 422, "by"),
        ("GET", "/v1/stats?until=soon", {}, api.ops, 422, "until"),
        ("GET", "/v1/stats/quality?since=x", {}, api.ops, 422, "since"),
        ("GET", "/v1/stats?since=1000000d", {}, api.ops, 422, "since"),  # before the year 1
        ("GET", "/v1/alerts?since=0001-01-01T00:00:00%2B01:00", {}, api.ops, 422, "since"),
    ]
    for method, path, kwargs, headers, status, field in cases:
        if "content" in kwargs:
            headers = {**headers, "content-type": "application/json"}
        response = await api.http.request(method, path, headers=headers, **kwargs)
        assert response.status_code == status, (method, path, response.text)
        detail = response.json()["detail"]
        if field is not None:
            assert any(field in map(str, d["loc"]) for d in detail), (path, detail)


async def test_a_nul_in_a_filter_or_an_alert_id_is_a_4xx_never_a_500(standalone) -> None:
    """PostgreSQL refuses NUL in text: `?rule=a%00b` or `/v1/alerts/al-%00` raised its DataError, a 500 (SQLite
    answered). A filter holding one is a 422 naming it; an alert id holding one is no alert, a 404."""
    api, app = standalone
    await route(app, for_owner("u1", ALICE))
    filters = [("/v1/alerts", name) for name in ("owner", "rule", "model", "entity", "since", "cursor")]
    filters += [("/v1/stats", name) for name in ("owner", "rule", "model")] + [("/v1/stats/quality", "model")]
    filters += [("/v1/dashboard/ops", name) for name in ("model", "rule")]
    for path, name in filters:
        response = await api.http.get(f"{path}?{name}=acct%00x", headers=api.ops)
        assert response.status_code == 422, (path, name, response.text)
        assert [d["loc"] for d in response.json()["detail"]] == [["query", name]], (path, response.text)
    response = await api.http.get("/v1/alerts?owner=alice%00", headers=api.alice)
    assert response.status_code == 422, response.text
    for method, path in (("GET", "/v1/alerts/al-%00x"), ("POST", "/v1/alerts/al-%00x/ack")):
        response = await api.http.request(method, path, headers=api.ops)
        assert response.status_code == 404 and "no alert" in response.json()["detail"], (path, response.text)


async def test_a_window_too_far_back_is_a_422_saying_it_is_too_large(standalone) -> None:
    """Every since/until reads durations as the CLI does: too large, not "expected a duration"."""
    api, _ = standalone
    paths = [("/v1/alerts?since=99999999999d", "since"), ("/v1/stats?until=99999999999d", "until"),
             ("/v1/stats/quality?since=1000000d", "since"), ("/v1/dashboard/ops?until=99999999999d", "until")]
    for path, field in paths:
        response = await api.http.get(path, headers=api.ops)
        assert response.status_code == 422, (path, response.text)
        [detail] = response.json()["detail"]
        assert detail["loc"] == ["query", field], (path, detail)
        given = path.rpartition("=")[2]
        assert re.fullmatch(rf"duration '{given}' is too large: the maximum is \d+d, back to the year 1", detail["msg"])


async def test_a_body_that_is_not_json_is_a_415_naming_the_body(standalone) -> None:
    """FastAPI hands a form or text body over unparsed (bytes): refused, not a 500 serialising it."""
    api, _ = standalone
    for path in ("/v1/predictions", "/v1/outcomes"):
        for kwargs in ({"data": {"x": "1"}}, {"content": b"{}", "headers": {"content-type": "text/plain"}}):
            headers = {**api.publisher, **kwargs.pop("headers", {})}
            response = await api.http.post(path, headers=headers, **kwargs)
            assert response.status_code == 415, (path, response.text)
            [detail] = response.json()["detail"]
            assert detail["loc"] == ["body"] and "application/json" in detail["msg"]


async def test_an_ack_or_intervention_after_the_alerts_outcome_is_a_422_naming_at(standalone) -> None:
    """Applied before, the alert then counted as acted on though the action came after its outcome (by entity the
    same event was refused: only open alerts are addressed). One dated before the outcome is still recorded."""
    api, app = standalone
    await route(app, for_owner("late1", ALICE))
    alert = alert_id_for("late1", RULE)
    assert (await api.http.post(f"/v1/alerts/{alert}/outcome", json={"result": "success"}, headers=api.ops)).status_code == 200
    with Session(api.engine) as session:
        record = session.get(AlertRecord, alert)
        created, outcome_at = record.created_at, record.outcome_at
    # After the outcome: its own `at`, or none (now).
    for body in ({"at": datetime.now(UTC).isoformat()}, {}):
        response = await api.http.post(f"/v1/alerts/{alert}/intervene", json=body, headers=api.alice)
        assert response.status_code == 422, response.text
        [detail] = response.json()["detail"]
        assert detail["loc"] == ["body", "at"], detail
        assert f"is after alert {alert}'s outcome" in detail["msg"] and detail["msg"].startswith("schema: at "), detail
    # Before it, reported late: recorded.
    response = await api.http.post(f"/v1/alerts/{alert}/ack", json={"at": created.isoformat()}, headers=api.alice)
    assert response.status_code == 200, response.text
    with Session(api.engine) as session:
        record = session.get(AlertRecord, alert)
        assert record.acknowledged_at is not None and record.intervened_at is None
        assert record.outcome_at == outcome_at


async def test_an_alert_action_sent_as_a_form_or_text_is_a_415_naming_the_body_as_documented(standalone) -> None:
    """`curl -d '{"note": "x"}'` sends a form: FastAPI validated its bytes against the action's model, a 422
    "not a valid dictionary" naming nothing; docs/api.md promises the 415 the other POSTs answer."""
    api, app = standalone
    await route(app, for_owner("m1", ALICE))
    alert = alert_id_for("m1", RULE)
    bodies = {
        "ack": {}, "intervene": {"action": "call"}, "outcome": {"result": "success"}, "reassign": {"owner": ELENA},
    }
    for action, body in bodies.items():
        text = {"content": json.dumps(body), "headers": {"content-type": "text/plain"}}
        for kwargs in ({"data": {"note": "x"}}, text):
            headers = {**api.ops, **kwargs.pop("headers", {})}
            response = await api.http.post(f"/v1/alerts/{alert}/{action}", headers=headers, **kwargs)
            assert response.status_code == 415, (action, response.text)
            [detail] = response.json()["detail"]
            assert detail["loc"] == ["body"] and detail["type"] == "unsupported_media_type", detail
    # The token is checked first; a body without a Content-Type is not JSON to FastAPI either; a JSON subtype is.
    form = await api.http.post(f"/v1/alerts/{alert}/ack", data={"note": "x"})
    assert form.status_code == 401
    bare = await api.http.post(f"/v1/alerts/{alert}/ack", content=b'{"note": "x"}', headers=api.alice)
    assert bare.status_code == 415, bare.text
    typed = {**api.alice, "content-type": "application/merge-patch+json; charset=utf-8"}
    assert (await api.http.post(f"/v1/alerts/{alert}/intervene", json={}, headers=typed)).status_code == 200


async def test_an_action_the_outcome_path_refuses_names_the_field_it_refused(standalone) -> None:
    """The body passes its model, then the outcome path refuses its `at` (later than now, or before the alert
    existed): the 422 names `at`, not a field called "body"; a bad list names the body as a whole."""
    api, app = standalone
    await route(app, for_owner("f1", ALICE))
    alert = alert_id_for("f1", RULE)
    for at, reason in (("2999-01-01T00:00:00Z", "from_future"), ("2001-01-01T00:00:00Z", "schema")):
        response = await api.http.post(f"/v1/alerts/{alert}/ack", json={"at": at}, headers=api.alice)
        assert response.status_code == 422, response.text
        [detail] = response.json()["detail"]
        assert detail["loc"] == ["body", "at"] and detail["msg"].startswith(f"{reason}: at "), detail
    for field in ("note", "actor"):
        response = await api.http.post(f"/v1/alerts/{alert}/ack", json={field: "a\x00b"}, headers=api.ops)
        assert response.status_code == 422, response.text
        [detail] = response.json()["detail"]
        assert detail["loc"] == ["body", field] and detail["msg"].startswith("invalid_encoding: "), detail
    for path, headers in (("/v1/predictions", api.publisher), ("/v1/outcomes", api.publisher)):
        response = await api.http.post(path, json=[], headers=headers)
        assert response.status_code == 422, response.text
        assert [d["loc"] for d in response.json()["detail"]] == [["body"]]


async def test_outcome_events_that_are_not_objects_are_invalid_json_dead_lettered_as_sent(
    standalone, r, settings: Settings
) -> None:
    """As the gate answers a stream entry that is not a JSON object; the DLQ keeps what was sent."""
    api, _ = standalone
    headers = {**api.publisher, "content-type": "application/json"}
    for body in (b"null", b"5", b'[1, "x"]'):
        response = await api.http.post("/v1/outcomes", content=body, headers=headers)
        assert response.status_code == 200, response.text
        assert {(x["status"], x["reason"]) for x in response.json()["results"]} == {("rejected", "invalid_json")}
    dlq = [fields for _, fields in r.xrange(f"{settings.stream_prefix}outcomes:dlq")]
    assert [f["reason"] for f in dlq] == ["invalid_json"] * 4
    assert [json.loads(f["payload"])["data"] for f in dlq] == ["null", "5", "1", '"x"']


async def test_a_json_body_that_cannot_be_read_is_a_422_naming_the_body_not_a_bare_400(standalone) -> None:
    """Bytes that are not UTF-8, nesting deeper than the JSON parser goes, or a number with more digits than
    Python reads: FastAPI answered a 400 "There was an error parsing the body" that names nothing. Malformed
    JSON is documented as a 422 naming the body (`json_invalid`); these are malformed JSON too, and say why."""
    api, app = standalone
    await route(app, for_owner("j1", ALICE))
    alert = alert_id_for("j1", RULE)
    bodies = {
        b'{"note": "caf\xe9"}': "not UTF-8",  # Latin-1
        b"[" * 100_000 + b"]" * 100_000: "nested too deep",
        b'{"value": ' + b"1" * 5000 + b"}": "digits",
    }
    targets = (("/v1/predictions", api.publisher), ("/v1/outcomes", api.publisher), (f"/v1/alerts/{alert}/ack", api.alice))
    for path, token in targets:
        for body, says in bodies.items():
            headers = {**token, "content-type": "application/json"}
            response = await api.http.post(path, content=body, headers=headers)
            assert response.status_code == 422, (path, says, response.text)
            [detail] = response.json()["detail"]
            assert detail["loc"] == ["body"] and detail["type"] == "json_invalid", detail
            assert says in detail["msg"], detail
    # Other errors keep their status and shape.
    assert (await api.http.get("/v1/alerts/al-nope", headers=api.ops)).json() == {"detail": "no alert 'al-nope'"}
    missing = await api.http.get("/v1/alerts")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"

"""Access control on every endpoint: no token, a wrong token, a revoked token and each role;
and owner A never reading or changing owner B's alerts. Real Redis, SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router.api.app import create_app
from decision_router.escalation import EscalationSweeper
from decision_router.rules import RuleSet
from decision_router.settings import Settings
from decision_router.tables import AlertRecord, AuditEvent, EscalationRecord
from decision_router.tokens import create_token, revoke_token
from decision_router.tracker import alert_id_for
from tests.integration.test_router_loop import prediction

pytestmark = pytest.mark.redis

ALICE, ELENA = "alice-moreau", "elena-petrova"
# Alice's manager chain (owners.yaml), and Elena's manager: a third owner for Alice's alerts.
LEAD, DIRECTOR, EMEA_LEAD = "lead-strategic", "dir-enterprise", "lead-enterprise-emea"
RULE = "enterprise-churn-risk"
ROLES = ("publisher", "owner", "ops", "admin")


@dataclass
class Api:
    client: httpx.AsyncClient
    tokens: dict[str, str]  # role or name -> secret
    app: object
    engine: Engine

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}


async def route(app, *predictions: dict) -> None:
    """Route predictions through the app's pipeline (the router's own code path), synchronously."""
    await app.state.pipeline.process_predictions([(None, {"data": json.dumps(p)}) for p in predictions])


def for_owner(pid: str, owner: str) -> dict:
    return prediction(pid, entity_id=f"acct-{pid}", context={"segment": "enterprise", "account_manager": owner})


@pytest.fixture
async def api(settings: Settings, ruleset: RuleSet, engine: Engine) -> AsyncIterator[Api]:
    redis = Redis.from_url(settings.effective_redis_url)
    reloads: list[int] = []

    async def reload_rules() -> None:
        reloads.append(1)

    app = create_app(settings, engine=engine, redis=redis, ruleset=ruleset, reload_rules=reload_rules)
    tokens = {
        role: create_token(engine, role=role, owner=ALICE if role == "owner" else None, owners=ruleset.owners)[0]
        for role in ROLES
    }
    tokens["elena"] = create_token(engine, role="owner", owner=ELENA, owners=ruleset.owners)[0]
    for name, owner in (("lead", LEAD), ("director", DIRECTOR), ("emea-lead", EMEA_LEAD)):
        tokens[name] = create_token(engine, role="owner", owner=owner, owners=ruleset.owners)[0]
    revoked, info = create_token(engine, role="admin")
    revoke_token(engine, info.token_id)
    tokens["revoked"] = revoked
    tokens["wrong"] = "drt_" + "x" * 43
    await route(app, for_owner("a1", ALICE), for_owner("e1", ELENA))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        yield Api(client, tokens, app, engine)
    await redis.aclose()


ALICE_ALERT = alert_id_for("a1", RULE)
ELENA_ALERT = alert_id_for("e1", RULE)

# (method, path, json body, roles that may call it). admin may do all that ops may.
ENDPOINTS = [
    ("GET", "/v1/whoami", None, {"publisher", "owner", "ops", "admin"}),
    ("POST", "/v1/predictions", "PREDICTION", {"publisher", "ops", "admin"}),
    ("GET", "/v1/alerts", None, {"owner", "ops", "admin"}),
    ("GET", f"/v1/alerts/{ALICE_ALERT}", None, {"owner", "ops", "admin"}),
    ("POST", f"/v1/alerts/{ALICE_ALERT}/ack", {}, {"owner", "ops", "admin"}),
    ("POST", f"/v1/alerts/{ALICE_ALERT}/intervene", {"action": "exec-call"}, {"owner", "ops", "admin"}),
    ("POST", f"/v1/alerts/{ALICE_ALERT}/outcome", {"result": "success"}, {"owner", "ops", "admin"}),
    ("POST", f"/v1/alerts/{ALICE_ALERT}/reassign", {"owner": ALICE}, {"ops", "admin"}),
    (
        "POST",
        "/v1/outcomes",
        {"alert_id": ALICE_ALERT, "type": "acknowledged", "actor": "crm"},
        {"publisher", "ops", "admin"},
    ),
    ("GET", "/v1/stats", None, {"owner", "ops", "admin"}),
    ("GET", "/v1/stats/quality", None, {"ops", "admin"}),
    ("POST", "/v1/rules/reload", None, {"admin"}),
    ("GET", "/metrics", None, {"ops", "admin"}),
    ("GET", "/v1/dashboard/ops", None, {"ops", "admin"}),
    ("GET", "/v1/dashboard/owner", None, {"owner"}),
]
PUBLIC = [
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/asyncapi.json"),
]


async def call(api: Api, method: str, path: str, body, headers: dict[str, str]) -> httpx.Response:
    if body == "PREDICTION":
        body = prediction("fresh-1")
    return await api.client.request(method, path, json=body, headers=headers)


async def test_every_endpoint_refuses_missing_wrong_and_revoked_tokens_and_admits_only_its_roles(api: Api) -> None:
    seen: list[tuple[str, str, int]] = []
    for method, path, body, allowed in ENDPOINTS:
        for who, headers in (
            ("none", {}),
            ("not bearer", {"Authorization": f"Basic {api.tokens['admin']}"}),
            ("wrong", api.auth("wrong")),
            ("revoked", api.auth("revoked")),
        ):
            response = await call(api, method, path, body, headers)
            assert response.status_code == 401, (method, path, who, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert "detail" in response.json()
        for role in ROLES:
            response = await call(api, method, path, body, api.auth(role))
            seen.append((path, role, response.status_code))
            if role in allowed:
                assert 200 <= response.status_code < 300, (method, path, role, response.text)
            else:
                assert response.status_code == 403, (method, path, role, response.text)
    # Every operation of the API is in the table (or public), so a new endpoint cannot skip this test.
    operations = {(m.upper(), path) for path, ops in api.app.openapi()["paths"].items() for m in ops}
    tabled = {(m, p.replace(ALICE_ALERT, "{alert_id}")) for m, p, _, _ in ENDPOINTS} | set(PUBLIC)
    assert operations - tabled == set()
    assert len(seen) == len(ENDPOINTS) * len(ROLES)


async def test_health_and_docs_need_no_token_and_docs_load_nothing_from_elsewhere(api: Api) -> None:
    for method, path in PUBLIC:
        response = await api.client.request(method, path)
        assert response.status_code == 200, (path, response.text)
    page = (await api.client.get("/docs")).text
    assert "/v1/alerts/{alert_id}/reassign" in page and "ReassignBody" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page


async def test_whoami_names_the_role_and_owner(api: Api) -> None:
    assert (await api.client.get("/v1/whoami", headers=api.auth("owner"))).json() == {"role": "owner", "owner": ALICE}
    assert (await api.client.get("/v1/whoami", headers=api.auth("ops"))).json() == {"role": "ops", "owner": None}


async def test_owner_never_reads_another_owners_alerts(api: Api) -> None:
    alice, elena = api.auth("owner"), api.auth("elena")
    listed = (await api.client.get("/v1/alerts", headers=alice)).json()["items"]
    assert [a["alert_id"] for a in listed] == [ALICE_ALERT]
    assert [a["alert_id"] for a in (await api.client.get("/v1/alerts", headers=elena)).json()["items"]] == [ELENA_ALERT]
    # Asking for another owner's list is refused; filters cannot widen it.
    assert (await api.client.get(f"/v1/alerts?owner={ELENA}", headers=alice)).status_code == 403
    assert (await api.client.get("/v1/alerts?action=control", headers=alice)).status_code == 403
    by_entity = await api.client.get("/v1/alerts?entity=account:acct-e1", headers=alice)
    assert by_entity.status_code == 200 and by_entity.json()["items"] == []
    # Another owner's alert does not exist, as far as an owner token can tell.
    response = await api.client.get(f"/v1/alerts/{ELENA_ALERT}", headers=alice)
    assert response.status_code == 404
    assert response.json() == (await api.client.get("/v1/alerts/al-no-such-alert", headers=alice)).json() | {
        "detail": f"no alert {ELENA_ALERT!r}"
    }
    # Their stats are theirs only.
    assert (await api.client.get(f"/v1/stats?owner={ELENA}", headers=alice)).status_code == 403
    rows = (await api.client.get("/v1/stats?by=owner", headers=alice)).json()["rows"]
    assert [r["owner"] for r in rows] == [ALICE]


@pytest.mark.parametrize(
    ("action", "body"),
    [
        ("ack", {}),
        ("intervene", {"action": "exec-call"}),
        ("outcome", {"result": "failure"}),
        ("reassign", {"owner": ALICE}),
    ],
)
async def test_owner_never_changes_another_owners_alert(api: Api, action: str, body: dict) -> None:
    from sqlalchemy import select
    from sqlmodel import Session

    from decision_router.tables import AlertRecord, AuditEvent

    response = await api.client.post(f"/v1/alerts/{ELENA_ALERT}/{action}", json=body, headers=api.auth("owner"))
    assert response.status_code == (403 if action == "reassign" else 404), response.text
    with Session(api.engine) as session:
        record = session.get(AlertRecord, ELENA_ALERT)
        assert record is not None
        assert (record.owner, record.acknowledged_at, record.intervened_at, record.outcome) == (ELENA, None, None, None)
        events = set(session.scalars(select(AuditEvent.type).where(AuditEvent.alert_id == ELENA_ALERT)))
        assert events <= {"routed", "delivered"}


async def test_owner_tokens_act_as_their_owner(api: Api) -> None:
    response = await api.client.post(f"/v1/alerts/{ALICE_ALERT}/ack", json={"actor": ELENA}, headers=api.auth("owner"))
    assert response.status_code == 403
    response = await api.client.post(f"/v1/alerts/{ALICE_ALERT}/ack", json={"note": "on it"}, headers=api.auth("owner"))
    assert response.status_code == 200
    acked = [e for e in response.json()["events"] if e["type"] == "acknowledged"]
    assert [(e["actor"], e["detail"].get("note")) for e in acked] == [(ALICE, "on it")]
    # The answer to an action is the alert's story as GET shows it to an owner: without the
    # sibling decisions of the same prediction (other owners' alerts, control records).
    assert "siblings" not in response.json()
    ops_view = await api.client.get(f"/v1/alerts/{ALICE_ALERT}", headers=api.auth("ops"))
    assert "siblings" in ops_view.json()


async def test_owner_does_not_see_held_out_control_records(api: Api, ruleset: RuleSet) -> None:
    from sqlmodel import Session

    from decision_router.tables import AlertRecord

    with Session(api.engine) as session:
        record = session.get(AlertRecord, ALICE_ALERT)
        record.held_out = True  # as if this decision had been drawn into the control group
        session.add(record)
        session.commit()
    alice = api.auth("owner")
    assert (await api.client.get("/v1/alerts", headers=alice)).json()["items"] == []
    assert (await api.client.get(f"/v1/alerts/{ALICE_ALERT}", headers=alice)).status_code == 404
    ops = (await api.client.get("/v1/alerts?action=control", headers=api.auth("ops"))).json()["items"]
    assert [a["alert_id"] for a in ops] == [ALICE_ALERT]


async def test_only_ops_and_admin_reassign_through_the_outcome_webhook_too(api: Api) -> None:
    from sqlmodel import Session

    from decision_router.tables import AlertRecord

    event = {"alert_id": ALICE_ALERT, "type": "reassigned", "owner": ELENA, "actor": "crm"}
    refused = await api.client.post("/v1/outcomes", json=event, headers=api.auth("publisher"))
    assert refused.status_code == 403, refused.text
    with Session(api.engine) as session:
        assert session.get(AlertRecord, ALICE_ALERT).owner == ALICE
    allowed = await api.client.post("/v1/outcomes", json=event, headers=api.auth("ops"))
    assert allowed.status_code == 200 and allowed.json()["applied"] == 1, allowed.text
    with Session(api.engine) as session:
        assert session.get(AlertRecord, ALICE_ALERT).owner == ELENA


# escalated alerts ---------------------------------------------------------------------------
# The rule gives 2h to acknowledge: a sweep 3h after routing escalates both alerts one step (Alice's
# to LEAD, Elena's to EMEA_LEAD), each with 2h more; a sweep after 5h, one step further (to DIRECTOR).


async def sweep(api: Api, after: timedelta) -> None:
    """The SLA sweep as it runs `after` the alerts were routed: the app's pipeline's clock moves there."""
    pipeline = api.app.state.pipeline
    at = datetime.now(UTC) + after
    pipeline.clock = lambda: at
    await EscalationSweeper(pipeline).sweep_once()


async def listed(api: Api, who: str, **params) -> list[str]:
    response = await api.client.get("/v1/alerts", params=params, headers=api.auth(who))
    assert response.status_code == 200, response.text
    return [a["alert_id"] for a in response.json()["items"]]


def escalation_levels(engine: Engine, alert_id: str) -> list[int]:
    with Session(engine) as session:
        return sorted(session.scalars(select(EscalationRecord.level).where(EscalationRecord.alert_id == alert_id)))


async def test_a_manager_acknowledges_an_alert_escalated_to_them_which_stops_that_escalation(api: Api) -> None:
    lead = api.auth("lead")
    assert (await api.client.get(f"/v1/alerts/{ALICE_ALERT}", headers=lead)).status_code == 404  # not theirs yet
    await sweep(api, timedelta(hours=3))
    detail = await api.client.get(f"/v1/alerts/{ALICE_ALERT}", headers=lead)
    assert detail.status_code == 200, detail.text
    assert (detail.json()["alert"]["owner"], detail.json()["alert"]["escalated_to"]) == (ALICE, LEAD)
    assert "siblings" not in detail.json()  # an owner token's view, as for the owner

    acked = await api.client.post(f"/v1/alerts/{ALICE_ALERT}/ack", json={"note": "calling them"}, headers=lead)
    assert acked.status_code == 200, acked.text
    assert [(e["actor"], e["detail"].get("note")) for e in acked.json()["events"] if e["type"] == "acknowledged"] == [
        (LEAD, "calling them")
    ]
    with Session(api.engine) as session:
        record = session.get(AlertRecord, ALICE_ALERT)
        assert (record.owner, record.acknowledged_at is not None, record.ack_due_at) == (ALICE, True, None)
    # Past the manager's own 2h too: nobody acknowledged Elena's, which went one step further; Alice's did not.
    await sweep(api, timedelta(hours=6))
    assert escalation_levels(api.engine, ALICE_ALERT) == [1]
    assert escalation_levels(api.engine, ELENA_ALERT) == [1, 2]


@pytest.mark.parametrize(
    ("action", "body", "event_type"),
    [
        ("ack", {}, "acknowledged"),
        ("intervene", {"action": "exec-call"}, "intervened"),
        ("outcome", {"result": "success"}, "outcome"),
    ],
)
async def test_a_manager_acts_on_an_escalated_alert_as_themselves_and_its_owner_stays_accountable(
    api: Api, action: str, body: dict, event_type: str
) -> None:
    await sweep(api, timedelta(hours=3))
    lead = api.auth("lead")
    as_alice = await api.client.post(f"/v1/alerts/{ALICE_ALERT}/{action}", json={**body, "actor": ALICE}, headers=lead)
    assert as_alice.status_code == 403, as_alice.text  # an owner token acts as its own owner only
    response = await api.client.post(f"/v1/alerts/{ALICE_ALERT}/{action}", json=body, headers=lead)
    assert response.status_code == 200, response.text
    with Session(api.engine) as session:
        assert session.get(AlertRecord, ALICE_ALERT).owner == ALICE
        actors = list(session.scalars(
            select(AuditEvent.actor).where(AuditEvent.alert_id == ALICE_ALERT, AuditEvent.type == event_type)
        ))
    assert actors == [LEAD]
    # Handing it to someone else stays with ops and admin.
    refused = await api.client.post(f"/v1/alerts/{ALICE_ALERT}/reassign", json={"owner": LEAD}, headers=lead)
    assert refused.status_code == 403


async def test_an_escalated_alert_is_seen_by_every_manager_it_reached_and_by_no_other_owner(api: Api) -> None:
    await sweep(api, timedelta(hours=3))
    await sweep(api, timedelta(hours=5, minutes=30))
    assert escalation_levels(api.engine, ALICE_ALERT) == [1, 2]  # to LEAD, then DIRECTOR
    for who in ("lead", "director"):
        response = await api.client.get(f"/v1/alerts/{ALICE_ALERT}", headers=api.auth(who))
        assert response.status_code == 200, (who, response.text)
    # Elena's went to EMEA_LEAD, then DIRECTOR too.
    assert await listed(api, "lead") == [ALICE_ALERT]
    assert await listed(api, "emea-lead") == [ELENA_ALERT]
    assert set(await listed(api, "director")) == {ALICE_ALERT, ELENA_ALERT}
    # Another owner, even a manager in another chain, still cannot tell the alert exists.
    missing = (await api.client.get("/v1/alerts/al-no-such-alert", headers=api.auth("emea-lead"))).json()
    for who, alert_id in (("emea-lead", ALICE_ALERT), ("elena", ALICE_ALERT), ("lead", ELENA_ALERT)):
        response = await api.client.get(f"/v1/alerts/{alert_id}", headers=api.auth(who))
        assert response.status_code == 404 and response.json() == missing | {"detail": f"no alert {alert_id!r}"}
        for action, body in (("ack", {}), ("intervene", {}), ("outcome", {"result": "failure"})):
            acted = await api.client.post(f"/v1/alerts/{alert_id}/{action}", json=body, headers=api.auth(who))
            assert acted.status_code == 404, (who, action, acted.text)
    with Session(api.engine) as session:
        for alert_id in (ALICE_ALERT, ELENA_ALERT):
            record = session.get(AlertRecord, alert_id)
            assert (record.acknowledged_at, record.intervened_at, record.outcome) == (None, None, None)
    # The owners' own lists are unchanged.
    assert await listed(api, "owner") == [ALICE_ALERT]
    assert await listed(api, "elena") == [ELENA_ALERT]


async def test_a_managers_list_has_their_own_alerts_and_those_escalated_to_them_filters_and_pages_apply(
    api: Api,
) -> None:
    await route(api.app, for_owner("l1", LEAD))  # routed after Alice's: newer
    lead_alert = alert_id_for("l1", RULE)
    assert await listed(api, "lead") == [lead_alert]
    await sweep(api, timedelta(hours=3))
    assert await listed(api, "lead") == [lead_alert, ALICE_ALERT]  # newest first
    assert await listed(api, "director") == [lead_alert]  # the manager's own alert went up their chain

    first = (await api.client.get("/v1/alerts?limit=1", headers=api.auth("lead"))).json()
    assert [a["alert_id"] for a in first["items"]] == [lead_alert] and first["next_cursor"]
    assert await listed(api, "lead", limit=1, cursor=first["next_cursor"]) == [ALICE_ALERT]
    assert await listed(api, "lead", entity="account:acct-a1") == [ALICE_ALERT]
    assert await listed(api, "lead", entity="account:acct-e1") == []
    assert await listed(api, "lead", rule="enterprise-churn-watch") == []
    assert await listed(api, "lead", owner=LEAD) == [lead_alert]  # `owner` is the accountable owner
    assert (await api.client.get(f"/v1/alerts?owner={ALICE}", headers=api.auth("lead"))).status_code == 403
    assert (await api.client.get("/v1/alerts?action=control", headers=api.auth("lead"))).status_code == 403
    await api.client.post(f"/v1/alerts/{ALICE_ALERT}/ack", headers=api.auth("lead"))
    assert await listed(api, "lead", state="open") == [lead_alert]
    assert await listed(api, "lead", state="acknowledged") == [ALICE_ALERT]

"""Access control on every endpoint: no token, a wrong token, a revoked token and each role;
and owner A never reading or changing owner B's alerts. Real Redis, SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy.engine import Engine

from decision_router.api.app import create_app
from decision_router.rules import RuleSet
from decision_router.settings import Settings
from decision_router.tokens import create_token, revoke_token
from decision_router.tracker import alert_id_for
from tests.integration.test_router_loop import prediction

pytestmark = pytest.mark.redis

ALICE, ELENA = "alice-moreau", "elena-petrova"
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

"""The dashboard's page, assets and JSON endpoints over HTTP (real Redis; SQLite and
PostgreSQL), on a store seeded through the pipeline. Access by role is covered with every
other endpoint in test_api_access.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router.api.app import create_app
from decision_router.pipeline import Pipeline
from decision_router.rules import RuleSet
from decision_router.settings import Settings
from decision_router.stats import compute_stats
from decision_router.tables import AlertRecord, EscalationRecord
from decision_router.tokens import create_token
from tests.browser.seed import MID, RISK, WATCH, Clock, seed

pytestmark = pytest.mark.redis


@dataclass
class Dashboard:
    client: httpx.AsyncClient
    headers: dict[str, dict[str, str]]  # "ops", "alice", "elena", "lead" (alice's manager)
    seeded: dict[str, list[str]]
    now: datetime


@pytest.fixture
async def dash(settings: Settings, ruleset: RuleSet, engine: Engine) -> AsyncIterator[Dashboard]:
    redis = Redis.from_url(settings.effective_redis_url)
    now = datetime.now(UTC)
    clock = Clock(now)
    seeded = await seed(Pipeline(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=clock), clock, now)
    app = create_app(settings, engine=engine, redis=redis, ruleset=ruleset)
    secrets = {
        "ops": create_token(engine, role="ops")[0],
        "alice": create_token(engine, role="owner", owner="alice-moreau", owners=ruleset.owners)[0],
        "elena": create_token(engine, role="owner", owner="elena-petrova", owners=ruleset.owners)[0],
        "lead": create_token(engine, role="owner", owner="lead-strategic", owners=ruleset.owners)[0],
    }
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://dashboard.test") as client:
        yield Dashboard(client, {k: {"Authorization": f"Bearer {v}"} for k, v in secrets.items()}, seeded, now)
    await redis.aclose()


async def test_page_and_assets_are_served_with_a_strict_content_security_policy(dash: Dashboard) -> None:
    page = await dash.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe" not in policy and "default-src 'none'" in policy
    assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere
    for name, kind in (("app.js", "text/javascript"), ("charts.js", "text/javascript"), ("app.css", "text/css")):
        asset = await dash.client.get(f"/assets/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
        assert "http://" not in asset.text.replace("http://www.w3.org/2000/svg", "")
    assert (await dash.client.get("/assets/index.html")).status_code == 404
    assert (await dash.client.get("/assets/..%2Fdashboard.py")).status_code == 404


async def test_ops_view_has_the_stats_figures_and_applies_its_filters(dash: Dashboard, engine: Engine) -> None:
    ops = dash.headers["ops"]
    body = (await dash.client.get("/v1/dashboard/ops", headers=ops)).json()
    with Session(engine) as session:
        stats = {row.key: row for row in compute_stats(session)}
    assert {row["rule"]: row["acknowledged"] for row in body["funnel"]} == {
        rule: stats[rule].acknowledged for rule in (WATCH, RISK, MID)}
    assert body["time_to_act"]["acted"] == sum(row.intervened for row in stats.values())
    assert body["rejections"]["total"] == 5 and body["filters"]["models"] == ["churn"]
    assert RISK in body["filters"]["rules"] and "payment-fraud-block" in body["filters"]["rules"]
    uplift = {row["rule"]: row for row in body["uplift"]}
    assert uplift[WATCH]["uplift"] == pytest.approx(stats[WATCH].uplift) and uplift[MID]["uplift"] is None

    one_rule = (await dash.client.get("/v1/dashboard/ops", headers=ops, params={"rule": RISK})).json()
    assert [row["rule"] for row in one_rule["funnel"]] == [RISK]
    assert one_rule["time_to_act"]["acted"] + one_rule["time_to_act"]["not_acted"] == stats[RISK].routed
    assert {row["owner"] for row in one_rule["sla"]} == {"alice-moreau", "elena-petrova"}

    other_model = (await dash.client.get("/v1/dashboard/ops", headers=ops, params={"model": "payment-fraud"})).json()
    assert other_model["funnel"] == [] and other_model["sla"] == [] and other_model["rejections"]["total"] == 0

    # The second day only: the high-risk alerts, and that day's two rejections.
    with Session(engine) as session:
        risk_created = session.get(AlertRecord, dash.seeded["owner_open"][0]).created_at
    since = risk_created.date().isoformat()
    later = (await dash.client.get("/v1/dashboard/ops", headers=ops, params={"since": since})).json()
    assert [row["rule"] for row in later["funnel"]] == [RISK]
    assert later["rejections"]["total"] == 2 and later["rejections"]["days"][0] == since


BAD_FILTERS = [
    ({"days": 7, "since": "7d"}, "days"), ({"since": "yesterday"}, "since"), ({"since": "2d", "until": "3d"}, "until"),
    ({"days": 0}, "days"), ({"days": "many"}, "days"),
]


async def test_bad_filters_are_a_422_naming_the_field(dash: Dashboard) -> None:
    for params, field in BAD_FILTERS:
        response = await dash.client.get("/v1/dashboard/ops", headers=dash.headers["ops"], params=params)
        assert response.status_code == 422, params
        assert any(field in error["loc"] for error in response.json()["detail"]), (params, response.json())


async def test_a_rule_or_model_filter_no_one_knows_is_a_422_with_the_close_match_as_in_stats(dash: Dashboard) -> None:
    """The ops view's rule and model filters were not checked: a typo drew an empty dashboard that reads as "no
    alerts". Checked as /v1/stats checks them (stats_filters), same words; blank is no filter."""
    ops = dash.headers["ops"]
    unseen = "the store has no prediction, decision or rejection of model 'chrun', and the rules do not name it"
    cases = [
        ({"rule": "enterprise-churn-rsk"}, "rule", "rule 'enterprise-churn-rsk' is not in the rules, and the store "
                                                   f"has no alerts for it; did you mean '{RISK}'?"),
        ({"model": "chrun"}, "model", f"{unseen}; did you mean 'churn'?"),
        ({"rule": RISK, "model": "chrun"}, "model", f"{unseen}; did you mean 'churn'?"),
    ]
    for params, name, message in cases:
        dashboard = await dash.client.get("/v1/dashboard/ops", headers=ops, params=params)
        stats = await dash.client.get("/v1/stats", headers=ops, params=params)
        assert dashboard.status_code == stats.status_code == 422, (params, dashboard.text)
        expected = [{"loc": ["query", name], "msg": message, "type": "value_error"}]
        assert dashboard.json()["detail"] == stats.json()["detail"] == expected
    everything = (await dash.client.get("/v1/dashboard/ops", headers=ops)).json()
    blank = await dash.client.get("/v1/dashboard/ops", headers=ops, params={"rule": "", "model": ""})
    assert blank.status_code == 200 and blank.json()["funnel"] == everything["funnel"], blank.text
    # A rule of the rules with no alerts yet is no error: an empty view, as /v1/stats answers no rows.
    quiet = await dash.client.get("/v1/dashboard/ops", headers=ops, params={"rule": "payment-fraud-block"})
    assert quiet.status_code == 200 and quiet.json()["funnel"] == [] and quiet.json()["sla"] == [], quiet.text


async def test_owner_view_lists_only_the_callers_open_alerts_with_context_and_deadlines(
    dash: Dashboard, engine: Engine
) -> None:
    alice = (await dash.client.get("/v1/dashboard/owner", headers=dash.headers["alice"])).json()
    assert alice["owner"] == "alice-moreau"
    assert {a["alert_id"] for a in alice["alerts"]} == set(dash.seeded["owner_open"])
    first = alice["alerts"][0]
    assert first["context"]["context.renewal_date"] == "2027-02-01" and first["ack_by"] and first["act_by"]
    # Unacknowledged high-risk alerts are past their 2h deadline and were escalated once.
    waiting = [a for a in alice["alerts"] if a["acknowledged_at"] is None]
    assert waiting and all(a["ack_overdue"] and a["escalation_level"] == 1 for a in waiting)
    elena = (await dash.client.get("/v1/dashboard/owner", headers=dash.headers["elena"])).json()
    with Session(engine) as session:
        owners = {session.get(AlertRecord, a["alert_id"]).owner for a in elena["alerts"]}
    assert owners == {"elena-petrova"}
    assert not any(a["escalated_to_me"] for a in alice["alerts"] + elena["alerts"])


async def test_owner_view_of_a_manager_adds_the_open_alerts_escalated_to_them_marked_as_someone_elses(
    dash: Dashboard, engine: Engine
) -> None:
    # The seed's sweep escalated alice's unacknowledged high-risk alerts to her manager, lead-strategic.
    with Session(engine) as session:
        escalated = dict(session.execute(
            select(EscalationRecord.alert_id, EscalationRecord.level)
            .join(AlertRecord, AlertRecord.alert_id == EscalationRecord.alert_id)
            .where(EscalationRecord.to_owner == "lead-strategic", AlertRecord.status == "open")
        ).all())
    assert escalated and set(escalated) <= set(dash.seeded["owner_open"])
    lead = (await dash.client.get("/v1/dashboard/owner", headers=dash.headers["lead"])).json()
    assert lead["owner"] == "lead-strategic"
    assert {a["alert_id"]: a["escalated_to_me_level"] for a in lead["alerts"]} == escalated
    assert all(a["owner"] == "alice-moreau" and a["escalated_to_me"] for a in lead["alerts"])
    # The manager acknowledges one from the view: it stays in both views, acknowledged by the manager.
    target = lead["alerts"][0]["alert_id"]
    acked = await dash.client.post(f"/v1/alerts/{target}/ack", headers=dash.headers["lead"])
    assert acked.status_code == 200, acked.text
    assert [e["actor"] for e in acked.json()["events"] if e["type"] == "acknowledged"] == ["lead-strategic"]
    for who in ("lead", "alice"):
        view = (await dash.client.get("/v1/dashboard/owner", headers=dash.headers[who])).json()
        [card] = [a for a in view["alerts"] if a["alert_id"] == target]
        assert card["acknowledged_at"] and card["escalated_to_me"] == (who == "lead")
    # Elena's manager is not alice's: none of alice's alerts, escalated or not, reach elena.
    elena = (await dash.client.get("/v1/dashboard/owner", headers=dash.headers["elena"])).json()
    assert not {a["alert_id"] for a in elena["alerts"]} & set(dash.seeded["owner_open"])
    # Reassigned to elena afterwards: the lead's card still says whom it came up from.
    other = lead["alerts"][-1]["alert_id"]
    moved = await dash.client.post(f"/v1/alerts/{other}/reassign", json={"owner": "elena-petrova"},
                                   headers=dash.headers["ops"])
    assert moved.status_code == 200, moved.text
    view = (await dash.client.get("/v1/dashboard/owner", headers=dash.headers["lead"])).json()
    [card] = [a for a in view["alerts"] if a["alert_id"] == other]
    assert (card["owner"], card["escalated_from"], card["escalated_to"]) == ("elena-petrova", "alice-moreau", None)


async def test_an_alert_reassigned_after_its_deadlines_passed_is_not_overdue_to_its_new_owner(
    dash: Dashboard, engine: Engine
) -> None:
    """The owner view and the ops view's SLA read the alert's first deadlines (ack_by, act_by): one of alice's
    alerts, escalated for its missed ack, handed to elena showed as overdue to her the moment she got it."""
    alice = (await dash.client.get("/v1/dashboard/owner", headers=dash.headers["alice"])).json()
    card = next(a for a in alice["alerts"] if a["acknowledged_at"] is None)
    assert card["ack_overdue"] and card["escalation_level"] == 1  # alice missed it: overdue for her
    ops = dash.headers["ops"]

    def sla_of(view: dict) -> dict[str, tuple[int, int]]:
        return {row["owner"]: (row["open"], row["overdue"]) for row in view["sla"]}

    before = sla_of((await dash.client.get("/v1/dashboard/ops", headers=ops)).json())
    moved = await dash.client.post(f"/v1/alerts/{card['alert_id']}/reassign", json={"owner": "elena-petrova"},
                                   headers=ops)
    assert moved.status_code == 200, moved.text
    fresh = moved.json()["alert"]
    elena = (await dash.client.get("/v1/dashboard/owner", headers=dash.headers["elena"])).json()
    [mine] = [a for a in elena["alerts"] if a["alert_id"] == card["alert_id"]]
    assert (mine["ack_overdue"], mine["act_overdue"]) == (False, False)
    # Her deadlines are shown as GET /v1/alerts/{id} has them; ack_by / act_by stay the alert's first ones.
    assert (mine["ack_due_at"], mine["act_due_at"]) == (fresh["ack_due_at"], fresh["act_due_at"])
    assert (mine["ack_by"], mine["act_by"]) == (card["ack_by"], card["act_by"]) and mine["ack_by"] < dash.now.isoformat()
    after = sla_of((await dash.client.get("/v1/dashboard/ops", headers=ops)).json())
    # One more open alert for elena, none more overdue; alice has one fewer of each.
    assert after["elena-petrova"] == (before["elena-petrova"][0] + 1, before["elena-petrova"][1])
    assert after["alice-moreau"] == (before["alice-moreau"][0] - 1, before["alice-moreau"][1] - 1)

"""The HTTP API's alert listing filters and the owner view's choice of alerts, through the API's ASGI client on a
SQLite store (on fakeredis: these reads never touch Redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fakeredis.aioredis import FakeRedis
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router.api.app import create_app
from decision_router.rules import load_rules
from decision_router.settings import Settings
from decision_router.store import create_schema, make_engine
from decision_router.tables import AlertRecord
from decision_router.tokens import create_token
from tests.unit.test_stats import T0, alert

RULES = load_rules(Path(__file__).resolve().parents[2] / "rules")
ALICE = "alice-moreau"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    store = make_engine(f"sqlite:///{tmp_path / 'store.db'}")  # a file: the API reads it from worker threads
    create_schema(store)
    yield store
    store.dispose()


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    redis = FakeRedis()
    app = create_app(Settings(), engine=engine, redis=redis, ruleset=RULES)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as http:
        yield http
    await redis.aclose()


def store(engine: Engine, *records: AlertRecord) -> None:
    with Session(engine) as session:
        session.add_all(records)
        session.commit()


def bearer(engine: Engine, role: str, owner: str | None = None) -> dict[str, str]:
    secret, _ = create_token(engine, role=role, owner=owner, owners=RULES.owners if owner else None)
    return {"Authorization": f"Bearer {secret}"}


async def listed(client: httpx.AsyncClient, headers: dict[str, str], **params: str) -> list[str]:
    response = await client.get("/v1/alerts", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return [item["alert_id"] for item in response.json()["items"]]


async def test_a_blank_state_or_action_is_no_filter_as_a_blank_owner_rule_or_model_is(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    """`?state=&action=` (a script's unset variables, a form's empty fields) was a 422 while `?owner=&rule=` listed
    everything: each blank filter now means no filter, for ops and owner tokens alike."""
    store(
        engine,
        alert(1, rule="r", owner=ALICE),
        alert(2, rule="r", owner=ALICE, ack=True, created=T0 + timedelta(hours=1)),
        alert(3, rule="r", owner=ALICE, outcome="success", created=T0 + timedelta(hours=2)),
        alert(4, rule="r", owner=ALICE, action="record", created=T0 + timedelta(hours=3)),
    )
    for headers in (bearer(engine, "ops"), bearer(engine, "owner", ALICE)):
        everything = await listed(client, headers)
        assert everything  # an owner token sees its delivered alerts (not the record-only one)
        for blank in ({"state": ""}, {"action": ""}, {"state": "", "action": "", "owner": "", "rule": ""}):
            assert await listed(client, headers, **blank) == everything, blank
    ops = bearer(engine, "ops")
    assert await listed(client, ops) == ["al-r-4", "al-r-3", "al-r-2", "al-r-1"]
    # A value still filters.
    assert await listed(client, ops, state="acknowledged") == ["al-r-2"]
    assert await listed(client, ops, action="record", state="") == ["al-r-4"]


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("state", "sleeping", ["'open'", "'acknowledged'", "'intervened'", "'closed'"]),
        ("state", " ", ["'open'"]),  # only an empty value is blank; a space is a typo
        ("action", "alerts", ["'alert'", "'record'", "'control'", "'suppressed'"]),
    ],
)
async def test_a_state_or_action_not_in_its_set_is_a_422_naming_the_allowed_values(
    client: httpx.AsyncClient, engine: Engine, field: str, value: str, allowed: list[str]
) -> None:
    response = await client.get("/v1/alerts", params={field: value}, headers=bearer(engine, "ops"))
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", field]
    assert all(name in error["msg"] for name in allowed), error["msg"]


async def test_the_owner_view_holds_the_most_urgent_open_alerts_not_the_oldest(client: httpx.AsyncClient, engine: Engine) -> None:
    """The view lists at most 500 alerts. It read the 500 oldest and sorted those by deadline: with 501 open,
    the newest one was left out even when its deadline came first."""
    # Acknowledged, so due to be acted on: from T0 + 2 days on.
    old = [alert(n, rule="r", owner=ALICE, ack=True, created=T0 + timedelta(minutes=n)) for n in range(500)]
    # Newer, not acknowledged: due to be acknowledged at T0 + 1 day 4 hours, before any of them.
    urgent = alert(500, rule="r", owner=ALICE, created=T0 + timedelta(days=1))
    store(engine, *old, urgent)
    response = await client.get("/v1/dashboard/owner", headers=bearer(engine, "owner", ALICE))
    assert response.status_code == 200, response.text
    alerts = [item["alert_id"] for item in response.json()["alerts"]]
    assert len(alerts) == 500
    assert alerts[:3] == ["al-r-500", "al-r-0", "al-r-1"]  # the nearest deadline first, then creation
    assert "al-r-499" not in alerts  # the least urgent one gives way

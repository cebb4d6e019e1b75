"""The API's view of an alert shows deadlines only while they are pending: an open alert's. Stores
written before stop 15 kept the due times of alerts an outcome had closed."""

from __future__ import annotations

from datetime import timedelta

from decision_router.api.routes_alerts import alert_view
from decision_router.tables import AlertRecord
from tests.unit.test_cooldown_plan import NOW, _alert


def _record(status: str) -> AlertRecord:
    row = {**_alert(1, rule="churn-high", entity="a", minutes_ago=10), "status": status,
           "ack_due_at": NOW + timedelta(hours=2), "act_due_at": NOW + timedelta(days=2)}
    return AlertRecord(**row)


def test_an_open_alert_shows_its_deadlines() -> None:
    view = alert_view(_record("open"))
    assert view["ack_due_at"] == (NOW + timedelta(hours=2)).isoformat().replace("+00:00", "Z")
    assert view["act_due_at"] == (NOW + timedelta(days=2)).isoformat().replace("+00:00", "Z")


def test_a_closed_alert_shows_none_even_if_an_older_store_kept_them() -> None:
    view = alert_view(_record("closed"))
    assert view["ack_due_at"] is None and view["act_due_at"] is None

"""The hot path's "delivered" mark and cooldown claim run through the driver (SQLAlchemy's own work per
parameter cost more than the database's): the same SQL as SQLAlchemy renders for its statements, and
the same values stored, byte for byte, as SQLAlchemy's execution of them stores."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router import cooldowns, tracker
from decision_router.rules import RuleSet

from .test_bulk_insert import alert_rows

NOW = datetime(2026, 11, 25, 20, 0, 0, 123456, tzinfo=UTC)
# Not UTC: the driver's path must store the instant as SQLAlchemy does (on SQLite, its wall-clock fields).
PARIS_NOW = NOW.astimezone(timezone(timedelta(hours=1)))


@contextmanager
def statements_sqlalchemy_runs(engine: Engine) -> Iterator[list[tuple[str, object]]]:
    seen: list[tuple[str, object]] = []

    def record(_conn, _cursor, statement, parameters, _context, _many) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def positional(statement: str) -> str:
    """PostgreSQL's named placeholders (psycopg's pyformat) as the driver path's positional ones."""
    return re.sub(r"%\(\w+\)s", "%s", statement)


def raw_rows(session: Session, query: str) -> list[tuple]:
    # text(): no result processing, so SQLite's stored text is compared as stored.
    return [tuple(row) for row in session.execute(text(query))]


def test_the_mark_and_the_claim_do_not_go_through_sqlalchemy(engine: Engine, ruleset: RuleSet) -> None:
    rule = next(r for r in ruleset.rules if r.cooldown is not None)
    with Session(engine) as session:
        tracker.bulk_insert(session, tracker._ALERTS, alert_rows("drv"))
        session.commit()
    with Session(engine) as session, statements_sqlalchemy_runs(engine) as seen:
        assert tracker.mark_delivered(session, {"al-drv-0": "o", "al-drv-1": "o"}, channel="inbox", now=NOW) == [
            "al-drv-0", "al-drv-1"]
        cooldowns.claim(session, {(rule.name, "account", "acct-1"): "al-drv-1"}, ruleset=ruleset, now=NOW)
        session.commit()
    assert not [s for s, _ in seen if s.startswith(("UPDATE alerts", "INSERT INTO cooldowns"))], seen


def test_mark_delivered_runs_and_stores_what_sqlalchemy_does(engine: Engine) -> None:
    with Session(engine) as session:
        tracker.bulk_insert(session, tracker._ALERTS, alert_rows("ref") + alert_rows("drv"))
        session.commit()
    # The third alert was reassigned away from "o": neither path marks it.
    ref = {"al-ref-0": "o", "al-ref-1": "o", "al-ref-2": "someone-else"}
    drv = {key.replace("ref", "drv"): owner for key, owner in ref.items()}
    with Session(engine) as session, statements_sqlalchemy_runs(engine) as seen:
        reference = session.execute(tracker._MARK_DELIVERED, {
            "alert_ids": list(ref), "alerts_and_owners": list(ref.items()), "now": PARIS_NOW}).all()
        session.commit()
    [(statement, _)] = seen
    dialect = engine.dialect.name
    assert tracker._mark_delivered_sql(dialect, len(ref)) == positional(statement)
    with Session(engine) as session:
        changed = tracker._mark_delivered_by_driver(session.connection(), dialect, drv, PARIS_NOW)
        session.commit()
    assert sorted(changed) == sorted((a.replace("ref", "drv"), p.replace("ref", "drv")) for a, p in reference)
    assert len(changed) == 2
    with Session(engine) as session:
        stored = raw_rows(session, "select alert_id, delivered_at from alerts order by alert_id")
    by_tag = {tag: [(a.replace(tag, "x"), at) for a, at in stored if f"-{tag}-" in a] for tag in ("ref", "drv")}
    assert by_tag["drv"] == by_tag["ref"]
    assert [at is not None for _, at in by_tag["drv"]] == [True, True, False]


def test_the_claim_runs_and_stores_what_sqlalchemy_does(engine: Engine, ruleset: RuleSet) -> None:
    rules = [r for r in ruleset.rules if r.cooldown is not None][:2]
    assert len(rules) == 2
    lengths = {r.name: r.cooldown for r in rules}

    def started(tag: str) -> dict[tuple[str, str, str], str]:
        return {(r.name, "account", f"{tag}-{n}"): f"al-{tag}-{n}-{r.name}" for r in rules for n in range(3)}

    ref_rows = []
    for (rule, entity_type, entity_id), alert_id in sorted(started("ref").items()):
        ref_rows.append({"rule": rule, "entity_type": entity_type, "entity_id": entity_id, "alert_id": alert_id,
                         "started_at": PARIS_NOW, "ends_at": PARIS_NOW + lengths[rule]})
    with Session(engine) as session, statements_sqlalchemy_runs(engine) as seen:
        won_ref = set(session.execute(cooldowns._claim_statement(engine.dialect.name), ref_rows).all())
        session.commit()
    [(statement, _)] = seen
    assert cooldowns._claim_sql(engine.dialect, len(ref_rows)) == positional(statement)
    with Session(engine) as session:
        cooldowns.claim(session, started("drv"), ruleset=ruleset, now=PARIS_NOW)
        session.commit()
    assert len(won_ref) == 6
    with Session(engine) as session:
        stored = raw_rows(session, "select entity_id, rule, alert_id, started_at, ends_at from cooldowns"
                                   " order by entity_id, rule")
    by_tag = {tag: [tuple(v.replace(tag, "x") if isinstance(v, str) else v for v in row)
                    for row in stored if row[0].startswith(f"{tag}-")] for tag in ("ref", "drv")}
    assert len(by_tag["drv"]) == 6
    assert by_tag["drv"] == by_tag["ref"]
    # A window still open is not taken: ClaimLost, as before.
    with Session(engine) as session, pytest.raises(cooldowns.ClaimLost):
        cooldowns.claim(session, {(rules[0].name, "account", "drv-0"): "another"}, ruleset=ruleset,
                        now=PARIS_NOW + timedelta(seconds=1))

"""Ended cooldown windows are pruned (cooldowns.prune_ended, run by `serve`), on both stores: only
windows that ended more than PRUNE_AFTER ago go, no decision changes, and a window a claim
starts on a row while the prune runs is kept."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router import cooldowns
from decision_router.rules import RuleSet, load_rules
from decision_router.service import running_service
from decision_router.tables import CooldownRecord
from tests.integration.conftest import ManualClock, wait_until

T0 = datetime(2026, 11, 26, 12, tzinfo=UTC)
HOUR = timedelta(hours=1)
ROUTING = """
rules:
  - {name: churn-high, when: {model: churn}, owner: am, cooldown: 1h}
  - {name: rest, when: {}, owner: am, action: record}
"""
OWNERS = "owners:\n  - {id: am, name: Account Manager}\n"
COOLDOWNS = CooldownRecord.__table__  # type: ignore[attr-defined]


def rules(tmp_path: Path) -> RuleSet:
    directory = tmp_path / "rules"
    directory.mkdir(exist_ok=True)
    (directory / "routing.yaml").write_text(ROUTING)
    (directory / "owners.yaml").write_text(OWNERS)
    return load_rules(directory)


def window(entity: str, ends_at: datetime, rule: str = "churn-high") -> dict:
    return {"entity_id": entity, "entity_type": "account", "rule": rule, "alert_id": f"alert-{entity}",
            "started_at": ends_at - HOUR, "ends_at": ends_at}


def stored(engine: Engine) -> dict[str, str]:
    with Session(engine) as session:
        return dict(session.execute(select(COOLDOWNS.c.entity_id, COOLDOWNS.c.alert_id)).all())


def test_only_windows_ended_past_the_margin_are_pruned_in_chunks(engine: Engine) -> None:
    old = [window(f"old-{n}", T0 - cooldowns.PRUNE_AFTER - timedelta(seconds=1 + n)) for n in range(2500)]
    kept = [window("open", T0 + HOUR), window("just-ended", T0 - timedelta(minutes=5)),
            window("at-the-margin", T0 - cooldowns.PRUNE_AFTER)]
    with Session(engine) as session:
        session.execute(insert(COOLDOWNS), old + kept)
        session.commit()
    assert cooldowns.prune_ended(engine, now=T0, chunk=1000) == 2500  # three chunks, the last short
    assert sorted(stored(engine)) == ["at-the-margin", "just-ended", "open"]
    assert cooldowns.prune_ended(engine, now=T0) == 0


def test_pruning_changes_no_decision(engine: Engine, tmp_path: Path) -> None:
    ruleset = rules(tmp_path)
    keys = [("churn-high", "account", f"acct-{n}") for n in range(3)]
    with Session(engine) as session:
        cooldowns.claim(session, {key: f"first-{key[2]}" for key in keys}, ruleset=ruleset, now=T0)
        session.commit()
    later = T0 + HOUR + cooldowns.PRUNE_AFTER + timedelta(minutes=1)  # every window ended, past the margin
    since = {"churn-high": later - HOUR}
    for now in (T0 + timedelta(minutes=30), later):
        with Session(engine) as session:
            before = cooldowns.holders(session, keys, since=since, now=now)
        cooldowns.prune_ended(engine, now=now)
        with Session(engine) as session:
            assert cooldowns.holders(session, keys, since=since, now=now) == before
    assert stored(engine) == {}
    with Session(engine) as session:  # a new window on each key is claimed as on a key never seen
        cooldowns.claim(session, {key: f"second-{key[2]}" for key in keys}, ruleset=ruleset, now=later)
        session.commit()
    assert stored(engine) == {f"acct-{n}": f"second-acct-{n}" for n in range(3)}


@pytest.mark.postgres
def test_a_window_claimed_while_the_prune_waits_for_its_row_is_kept(pg_engine: Engine, tmp_path: Path) -> None:
    """PostgreSQL: the prune chose the ended row, then waits for the claim's row lock; after the
    claim commits, the row holds a new window, and the prune must see that rather than delete it."""
    ruleset = rules(tmp_path)
    ended = T0 - cooldowns.PRUNE_AFTER - HOUR
    with Session(pg_engine) as session:
        session.execute(insert(COOLDOWNS), [window("acct-1", ended)])
        session.commit()
    claimer = Session(pg_engine)
    cooldowns.claim(claimer, {("churn-high", "account", "acct-1"): "new-window"}, ruleset=ruleset, now=T0)
    pruned: list[int] = []
    prune = threading.Thread(target=lambda: pruned.append(cooldowns.prune_ended(pg_engine, now=T0)))
    prune.start()
    try:
        deadline = time.monotonic() + 30
        with pg_engine.connect() as watcher:
            while True:
                waiting = watcher.execute(text(
                    "select count(*) from pg_stat_activity"
                    " where wait_event_type = 'Lock' and query like 'DELETE FROM cooldowns%'"
                )).scalar()
                # PostgreSQL reads pg_stat_activity once per transaction: in the same one, a poll made before
                # the prune began to wait would never see it wait (the test failed so, 2 runs in 5).
                watcher.rollback()
                if waiting:
                    break
                assert time.monotonic() < deadline, "the prune never waited for the claimed row"
                time.sleep(0.02)
    finally:
        claimer.commit()
        claimer.close()
        prune.join(timeout=30)
    assert pruned == [0]
    assert stored(pg_engine) == {"acct-1": "new-window"}


async def test_serve_prunes_ended_windows(settings, engine: Engine, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cooldowns, "PRUNE_INTERVAL_S", 0.05)
    with Session(engine) as session:
        session.execute(insert(COOLDOWNS), [window("ended", T0 - cooldowns.PRUNE_AFTER - HOUR),
                                            window("open", T0 + HOUR)])
        session.commit()
    async with running_service(settings, rules(tmp_path), engine, clock=ManualClock(T0)):
        await wait_until(lambda: sorted(stored(engine)) == ["open"], what="the ended window to be pruned")

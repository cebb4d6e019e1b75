"""PostgreSQL's running counts of the decisions (decision_router/tallies.py) are the alerts' own counts
after every kind of write, on a new store and an older one, folded or not, and `stats --by rule` over
everything reads them.

The expected counts are tallied here in Python from the rows read back, not by the triggers' SQL.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router import tallies, tracker
from decision_router.stats import GroupBy, compute_stats, compute_stats_reference
from decision_router.store import create_schema, schema_is_current
from decision_router.tables import AlertRecord
from tests.unit.test_stats_sql import HOLDOUTS, as_rows, load, random_alerts

pytestmark = pytest.mark.postgres
COUNTS = ("n", "escalations", "ack_breaches", "act_breaches", "acks", "acts")


@pytest.fixture
def engine(pg_engine: Engine) -> Engine:
    return pg_engine


def counted(engine: Engine) -> dict[tuple, tuple]:
    """What the tallies should say: per (rule, held out, action, outcome, live) group, from the rows."""
    sums: dict[tuple, Counter] = {}
    with Session(engine) as session:
        for a in session.execute(select(AlertRecord)).scalars():
            key = (a.rule, a.held_out, a.action, a.outcome or None, not a.suppressed_by)
            group = sums.setdefault(key, Counter())
            group.update(n=1, escalations=a.escalation_level, ack_breaches=a.ack_breached_at is not None,
                         act_breaches=a.act_breached_at is not None, acks=a.acknowledged_at is not None,
                         acts=a.intervened_at is not None)
    return {key: _values(c) for key, c in sums.items()}


def _values(c: Any) -> tuple:
    return tuple(int(c[name]) for name in COUNTS)


def tallied(engine: Engine) -> dict[tuple, tuple]:
    with engine.connect() as connection:
        return {(r.k, bool(r.held_out), r.action, r.outcome, bool(r.live)): _values(r._asdict())
                for r in tallies.read_tallies(connection)}


def tally_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(text(f"select count(*) from {tallies.TABLE}")).scalar_one()


def alert_row(record: AlertRecord) -> dict:
    return {column.name: getattr(record, column.name) for column in AlertRecord.__table__.columns}


def update(engine: Engine, statement: str, **params: Any) -> None:
    with engine.begin() as connection:
        connection.execute(text(statement), params)


def drop_trigger(engine: Engine, name: str) -> None:
    update(engine, f"drop trigger {name} on alerts")


@contextmanager
def a_role(pg_engine: Engine, *, every_table: bool) -> Iterator[tuple[str, str]]:
    """A login role (name, schema) that may use the store's schema and read and write its alerts, or
    every table of it; dropped after."""
    role = f"dr_role_{uuid.uuid4().hex[:8]}"
    with pg_engine.begin() as connection:
        schema = connection.execute(text("select current_schema()")).scalar()
        connection.execute(text(f'create role "{role}" login'))
        connection.execute(text(f'grant usage on schema "{schema}" to "{role}"'))
        tables = f'all tables in schema "{schema}"' if every_table else "alerts"
        connection.execute(text(f'grant select, insert, update, delete on {tables} to "{role}"'))
    try:
        yield role, schema
    finally:
        with pg_engine.begin() as connection:
            connection.execute(text(f'drop owned by "{role}"'))
            connection.execute(text(f'drop role "{role}"'))


def test_the_tallies_are_the_alerts_counts_after_every_kind_of_write(engine: Engine) -> None:
    with engine.connect() as connection:
        assert tallies.tallies_installed(connection)
    alerts = random_alerts(21, 300)
    moment = alerts[0].created_at
    with Session(engine) as session:  # the router's COPY: one statement, its new rows counted together
        tracker.bulk_insert(session, AlertRecord.__table__, [alert_row(a) for a in alerts[:200]])
        session.commit()
    load(engine, alerts[200:])  # the ORM's INSERT
    assert tallied(engine) == counted(engine)
    steps = [
        "update alerts set acknowledged_at = :t where acknowledged_at is null and alert_id like '%1'",
        "update alerts set intervened_at = :t where intervened_at is null and alert_id like '%2'",
        "update alerts set acknowledged_at = null where alert_id like '%3'",
        "update alerts set outcome = 'success' where alert_id like '%4'",
        "update alerts set outcome = null where alert_id like '%5'",
        "update alerts set escalation_level = escalation_level + 1 where alert_id like '%6'",
        "update alerts set ack_breached_at = :t where ack_breached_at is null and alert_id like '%7'",
        "update alerts set act_breached_at = null where alert_id like '%8'",
        "update alerts set suppressed_by = 'al-x' where alert_id like '%9'",
        "update alerts set suppressed_by = '' where alert_id like '%10'",
        "update alerts set held_out = not held_out where alert_id like '%11'",
        "update alerts set action = 'record' where alert_id like '%12'",
        "update alerts set rule = 'renamed' where alert_id like '%13'",
        "update alerts set outcome = '' where alert_id like '%15'",  # as no outcome
        "update alerts set delivered_at = :t, owner = 'carol', status = 'closed'",  # counts nothing
        "delete from alerts where alert_id like '%14'",
        "delete from alerts where alert_id like '%0'",
    ]
    for step in steps:
        update(engine, step, **({"t": moment} if ":t" in step else {}))
        assert tallied(engine) == counted(engine), step
    with Session(engine) as session:
        expected = compute_stats_reference(session, by=GroupBy.RULE, holdouts=HOLDOUTS)
        got = compute_stats(session, by=GroupBy.RULE, holdouts=HOLDOUTS)
    assert as_rows(got, GroupBy.RULE) == as_rows(expected, GroupBy.RULE)
    update(engine, "truncate alerts")
    assert tallied(engine) == {} == counted(engine)


def test_a_rolled_back_write_counts_nothing(engine: Engine) -> None:
    load(engine, random_alerts(22, 50))
    before = tallied(engine)
    with Session(engine) as session:
        session.execute(text("update alerts set outcome = 'success'"))
        tracker.bulk_insert(session, AlertRecord.__table__, [alert_row(a) for a in random_alerts(23, 20)])
        session.rollback()
    assert tallied(engine) == before == counted(engine)


def test_marking_delivered_appends_nothing(engine: Engine) -> None:
    # The hot path's second transaction marks the batch delivered: the update trigger must not run for it.
    alerts = random_alerts(24, 50)
    moment = alerts[0].created_at
    load(engine, alerts)
    rows = tally_rows(engine)
    update(engine, "update alerts set delivered_at = :t", t=moment)
    assert tally_rows(engine) == rows
    update(engine, "update alerts set acknowledged_at = :t where acknowledged_at is null", t=moment)
    assert tally_rows(engine) > rows


def test_stats_by_rule_over_every_alert_read_the_tallies(engine: Engine) -> None:
    load(engine, random_alerts(25, 200))
    with Session(engine) as session:
        before = {row.key: row.routed for row in compute_stats(session, by=GroupBy.RULE)}
        windowed = as_rows(compute_stats(session, by=GroupBy.RULE, since=_start(session)), GroupBy.RULE)
    rule = next(iter(before))
    # A count that no alert has: only a read of the tallies can report it.
    update(engine, f"insert into {tallies.TABLE} (rule, held_out, action, outcome, live, {', '.join(COUNTS)})"
           " values (:rule, :no, 'alert', '', :yes, 5, 0, 0, 0, 0, 0)", rule=rule, no=False, yes=True)
    with Session(engine) as session:
        after = {row.key: row.routed for row in compute_stats(session, by=GroupBy.RULE)}
        (only,) = compute_stats(session, by=GroupBy.RULE, rule=rule)
        assert as_rows(compute_stats(session, by=GroupBy.RULE, since=_start(session)), GroupBy.RULE) == windowed
    assert after == before | {rule: before[rule] + 5}
    assert only.routed == before[rule] + 5


def _start(session: Session) -> Any:
    return session.execute(select(AlertRecord.created_at).order_by(AlertRecord.created_at)).scalars().first() \
        - timedelta(seconds=1)


def test_an_older_store_gets_its_alerts_counted(engine: Engine) -> None:
    load(engine, random_alerts(26, 300))
    for trigger in tallies.TRIGGERS:  # a store from before the tallies
        drop_trigger(engine, trigger)
    update(engine, f"drop table {tallies.TABLE}")
    assert not schema_is_current(engine)
    load(engine, random_alerts(27, 50))  # written meanwhile, not counted by any trigger
    create_schema(engine)
    assert schema_is_current(engine)
    assert tallied(engine) == counted(engine)


def test_counts_left_without_their_triggers_are_started_over(engine: Engine) -> None:
    load(engine, random_alerts(28, 100))
    drop_trigger(engine, tallies.TRIGGERS[1])  # the triggers went (a dropped alerts table, say); the counts stayed
    assert not schema_is_current(engine)
    load(engine, random_alerts(29, 50))
    create_schema(engine)
    assert tallied(engine) == counted(engine)


def test_triggers_of_another_version_are_replaced(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    load(engine, random_alerts(34, 100))
    monkeypatch.setattr(tallies, "FUNCTION", "alert_tallies_add_v0")
    assert not schema_is_current(engine)  # the triggers there are of "v1"
    load(engine, random_alerts(35, 20))
    create_schema(engine)
    assert schema_is_current(engine)
    assert tallied(engine) == counted(engine)


def test_workers_starting_together_count_the_alerts_once(engine: Engine) -> None:
    load(engine, random_alerts(30, 200))
    drop_trigger(engine, tallies.TRIGGERS[0])
    errors: list[BaseException] = []

    def start() -> None:
        try:
            create_schema(engine)
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    workers = [threading.Thread(target=start) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert tallied(engine) == counted(engine)


def test_folding_keeps_the_sums(engine: Engine) -> None:
    for seed in range(40, 46):  # many statements: many appended rows
        load(engine, random_alerts(seed, 60))
    update(engine, "update alerts set outcome = 'success' where alert_id like '%2'")
    appended = tally_rows(engine)
    assert tallies.fold_tallies(engine, at_rows=appended) == 0  # not past the threshold
    expected = counted(engine)
    assert tallies.fold_tallies(engine, at_rows=0) == appended
    assert tallied(engine) == expected
    assert tally_rows(engine) == len(expected) < appended / 2


async def test_serve_folds_the_tallies(engine: Engine, settings: Any, ruleset: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from decision_router.service import running_service
    from tests.integration.conftest import wait_until

    monkeypatch.setattr(tallies, "FOLD_INTERVAL_S", 0.05)
    monkeypatch.setattr(tallies, "FOLD_AT_ROWS", 10)
    for seed in range(50, 55):
        load(engine, random_alerts(seed, 40))
    expected = counted(engine)
    async with running_service(settings, ruleset, engine):
        # Waited for, not polled a fixed 100 times (5 s): a busy machine may start the fold job later.
        await wait_until(lambda: tally_rows(engine) <= len(expected), what="serve to fold the tallies")
    assert tally_rows(engine) <= len(expected)
    assert tallied(engine) == expected


def test_folding_loses_no_write_made_meanwhile(pg_engine: Engine) -> None:
    for seed in range(40, 44):
        load(pg_engine, random_alerts(seed, 60))
    appended, before = tally_rows(pg_engine), counted(pg_engine)
    writer = pg_engine.connect()
    try:  # a write whose transaction is open while the fold runs
        writer.execute(text("update alerts set acknowledged_at = null where alert_id like '%3'"))
        assert tallies.fold_tallies(pg_engine, at_rows=0) == appended
        assert tallied(pg_engine) == before
        writer.commit()
    finally:
        writer.close()
    assert tallied(pg_engine) == counted(pg_engine) != before


def test_writers_of_one_group_never_wait_for_each_other(pg_engine: Engine) -> None:
    # Differences are appended, not added to a shared row: two transactions that change alerts of the
    # same groups, in opposite orders (an outcome batch and the SLA sweep, say), neither wait nor
    # deadlock; nor does the router's COPY wait for either.
    alerts = random_alerts(31, 5)
    for alert in alerts:
        alert.rule, alert.held_out, alert.action, alert.suppressed_by = "watch", False, "alert", None
        alert.acknowledged_at = alert.intervened_at = alert.outcome = None
    alerts[1].rule = alerts[3].rule = "other"
    ids, inserted = [alert.alert_id for alert in alerts], alert_row(alerts[2])
    load(pg_engine, alerts[:2] + alerts[3:])
    first, second = pg_engine.connect(), pg_engine.connect()
    ack = text("update alerts set acknowledged_at = created_at where alert_id = :id")
    try:
        for connection in (first, second):
            connection.execute(text("set lock_timeout = '2s'"))
        first.execute(ack, {"id": ids[0]})  # watch, then other
        second.execute(ack, {"id": ids[4]})  # watch too, then other
        second.execute(ack, {"id": ids[3]})
        first.execute(ack, {"id": ids[1]})
        with Session(bind=second) as session:  # the router's COPY, same group
            tracker.bulk_insert(session, AlertRecord.__table__, [inserted])
        second.commit()
        first.commit()
    finally:
        first.close()
        second.close()
    assert tallied(pg_engine) == counted(pg_engine)
    assert counted(pg_engine)[("watch", False, "alert", None, True)][4] == 2  # acks


def test_disabled_triggers_are_not_trusted(pg_engine: Engine) -> None:
    update(pg_engine, f"alter table alerts disable trigger {tallies.TRIGGERS[1]}")
    with pg_engine.connect() as connection:
        assert not tallies.tallies_installed(connection)
    assert not schema_is_current(pg_engine)
    load(pg_engine, random_alerts(32, 50))
    update(pg_engine, "update alerts set outcome = 'failure'")  # not counted
    create_schema(pg_engine)
    assert tallied(pg_engine) == counted(pg_engine)


def test_a_role_without_rights_on_the_tallies_writes_folds_and_reads_stats(pg_engine: Engine) -> None:
    # The trigger and the fold run as their owner: a writer, or serve, needs rights on alerts only. A
    # reader that cannot read the tallies gets the stats from the alerts.
    with a_role(pg_engine, every_table=False) as (role, _schema):
        alerts = random_alerts(33, 80)
        with Session(pg_engine) as session:
            session.execute(text(f'set local role "{role}"'))  # this transaction only
            assert not tallies.tallies_installed(session)
            session.add_all(alerts)
            session.flush()
            session.execute(text("update alerts set outcome = 'success' where alert_id like '%1'"))
            expected = compute_stats_reference(session, by=GroupBy.RULE, holdouts=HOLDOUTS)
            got = compute_stats(session, by=GroupBy.RULE, holdouts=HOLDOUTS)
            assert tallies.tallies_installed(session, readable=False)
            # What serve's fold job runs, as this role.
            assert session.execute(text(f"select {tallies.FOLD_FUNCTION}(0)")).scalar() > 0
            session.commit()
        assert as_rows(got, GroupBy.RULE) == as_rows(expected, GroupBy.RULE)
        assert tallied(pg_engine) == counted(pg_engine)


def test_folding_again_folds_only_what_came_since(pg_engine: Engine) -> None:
    # However many groups there are (a fold keeps one row each), only new differences count toward a fold.
    for seed in range(60, 63):
        load(pg_engine, random_alerts(seed, 50))
    assert tallies.fold_tallies(pg_engine, at_rows=0) > 0
    folded = tally_rows(pg_engine)
    assert tallies.fold_tallies(pg_engine, at_rows=0) == 0
    assert tallies.fold_tallies(pg_engine, at_rows=-5) == 0  # clamped
    load(pg_engine, random_alerts(63, 5))
    appended = tally_rows(pg_engine) - folded
    assert appended > 0
    assert tallies.fold_tallies(pg_engine, at_rows=0) == appended
    assert tallied(pg_engine) == counted(pg_engine)


def test_replica_only_triggers_are_not_trusted(pg_engine: Engine) -> None:
    update(pg_engine, f"alter table alerts enable replica trigger {tallies.TRIGGERS[1]}")  # fires for replication only
    with pg_engine.connect() as connection:
        assert not tallies.tallies_installed(connection)
    assert not schema_is_current(pg_engine)


def test_truncate_does_not_wait_for_a_stats_read(pg_engine: Engine) -> None:
    load(pg_engine, random_alerts(64, 30))
    reader, truncating = pg_engine.connect(), pg_engine.connect()
    try:
        reader.execute(text("set transaction isolation level repeatable read"))
        reader.execute(text(f"select count(*) from {tallies.TABLE}"))  # holds the tallies while its read goes on
        truncating.execute(text("set lock_timeout = '2s'"))
        truncating.execute(text("truncate alerts"))
        truncating.commit()
        reader.rollback()
    finally:
        reader.close()
        truncating.close()
    assert tallied(pg_engine) == {} == counted(pg_engine)


def test_a_role_that_does_not_own_the_alerts(pg_engine: Engine) -> None:
    # It opens the store (every command runs create_schema or schema_is_current) whether or not the
    # tallies are there; it cannot install them (only the owner of alerts adds triggers), nor attach
    # their function, which runs as its owner, to a table of its own.
    from decision_router.store import make_engine

    with a_role(pg_engine, every_table=True) as (role, schema):
        app = make_engine(pg_engine.url.set(username=role).render_as_string(hide_password=False),
                          connect_args={"options": f"-csearch_path={schema}"})
        try:
            assert schema_is_current(app)
            create_schema(app)
            load(app, random_alerts(65, 40))
            assert tallied(pg_engine) == counted(pg_engine)
            with app.begin() as connection:
                connection.execute(text("create temp table forged (rule text)"))
                with pytest.raises(Exception, match="permission denied for function"):
                    connection.execute(text(f"create trigger forge after insert on forged for each statement"
                                            f' execute function "{schema}".{tallies.FUNCTION}()'))
            drop_trigger(pg_engine, tallies.TRIGGERS[0])  # now the store lacks its tallies
            assert not schema_is_current(app)
            create_schema(app)  # no error: the stats count the alerts meanwhile
            with app.connect() as connection:
                assert not tallies.tallies_installed(connection)
            with Session(app) as session:
                expected = compute_stats_reference(session, by=GroupBy.RULE, holdouts=HOLDOUTS)
                got = compute_stats(session, by=GroupBy.RULE, holdouts=HOLDOUTS)
            assert as_rows(got, GroupBy.RULE) == as_rows(expected, GroupBy.RULE)
        finally:
            app.dispose()


def test_a_reinstall_keeps_the_privileges_granted_on_the_tallies(pg_engine: Engine) -> None:
    # An operator let a read-only role read the counts (the stats' fast path): replacing the table
    # with its triggers must not take that away, or the role silently scans the alerts again.
    load(pg_engine, random_alerts(66, 60))
    with a_role(pg_engine, every_table=False) as (role, schema):
        update(pg_engine, f'grant select on {tallies.TABLE} to "{role}"')
        update(pg_engine, f'grant update (folded) on {tallies.TABLE} to "{role}"')
        drop_trigger(pg_engine, tallies.TRIGGERS[2])
        create_schema(pg_engine)
        assert schema_is_current(pg_engine)
        with Session(pg_engine) as session:
            session.execute(text(f'set local role "{role}"'))
            assert tallies.tallies_installed(session)
            assert session.execute(text(f"select has_column_privilege('{tallies.TABLE}', 'folded', 'UPDATE')")).scalar()
            assert not session.execute(text(f"select has_table_privilege('{tallies.TABLE}', 'INSERT')")).scalar()
            got = compute_stats(session, by=GroupBy.RULE, holdouts=HOLDOUTS)
            expected = compute_stats_reference(session, by=GroupBy.RULE, holdouts=HOLDOUTS)
        assert as_rows(got, GroupBy.RULE) == as_rows(expected, GroupBy.RULE)
        assert tallied(pg_engine) == counted(pg_engine)


def table_settings(engine: Engine) -> dict[str, Any]:
    """What a DBA may set on the tallies' table, as the catalog says: compared before and after a reinstall."""
    with engine.connect() as connection:
        def rows(statement: str) -> list[tuple]:
            return sorted(tuple(row) for row in connection.execute(text(statement), {"table": tallies.TABLE}))

        return {
            "table": rows("select pg_get_userbyid(relowner), relrowsecurity, relforcerowsecurity,"
                          " obj_description(oid, 'pg_class') from pg_class where oid = to_regclass(:table)"),
            "privileges": rows("select pg_get_userbyid(a.grantor), pg_get_userbyid(a.grantee), a.privilege_type,"
                               " a.is_grantable from pg_class c, aclexplode(c.relacl) a"
                               " where c.oid = to_regclass(:table)"),
            "policies": rows("select policyname, permissive, roles::text, cmd, qual, with_check from pg_policies"
                             " where schemaname = current_schema() and tablename = :table"),
            "column comments": rows("select attname, col_description(attrelid, attnum) from pg_attribute"
                                    " where attrelid = to_regclass(:table) and col_description(attrelid, attnum)"
                                    " is not null"),
        }


def quoted(value: str) -> str:  # a literal in DDL, which takes no parameters
    return "'" + value.replace("'", "''") + "'"


def table_oid(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(text(f"select to_regclass('{tallies.TABLE}')::oid")).scalar_one()


def test_a_reinstall_keeps_the_owner_row_security_policies_and_comments_of_the_tallies(pg_engine: Engine) -> None:
    # A DBA gave the counts to a role of theirs, let a reader see one rule's counts only (row-level
    # security), and commented them: replacing the table with its triggers must not undo any of it.
    alerts = random_alerts(67, 80)
    shown = alerts[0].rule  # before the load, which expires the records
    load(pg_engine, alerts)
    with a_role(pg_engine, every_table=False) as (reader, _), a_role(pg_engine, every_table=False) as (owner, _):
        for statement in [
            f'alter table {tallies.TABLE} owner to "{owner}"',
            f'grant select on {tallies.TABLE} to "{reader}"',
            f"alter table {tallies.TABLE} enable row level security",
            f"alter table {tallies.TABLE} force row level security",
            f'create policy one_rule on {tallies.TABLE} for select to "{reader}" using (rule = {quoted(shown)})',
            f"create policy no_forged_rows on {tallies.TABLE} as restrictive for insert to public"
            " with check (n >= 0 and rule not like '%forged%')",  # a `%` too: not a placeholder
            f"comment on table {tallies.TABLE} is 'kept by triggers: ask the DBA''s team (100% sure)'",
            f"comment on column {tallies.TABLE}.live is 'not suppressed'",
        ]:
            update(pg_engine, statement)
        before, oid = table_settings(pg_engine), table_oid(pg_engine)
        assert len(before["policies"]) == 2 and before["table"][0][0] == owner
        drop_trigger(pg_engine, tallies.TRIGGERS[1])
        create_schema(pg_engine)
        assert schema_is_current(pg_engine)
        assert table_oid(pg_engine) != oid  # replaced, not left alone
        assert table_settings(pg_engine) == before
        assert tallied(pg_engine) == counted(pg_engine)
        with Session(pg_engine) as session:  # the policy still holds: the reader sees its rule's counts only
            session.execute(text(f'set local role "{reader}"'))
            seen = {row.k for row in tallies.read_tallies(session)}
        assert seen == {shown}


def test_a_reinstall_logs_what_the_new_tallies_table_cannot_take(pg_engine: Engine) -> None:
    # A column the new definition no longer has: its comment and grant are left out, a policy that names
    # it denies (false) rather than vanish, and the log says each; the rest is kept.
    from structlog.testing import capture_logs

    load(pg_engine, random_alerts(68, 40))
    with a_role(pg_engine, every_table=False) as (reader, _):
        for statement in [
            f"alter table {tallies.TABLE} add column retired integer",
            f"comment on column {tallies.TABLE}.retired is 'gone next version'",
            f"comment on column {tallies.TABLE}.rule is 'the rule'",
            f'grant select on {tallies.TABLE} to "{reader}"',
            f'grant update (retired) on {tallies.TABLE} to "{reader}"',
            f"alter table {tallies.TABLE} enable row level security",
            f'create policy everything on {tallies.TABLE} for select to "{reader}" using (true)',
            f'create policy not_retired on {tallies.TABLE} as restrictive for select to "{reader}"'
            " using (retired is null)",
        ]:
            update(pg_engine, statement)
        drop_trigger(pg_engine, tallies.TRIGGERS[0])
        with capture_logs() as logs:
            create_schema(pg_engine)
        assert schema_is_current(pg_engine)
        warned = {(log["event"].split(":")[0], log.get("column") or log.get("policy"))
                  for log in logs if log["log_level"] == "warning"}
        assert warned == {("a column's comment is not kept", "retired"),
                          ("a grant on a column is not kept", "retired"),
                          ("a policy is kept denying (false)", "not_retired")}
        after = table_settings(pg_engine)
        assert after["column comments"] == [("rule", "the rule")]
        assert {(name, qual) for name, _, _, _, qual, _ in after["policies"]} == {("everything", "true"),
                                                                                 ("not_retired", "false")}
        assert after["table"][0][1]  # row-level security still on
        with Session(pg_engine) as session:
            session.execute(text(f'set local role "{reader}"'))
            assert tallies.tallies_installed(session)
            assert tallies.read_tallies(session) == []  # denied, as the DBA's restrictive policy would have
        assert tallied(pg_engine) == counted(pg_engine)


async def test_the_api_alone_folds_the_tallies(pg_engine: Engine, settings: Any, ruleset: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # `decision-router api` with no `serve` (the stats read by the API alone, or serve down while the API
    # acks): the appended differences are folded all the same, and the counts stay the alerts' own.
    from redis.asyncio import Redis

    from decision_router.api.server import run_api
    from tests.integration.conftest import wait_until

    monkeypatch.setattr(tallies, "FOLD_INTERVAL_S", 0.05)
    monkeypatch.setattr(tallies, "FOLD_AT_ROWS", 10)
    for seed in range(70, 75):
        load(pg_engine, random_alerts(seed, 40))
    expected = counted(pg_engine)
    assert tally_rows(pg_engine) > 10 + len(expected)
    stop, redis = asyncio.Event(), Redis.from_url(settings.effective_redis_url)
    api = asyncio.create_task(run_api(settings.model_copy(update={"api_port": 0}), ruleset, pg_engine, redis, stop))
    try:
        await wait_until(lambda: tally_rows(pg_engine) <= len(expected) or api.done(), what="the API to fold")
        assert not api.done()
        assert tallied(pg_engine) == expected
        with pg_engine.begin() as connection:  # more differences, a row each, committed together
            for step in range(12):
                connection.execute(text("update alerts set acknowledged_at = created_at"
                                        f" where acknowledged_at is null and alert_id like '%{step}'"))
            assert connection.execute(text(f"select count(*) from {tallies.TABLE} where not folded")).scalar() > 10
        expected = counted(pg_engine)
        await wait_until(lambda: tally_rows(pg_engine) <= len(expected) or api.done(), what="the API to fold again")
        assert tallied(pg_engine) == expected
    finally:
        stop.set()
        await api
        await redis.aclose()

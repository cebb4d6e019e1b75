"""Running counts of the decisions, kept by PostgreSQL itself, for `stats --by rule` over everything.

Counting a million alerts for the stats is a scan of a million index entries (~200-260 ms here, most
of `stats --by rule`). PostgreSQL instead keeps, per rule and way of counting (held out, action,
outcome, suppressed or not), how many decisions there are and how many of them were escalated,
breached a deadline, acknowledged and acted on: triggers on `alerts` append each write's difference
to `alert_tallies`, in the transaction that writes it, so the counts summed are those of the alerts
the same snapshot sees, and no code path can forget them. compute_stats sums them instead of
scanning the alerts, when the store has them and the stats cover every alert.

- Differences are appended, never added to a shared row: a writer takes no lock another writer
  waits for, so router processes, outcome batches and the SLA sweep never wait for one another's
  commit (nor deadlock) on a count.
- An insert (the router's COPY) and a delete are counted once per statement, from its transition
  table; an update per row, and only when a counted column changes (marking a batch delivered
  changes none, so the hot path's second transaction adds nothing).
- fold_tallies sums the rows into one per group (`serve`, and `api` run alone, run it every
  FOLD_INTERVAL_S once FOLD_AT_ROWS have been appended since the last fold), so a read sums few
  rows; a store no process folds is still counted right. TRUNCATE of the alerts deletes the counts (a TRUNCATE of them would
  wait for, or deadlock with, a stats read).
- Installed by create_schema (tallies_installed tells), with the alerts already stored counted in
  the same transaction while writes wait; triggers that are missing, disabled (or enabled for
  replication only) or of another version (the function's name) are replaced and the alerts counted
  again; what a DBA set on `alert_tallies` (owner, privileges, row-level security and its policies,
  comments) is set again (table_settings.py). Only the owner of `alerts` can: another role's
  create_schema logs a warning, and the stats count the alerts meanwhile.
- The trigger and fold functions run with their owner's rights (whoever ran create_schema), so a
  role that writes `alerts`, or runs `serve`, needs no rights on `alert_tallies`; a reader without
  them gets the counts from the alerts. Nobody else may attach the trigger function to a table.
- Triggers skipped by a load (`session_replication_role = replica`, `pg_restore --disable-triggers`)
  leave the counts behind: drop one of them afterwards (`drop trigger alert_tallies_insert on
  alerts`) and run create_schema, which counts again.
- SQLite has none: its triggers run per row in the router's process. Appending a row per alert
  took (c) from 8,447 to 7,800/s (4 alternating rounds) and its folds, under SQLite's one write
  lock, stalled batches for up to 65 ms (p99 latency 16-17 -> 16-22 ms); SQLite scans its compact
  stats index (tables.STATS_KIND) instead.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from decision_router.table_settings import read_settings, restore_settings

TABLE = "alert_tallies"
# The version is in the functions' names: triggers that call another are replaced.
FUNCTION = "alert_tallies_add_v1"
FOLD_FUNCTION = "alert_tallies_fold_v1"
TRIGGERS = ("alert_tallies_insert", "alert_tallies_update", "alert_tallies_delete", "alert_tallies_truncate")
FOLD_INTERVAL_S = 5.0
FOLD_AT_ROWS = 20_000  # fold once this many rows came since the last fold: a read sums them in a few ms

_KEY = "rule, held_out, action, outcome, live"
_COUNTED = ("n", "escalations", "ack_breaches", "act_breaches", "acks", "acts")
_COLUMNS = f"{_KEY}, {', '.join(_COUNTED)}"
# One decision's contribution, from a row of `alerts` named {r}, with sign {s}: its group, then its counts.
_CONTRIBUTION = """
    {r}.rule, {r}.held_out, {r}.action, coalesce({r}.outcome, '') as outcome,
    ({r}.suppressed_by is null or {r}.suppressed_by = '') as live, {s}1 as n,
    {s}coalesce({r}.escalation_level, 0) as escalations,
    {s}cast({r}.ack_breached_at is not null as integer) as ack_breaches,
    {s}cast({r}.act_breached_at is not null as integer) as act_breaches,
    {s}cast({r}.acknowledged_at is not null as integer) as acks,
    {s}cast({r}.intervened_at is not null as integer) as acts"""
# What an update must change for the counts to change (as a row, compared with IS DISTINCT FROM).
_COUNTED_STATE = """(
    {r}.rule, {r}.held_out, {r}.action, coalesce({r}.outcome, ''),
    ({r}.suppressed_by is null or {r}.suppressed_by = ''), coalesce({r}.escalation_level, 0),
    {r}.ack_breached_at is null, {r}.act_breached_at is null, {r}.acknowledged_at is null,
    {r}.intervened_at is null)"""
_SUMS = ", ".join(f"sum({column})" for column in _COUNTED)
_ANY_NONZERO = " or ".join(f"sum({column}) <> 0" for column in _COUNTED)
_CHANGED = f"{_COUNTED_STATE.format(r='old')} is distinct from {_COUNTED_STATE.format(r='new')}"


def _append(table: str, contributions: str) -> str:
    """An insert of the `contributions` (SELECTs of _CONTRIBUTION), summed per group, into `table`."""
    return f"""
            insert into {table} ({_COLUMNS})
            select {_KEY}, {_SUMS} from ({contributions}) c group by {_KEY} having {_ANY_NONZERO};"""


def _of_rows(name: str, sign: str = "") -> str:  # a transition table, or the alerts
    return f"select {_CONTRIBUTION.format(r='r', s=sign)} from {name} r"


def _of_row(record: str, sign: str = "") -> str:  # the trigger's OLD or NEW
    return f"select {_CONTRIBUTION.format(r=record, s=sign)}"


_UPDATED = f"{_of_row('new')} union all {_of_row('old', '-')}"
# `folded`: a fold's sum (the triggers' rows are not), so that a fold counts only what came since the last.
_CREATE_TABLE = """create table {table} (
    rule varchar not null, held_out boolean not null, action varchar not null, outcome varchar not null,
    live boolean not null, n bigint not null, escalations bigint not null, ack_breaches bigint not null,
    act_breaches bigint not null, acks bigint not null, acts bigint not null, folded boolean not null default false)"""


def _ddl(schema: str) -> list[str]:
    """The counts, the trigger function and its triggers, in `schema` (the alerts' own). The function
    names its table with the schema, and runs with a fixed search path as its owner."""
    quoted = '"' + schema.replace('"', '""') + '"'
    table, function = f"{quoted}.{TABLE}", f"{quoted}.{FUNCTION}"
    fold_lock = "'" + f"{schema}.{TABLE}.fold".replace("'", "''") + "'"
    alerts = "'" + f"{quoted}.alerts".replace("'", "''") + "'"
    return [
        *(f"drop trigger if exists {trigger} on alerts" for trigger in TRIGGERS),
        f"drop table if exists {table}",
        _CREATE_TABLE.format(table=table),
        f"""create or replace function {function}() returns trigger language plpgsql
        security definer set search_path = pg_catalog, pg_temp as $$
        begin
            if tg_relid <> {alerts}::regclass then
                raise exception '{FUNCTION} counts the alerts table only';
            end if;
            if tg_op = 'INSERT' then {_append(table, _of_rows("new_alerts"))}
            elsif tg_op = 'DELETE' then {_append(table, _of_rows("old_alerts", "-"))}
            elsif tg_op = 'UPDATE' then {_append(table, _UPDATED)}
            else delete from {table};  -- not TRUNCATE: its lock would wait for, or deadlock with, a stats read
            end if;
            return null;
        end $$""",
        # Runs as its owner: nobody else may attach it to a table of theirs (and so write the counts).
        f"revoke execute on function {function}() from public",
        # The fold, as the owner too: `serve`'s role needs no rights on the tallies. An advisory lock keeps
        # folds one at a time; one statement deletes the rows its snapshot sees and inserts their sums, so
        # a difference appended meanwhile is neither lost nor counted twice.
        f"""create or replace function {quoted}.{FOLD_FUNCTION}(at_rows bigint) returns bigint language plpgsql
        security definer set search_path = pg_catalog, pg_temp as $$
        declare
            appended bigint;
        begin
            if not pg_try_advisory_xact_lock(hashtext({fold_lock})) then
                return 0;
            end if;
            select count(*) into appended from {table} where not folded;
            if appended <= greatest(at_rows, 0) then
                return 0;
            end if;
            with gone as (delete from {table} returning *)
            insert into {table} ({_COLUMNS}, folded)
            select {_KEY}, {_SUMS}, true from gone group by {_KEY} having {_ANY_NONZERO};
            return appended;
        end $$""",
        f"""create trigger {TRIGGERS[0]} after insert on alerts referencing new table as new_alerts
            for each statement execute function {function}()""",
        f"""create trigger {TRIGGERS[1]} after update on alerts for each row when ({_CHANGED})
            execute function {function}()""",
        f"""create trigger {TRIGGERS[2]} after delete on alerts referencing old table as old_alerts
            for each statement execute function {function}()""",
        f"create trigger {TRIGGERS[3]} after truncate on alerts for each statement execute function {function}()",
        _append(table, _of_rows("alerts")),  # the alerts there before the triggers
    ]


def installed_check() -> str:
    """SQL of a scalar query: whether the tallies are beside the alerts, readable (if :tally_readable), this
    version's fold function there, and every trigger, enabled and calling this version's function (built
    when called: a test stands in another). NULL when there is no `alerts` or no tallies table. Its
    parameters are installed_params'; store.schema_is_current asks it inside its catalog query."""
    return f"""
        select (select count(*) from pg_trigger where tgrelid = a.oid and tgname = any(:tally_triggers)
                and tgenabled in ('O', 'A') and tgfoid = to_regprocedure(quote_ident(s.nspname) || '.{FUNCTION}()'))
                = :tally_expected
            and to_regprocedure(quote_ident(s.nspname) || '.{FOLD_FUNCTION}(bigint)') is not null
            and t.relnamespace = a.relnamespace and (not :tally_readable or has_table_privilege(t.oid, 'SELECT'))
        from pg_class a join pg_namespace s on s.oid = a.relnamespace, pg_class t
        where a.oid = to_regclass('alerts') and t.oid = to_regclass('{TABLE}')"""


def installed_params(readable: bool) -> dict[str, Any]:
    return {"tally_triggers": list(TRIGGERS), "tally_expected": len(TRIGGERS), "tally_readable": readable}


def _installed(readable: bool) -> Any:
    return text(installed_check()).bindparams(**installed_params(readable))


def tallies_installed(connection: Connection | Any, *, readable: bool = True) -> bool:
    """Whether the counts are kept on this store (PostgreSQL), and (`readable`) this connection may read them."""
    bind = connection.get_bind() if hasattr(connection, "get_bind") else connection
    return bind.dialect.name == "postgresql" and bool(connection.execute(_installed(readable)).scalar())


def install_tallies(engine: Engine) -> None:
    """Create the counts and their triggers and count the alerts already stored, in one transaction.

    Writes to `alerts` wait meanwhile (~1 s per million alerts, once). Several processes may call
    this at once (workers starting together): an advisory lock lets one do it, the others find it
    done. Earlier triggers of these names, and their counts, are replaced and counted again; what was
    set on the counts' table (owner, privileges, row-level security and policies, comments) is set
    again (table_settings.py).
    """
    if engine.dialect.name != "postgresql":
        return
    with engine.begin() as connection:
        schema = _schema(connection)
        connection.execute(text("select pg_advisory_xact_lock(hashtext(:key))"), {"key": f"{schema}.{TABLE}"})
        if tallies_installed(connection, readable=False):
            return
        if not connection.execute(_OWNS_ALERTS).scalar():
            # Only the owner of the alerts may add triggers to them: the stats count the alerts meanwhile.
            _log().warning("the stats' running counts are not kept: this role does not own the alerts table;"
                           " run create_schema (any command that opens the store) as its owner")
            return
        connection.execute(text("lock table alerts in share row exclusive mode"))
        # A reinstall drops the table (its shape may have changed): what a DBA set on it is set again
        # (a reader granted SELECT would otherwise fall back to scanning the alerts, say).
        table = '"' + schema.replace('"', '""') + '".' + TABLE
        settings = read_settings(connection, table)
        for statement in _ddl(schema):
            connection.exec_driver_sql(statement)
        if settings is not None:
            restore_settings(connection, table, settings)


_OWNS_ALERTS = text("select pg_has_role(relowner, 'USAGE') from pg_class where oid = to_regclass('alerts')")


def _log() -> Any:
    import structlog  # here: the CLI's commands import this module, and start faster without it

    return structlog.get_logger("decision_router.tallies")


def _schema(connection: Connection) -> str:
    """The schema of the `alerts` table the search path finds."""
    return connection.execute(text(
        "select n.nspname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where c.oid = to_regclass('alerts')"
    )).scalar_one()


def fold_tallies(engine: Engine, *, at_rows: int | None = None) -> int:
    """Sum the appended differences into one row per group, once they are more than `at_rows` rows
    (FOLD_AT_ROWS); returns how many rows were folded (0: too few, another process folding, no tallies).
    The store's fold function does it (see _ddl)."""
    if engine.dialect.name != "postgresql":
        return 0
    with engine.begin() as connection:
        if not tallies_installed(connection, readable=False):
            return 0
        folded = connection.execute(text(f"select {FOLD_FUNCTION}(:at_rows)"),
                                    {"at_rows": FOLD_AT_ROWS if at_rows is None else at_rows}).scalar_one()
    return int(folded)


_READ = f"""
    select rule as k, held_out, action, nullif(outcome, '') as outcome, live,
        {", ".join(f"cast(sum({column}) as bigint) as {column}" for column in _COUNTED)}
    from {TABLE} {{where}} group by {_KEY} having sum(n) <> 0"""


def read_tallies(connection: Connection | Any, rule: str | None = None) -> list[Any]:
    """Per group (rule as k, held out, action, outcome, live): n, escalations, breaches, acks and acts."""
    statement = _READ.format(where="where rule = :rule" if rule is not None else "")
    return list(connection.execute(text(statement), {"rule": rule} if rule is not None else {}))

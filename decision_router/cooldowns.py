"""Cooldown windows, held in the store: one decision per (rule, entity) and window across workers.

A rule's `cooldown` lets one decision of a (rule, entity_type, entity_id) through per window;
the later ones are stored as suppressed by it. Reading earlier alerts is not enough when several
workers route at once: two of them can both read "nothing yet" and both alert. So the decision
that starts a window claims it in the `cooldowns` table, in the transaction that stores the
decision, with an upsert that takes a row only when its window has ended (or when the row already
holds this very decision: the same entry routed again by a worker it was handed to). The database
serialises claims of one key (PostgreSQL: the row lock the upsert takes and keeps until commit;
SQLite: its single writer), so of two workers one wins. The loser's batch raises `ClaimLost`
before writing anything else; the caller rolls it back and routes it again, and the new pass reads
the winner and stores the decision as suppressed by it. The claim and the alert commit together,
so after a crash the store holds both or neither: there is no other state to repair.

Control records (held-out decisions) take and hold windows like alerts, as they always have: a
held-out entity gets one control record per window. Alerts stored before this table existed
still count: `holders` also reads them (tracker.cooldown_holders), which keeps a cooldown that a
rules reload lengthened covering the windows started before. A window's end is fixed when it
starts; a reload that shortens a cooldown applies to windows started after it.

A row whose window ended is only kept until `serve` prunes it (`prune_ended`, every
PRUNE_INTERVAL_S): without it, the table would hold a row per rule and entity ever alerted on.
Nothing reads an ended window (holders and claim look only at open ones), so deleting it changes
no decision; the margin (PRUNE_AFTER) covers workers whose clocks run behind this one's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from functools import cache, lru_cache
from typing import Any

from sqlalchemy import bindparam, delete, or_, select, text, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import Session

from decision_router import tracker
from decision_router.rules import RuleSet
from decision_router.tables import CooldownRecord

CooldownKey = tuple[str, str, str]  # (rule, entity_type, entity_id)


class ClaimLost(Exception):
    """Another worker started a window this batch meant to start; roll back and route it again."""

    def __init__(self, keys: Iterable[CooldownKey]) -> None:
        self.keys = sorted(keys)
        shown = ", ".join(f"{rule} {entity_type}:{entity_id}" for rule, entity_type, entity_id in self.keys[:3])
        more = f" and {len(self.keys) - 3} more" if len(self.keys) > 3 else ""
        super().__init__(f"cooldown taken by another worker: {shown}{more}")


# Built once (see tracker._KNOWN_PREDICTIONS: every batch runs these).
_COOLDOWNS = CooldownRecord.__table__  # type: ignore[attr-defined]
_OPEN_WINDOWS = select(
    _COOLDOWNS.c.rule, _COOLDOWNS.c.entity_type, _COOLDOWNS.c.entity_id, _COOLDOWNS.c.alert_id
).where(
    _COOLDOWNS.c.rule.in_(bindparam("rules", expanding=True)),
    _COOLDOWNS.c.entity_id.in_(bindparam("entity_ids", expanding=True)),
    _COOLDOWNS.c.ends_at > bindparam("now", type_=_COOLDOWNS.c.ends_at.type),
)
# PostgreSQL: each key of the batch looked up on its own, by the whole primary key: an index lookup
# however the table has grown since its statistics (none, on a new store), where the IN lists' plan
# could read the whole table. OFFSET 0: see tracker._COOLDOWN_HOLDERS_POSTGRES.
_OPEN_WINDOWS_POSTGRES = text(
    "select c.rule, c.entity_type, c.entity_id, c.alert_id"
    " from unnest(cast(:entity_ids as varchar[]), cast(:entity_types as varchar[]), cast(:rules as varchar[]))"
    " as wanted(entity_id, entity_type, rule)"
    " cross join lateral (select cooldowns.rule, cooldowns.entity_type, cooldowns.entity_id, cooldowns.alert_id"
    " from cooldowns where cooldowns.entity_id = wanted.entity_id and cooldowns.entity_type = wanted.entity_type"
    " and cooldowns.rule = wanted.rule and cooldowns.ends_at > :now offset 0) as c"
).bindparams(bindparam("now", type_=_COOLDOWNS.c.ends_at.type))


def holders(
    session: Session, wanted: Iterable[CooldownKey], *, since: Mapping[str, datetime], now: datetime
) -> dict[CooldownKey, str]:
    """(rule, entity_type, entity_id) -> the decision holding its cooldown at `now`: the holder of
    an unexpired window, else the latest unsuppressed decision after `since[rule]` (alerts stored
    before the cooldowns table)."""
    wanted = set(wanted)
    if not wanted:
        return {}
    found = tracker.cooldown_holders(session, wanted, since=since)
    if session.get_bind().dialect.name == "postgresql":
        rules, entity_types, entity_ids = zip(*wanted, strict=True)
        rows = session.execute(_OPEN_WINDOWS_POSTGRES, {
            "rules": list(rules), "entity_types": list(entity_types), "entity_ids": list(entity_ids), "now": now,
        })
    else:  # rules x entities: the keys are among them
        rows = session.execute(_OPEN_WINDOWS, {
            "rules": sorted({rule for rule, _, _ in wanted}),
            "entity_ids": sorted({entity_id for _, _, entity_id in wanted}), "now": now,
        })
    for rule, entity_type, entity_id, alert_id in rows:
        if (key := (rule, entity_type, entity_id)) in wanted:
            found[key] = alert_id
    return found


def claim(session: Session, started: Mapping[CooldownKey, str], *, ruleset: RuleSet, now: datetime) -> None:
    """Claim the windows a batch starts at `now` (key -> the decision starting it), in the caller's
    transaction; raises ClaimLost, having written nothing else, when another decision holds one."""
    if not started:
        return
    lengths = {rule.name: rule.cooldown for rule in ruleset.rules if rule.cooldown is not None}
    # Sorted: two batches claiming the same keys lock them in the same order, so never deadlock.
    keys = sorted(started)
    dialect = session.get_bind().dialect
    if dialect.name in ("sqlite", "postgresql"):
        won = _claim_by_driver(session, dialect, keys, started, lengths, now)
    else:
        rows = []
        for key in keys:
            rule, entity_type, entity_id = key
            rows.append({"rule": rule, "entity_type": entity_type, "entity_id": entity_id, "alert_id": started[key],
                         "started_at": now, "ends_at": now + lengths[rule]})
        won = {(rule, entity_type, entity_id) for rule, entity_type, entity_id in session.execute(
            _claim_statement(dialect.name), rows)}
    if lost := set(started) - won:
        raise ClaimLost(lost)


# Rows per upsert statement, as SQLAlchemy's insertmanyvalues pages them (6 parameters a row).
_CLAIM_PAGE = 1000


def _claim_by_driver(
    session: Session, dialect: Dialect, keys: list[CooldownKey], started: Mapping[CooldownKey, str],
    lengths: Mapping[str, timedelta], now: datetime,
) -> set[CooldownKey]:
    """The upserts SQLAlchemy's executemany of `_claim_statement` runs, with the same SQL and values (on
    SQLite its datetimes as it stores them), through the driver: SQLAlchemy's own work cost more than
    the database's, ~4 µs per row. Returns the keys claimed."""
    as_stored = tracker.sqlite_datetime if dialect.name == "sqlite" else (lambda value: value)
    started_at = as_stored(now)
    ends_at = {rule: as_stored(now + lengths[rule]) for rule in {rule for rule, _, _ in keys}}
    won: set[CooldownKey] = set()
    connection = session.connection()
    for start in range(0, len(keys), _CLAIM_PAGE):
        page = keys[start:start + _CLAIM_PAGE]
        sql = _claim_sql(dialect, len(page))
        parameters = [
            value for key in page for rule, entity_type, entity_id in (key,)
            for value in (entity_id, entity_type, rule, started[key], started_at, ends_at[rule])
        ]
        with tracker.driver_cursor(connection, sql) as cursor:
            cursor.execute(sql, parameters)
            won.update(cursor.fetchall())
    return won


@lru_cache(maxsize=64)
def _claim_sql(dialect: Dialect, count: int) -> str:
    """_claim_statement as SQLAlchemy compiles it for `dialect`, with `count` rows of values (the
    same plan, the same locks), its placeholders positional (in the columns' order)."""
    compiled = str(_claim_statement(dialect.name).compile(dialect=dialect))
    start, end = compiled.index("VALUES (") + len("VALUES "), compiled.index(") ON CONFLICT") + 1
    one_row = re.sub(r"%\(\w+\)s", "%s", compiled[start:end])  # PostgreSQL's named placeholders
    return compiled[:start] + ", ".join([one_row] * count) + compiled[end:]


@cache
def _claim_statement(dialect_name: str) -> Any:
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    upsert = dialect.insert(_COOLDOWNS)
    return upsert.on_conflict_do_update(
        index_elements=[_COOLDOWNS.c.rule, _COOLDOWNS.c.entity_type, _COOLDOWNS.c.entity_id],
        set_={"alert_id": upsert.excluded.alert_id, "started_at": upsert.excluded.started_at,
              "ends_at": upsert.excluded.ends_at},
        # The window has ended at this batch's clock, or it is held by this same decision.
        where=or_(_COOLDOWNS.c.ends_at <= upsert.excluded.started_at,
                  _COOLDOWNS.c.alert_id == upsert.excluded.alert_id),
    ).returning(_COOLDOWNS.c.rule, _COOLDOWNS.c.entity_type, _COOLDOWNS.c.entity_id)


PRUNE_INTERVAL_S = 600.0  # how often `serve` deletes ended windows
PRUNE_AFTER = timedelta(hours=1)  # a window is deleted this long after it ended
PRUNE_CHUNK = 1000  # rows per transaction: SQLite's one write lock is held for a few ms at a time

_ENDED = select(_COOLDOWNS.c.entity_id, _COOLDOWNS.c.entity_type, _COOLDOWNS.c.rule).where(
    _COOLDOWNS.c.ends_at < bindparam("before", type_=_COOLDOWNS.c.ends_at.type)
).limit(bindparam("chunk"))
_DELETE_ENDED = delete(_COOLDOWNS).where(
    tuple_(_COOLDOWNS.c.entity_id, _COOLDOWNS.c.entity_type, _COOLDOWNS.c.rule).in_(_ENDED)
    # Checked again on the row deleted: a claim may have started a new window on it meanwhile
    # (PostgreSQL re-reads a row another transaction changed before deleting it).
    & (_COOLDOWNS.c.ends_at < bindparam("before", type_=_COOLDOWNS.c.ends_at.type))
)


def prune_ended(engine: Engine, *, now: datetime, chunk: int = PRUNE_CHUNK) -> int:
    """Delete the windows that ended more than PRUNE_AFTER before `now`, `chunk` rows per
    transaction; returns how many."""
    pruned = 0
    while True:
        with Session(engine) as session:
            deleted = session.execute(_DELETE_ENDED, {"before": now - PRUNE_AFTER, "chunk": chunk}).rowcount
            session.commit()
        pruned += deleted
        if deleted < chunk:
            return pruned

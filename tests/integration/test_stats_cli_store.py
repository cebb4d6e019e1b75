"""`stats` is read-only: on a current store it runs no schema set-up; a new or older store is set up as before.

Also what keeps the command's wall time down: the rules load while the database counts (compute_stats
reads its holdouts only after the counts query), and no garbage collection while the command runs.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlmodel import Session
from typer.testing import CliRunner

from decision_router import cli_stats, stats, store
from decision_router.cli import app
from decision_router.store import create_schema, make_engine, schema_is_current
from decision_router.tables import (
    RETIRED_INDEXES,
    RETIRED_STATS_INDEXES,
    STATS_INDEXES,
    PredictionRecord,
    RejectionRecord,
)
from tests.unit.test_stats import HOLDOUTS, alert, known_records


def test_schema_is_current_only_when_create_schema_would_change_nothing(engine: Engine) -> None:
    dialect = engine.dialect.name
    assert schema_is_current(engine)
    with engine.begin() as connection:
        connection.execute(text(f"drop index {STATS_INDEXES[dialect][0]}"))
    assert not schema_is_current(engine)  # a store from before that index
    create_schema(engine)
    assert schema_is_current(engine)
    with engine.begin() as connection:
        connection.execute(text(f"create index {RETIRED_STATS_INDEXES[dialect][0]} on alerts (rule)"))
    assert not schema_is_current(engine)  # create_schema would drop it
    create_schema(engine)
    assert schema_is_current(engine)
    with engine.begin() as connection:  # an index retired as unused, as older stores have it
        connection.execute(text(f"create index {RETIRED_INDEXES[dialect][0]} on alerts (held_out)"))
    assert not schema_is_current(engine)
    create_schema(engine)
    assert schema_is_current(engine)
    with engine.begin() as connection:  # an index added to a table older stores have
        connection.execute(text("drop index uq_audit_source_entry"))
    assert not schema_is_current(engine)
    create_schema(engine)
    assert schema_is_current(engine)
    with engine.begin() as connection:
        connection.execute(text("drop table api_tokens"))  # nothing refers to it
    assert not schema_is_current(engine)


def test_a_new_sqlite_store_is_not_current(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'new.db'}")
    try:
        assert not schema_is_current(engine)
    finally:
        engine.dispose()


@pytest.fixture
def store_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A SQLite store holding the stats fixtures, and rules configuring their holdouts, for `stats` in process."""
    from tests.e2e.test_cli_stats import routing_yaml

    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "routing.yaml").write_text(routing_yaml())
    (tmp_path / "rules" / "owners.yaml").write_text("owners:\n  - {id: desk, name: Desk}\n")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = make_engine(url)
    create_schema(engine)
    with Session(engine) as session:
        session.add_all(known_records())
        session.commit()
    engine.dispose()
    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", url)
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(tmp_path / "rules"))
    yield url


def _stats(*args: str) -> Any:
    result = CliRunner().invoke(app, ["stats", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_stats_on_a_current_store_runs_no_schema_set_up(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(engine: Engine) -> None:
        raise AssertionError("create_schema ran on a current store")

    monkeypatch.setattr(store, "create_schema", refuse)
    rows = json.loads(_stats("--format", "json").stdout)
    assert {row["rule"] for row in rows} >= {name for name, fraction in HOLDOUTS.items() if fraction}
    # the holdouts reached the sample ratio check
    assert any(row["srm_expected_fraction"] is not None for row in rows)


def test_stats_on_an_older_store_builds_what_it_lacks(store_url: str) -> None:
    engine = make_engine(store_url)
    with engine.begin() as connection:
        connection.execute(text(f"drop index {STATS_INDEXES['sqlite'][0]}"))
    assert not schema_is_current(engine)
    _stats("--format", "json")
    assert schema_is_current(engine)
    engine.dispose()


def test_stats_on_a_new_store_sets_it_up_and_says_it_is_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'none-yet.db'}"
    (tmp_path / "none-yet.db").touch()  # a store with no tables yet; a missing file is refused (tests/e2e)
    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", url)
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(tmp_path))  # no rules: a warning, as before
    shown = _stats()
    assert "no alerts in this window yet" in shown.stdout
    engine = make_engine(url)
    assert schema_is_current(engine)  # as before: the tables are created, as the service does
    engine.dispose()


def test_stats_runs_without_garbage_collection_and_restores_it(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    compute = stats.compute_stats

    def watched(*args: Any, **kwargs: Any) -> Any:
        seen.append(gc.isenabled())
        return compute(*args, **kwargs)

    monkeypatch.setattr(stats, "compute_stats", watched)
    assert gc.isenabled()
    _stats("--format", "json")
    assert seen == [False]
    assert gc.isenabled()


def test_compute_stats_reads_the_holdouts_only_after_the_counts_query(store_url: str) -> None:
    engine = make_engine(store_url)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))

    class Watched(Mapping[str, float]):
        first_read_after: int | None = None

        def _read(self) -> dict[str, float]:
            if self.first_read_after is None:
                self.first_read_after = len(statements)
            return HOLDOUTS

        def __getitem__(self, rule: str) -> float:
            return self._read()[rule]

        def __iter__(self) -> Iterator[str]:
            return iter(self._read())

        def __len__(self) -> int:
            return len(self._read())

    holdouts = Watched()
    with Session(engine) as session:
        rows = stats.compute_stats(session, holdouts=holdouts)
        expected = stats.compute_stats(session, holdouts=HOLDOUTS)
    engine.dispose()
    assert holdouts.first_read_after is not None and holdouts.first_read_after >= 1
    assert "count(" in " ".join(statements[:holdouts.first_read_after]).lower()
    assert [r.as_dict() for r in rows] == [r.as_dict() for r in expected]


def test_rules_loading_gives_the_rules_and_their_holdouts_or_raises_their_error(
    store_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    rules = Path(tmp_path / "rules")
    ruleset = cli_stats.rules_for_stats(rules)
    assert ruleset is not None
    expected = {rule.name: rule.holdout for rule in ruleset.rules}
    assert expected
    for in_thread in (True, False):
        loading = cli_stats.RulesLoading(rules, in_thread=in_thread)
        assert dict(loading) == expected
        assert loading.ruleset() == ruleset

    def broken(rules_dir: Path) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(cli_stats, "rules_for_stats", broken)
    for in_thread in (True, False):
        loading = cli_stats.RulesLoading(rules, in_thread=in_thread)
        loading.join()  # never raises: the error is for whoever reads the holdouts or the rules
        with pytest.raises(OSError, match="disk on fire"):
            dict(loading)
        with pytest.raises(OSError, match="disk on fire"):
            loading.ruleset()


def test_the_models_a_store_has_seen_in_its_predictions_decisions_and_rejections(engine: Engine) -> None:
    """What a --model no one knows is checked against (the CLI asks only when a result is empty)."""
    at = datetime(2026, 11, 1, tzinfo=UTC)

    def prediction(n: int, model: str) -> PredictionRecord:
        return PredictionRecord(prediction_id=f"p{n}", model=model, model_version="1", entity_type="account",
                                entity_id=f"a{n}", score=0.5, predicted_at=at, received_at=at, rules_version="v",
                                document={})

    def rejection(n: int, model: str | None) -> RejectionRecord:
        return RejectionRecord(source_stream="predictions", source_id=f"1-{n}", model=model, reason="schema",
                               detail="x", at=at)

    with Session(engine) as session:
        session.add_all([prediction(n, "churn" if n % 3 else "churn-v2") for n in range(30)])
        session.add(alert(1, rule="r", owner="o", model="fraud"))  # a decision whose prediction is not stored
        session.add_all([rejection(1, "upsell"), rejection(2, None)])  # None: no readable model
        session.commit()
        assert stats.models_seen(session) == ["churn", "churn-v2", "fraud", "upsell"]
        assert stats.models_seen(session, limit=1) == ["churn", "fraud", "upsell"]  # the first of each table
        assert all(stats.model_seen(session, name) for name in ("churn", "churn-v2", "fraud", "upsell"))
        assert not any(stats.model_seen(session, name) for name in ("chrun", "churn-v", ""))

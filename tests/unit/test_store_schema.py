"""Several processes creating a new store at once (serve --workers N on a fresh database)."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.dialects import postgresql

from decision_router.store import _dialect_indexes, concurrent_index_ddl, create_schema, make_engine


def create_schema_at_once(url: str, workers: int = 3) -> list[BaseException]:
    """`workers` threads, each with its own engine on `url`, run create_schema at the same moment (as
    `serve --workers N` starting); what they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(workers)

    def create() -> None:
        engine = make_engine(url)
        try:
            start.wait()
            create_schema(engine)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted by the caller
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=create) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_workers_creating_a_new_store_at_the_same_moment_all_succeed(tmp_path: Path) -> None:
    # Each round is a new store and three creators racing on it; without the re-check they
    # collide on "table ... already exists" in most rounds.
    for round_ in range(10):
        url = f"sqlite:///{tmp_path / f'store-{round_}.db'}"
        errors = create_schema_at_once(url)
        assert errors == [], errors
        engine = make_engine(url)
        assert {"predictions", "alerts", "audit_events"} <= set(inspect(engine).get_table_names())
        engine.dispose()


def test_every_postgres_index_has_its_concurrent_build() -> None:
    # create_schema builds each index an older PostgreSQL store lacks with it (writes go on meanwhile).
    for name, index in _dialect_indexes("postgresql").items():
        ddl = concurrent_index_ddl(index, postgresql.dialect())
        unique = "UNIQUE " if index.unique else ""
        assert ddl.startswith(f"CREATE {unique}INDEX CONCURRENTLY IF NOT EXISTS {name} ON "), ddl

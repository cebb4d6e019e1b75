"""Connecting to a PostgreSQL that accepted the connection and never answers gives up after a while: libpq
alone waited with no limit, so `health` (the compose healthcheck) hung and an outage was never seen as one."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.exc import OperationalError

from decision_router import store


def _seconds_to_fail(url: str) -> float:
    engine = store.make_engine(url)
    started = time.monotonic()
    try:
        with pytest.raises(OperationalError, match="timeout"):
            engine.connect().close()
    finally:
        engine.dispose()
    return time.monotonic() - started


def test_a_server_that_never_answers_is_given_up_on(
    silent_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    monkeypatch.setattr(store, "CONNECT_TIMEOUT_S", 2)  # libpq's least
    # Bounded by the test run's own timeout without the default; 2 s with it, whatever the machine's load.
    assert _seconds_to_fail(f"postgresql+psycopg://postgres@127.0.0.1:{silent_server}/test") < 30


def test_the_urls_own_connect_timeout_decides(silent_server: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    monkeypatch.setattr(store, "CONNECT_TIMEOUT_S", 600)
    assert _seconds_to_fail(f"postgresql+psycopg://postgres@127.0.0.1:{silent_server}/test?connect_timeout=2") < 30


def test_an_sqlite_urls_own_lock_timeout_is_taken(tmp_path) -> None:
    # make_engine's own 30 s went to the driver after the URL's ?timeout=N, so the URL's was accepted at start
    # and then ignored: a writer waited 30 s for a lock it was told to wait 0.2 s for.
    import sqlite3

    from sqlalchemy import text

    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path)
    holder.execute("pragma journal_mode = wal")  # as the store's: a writer then waits in the busy handler
    holder.execute("create table t (x)")
    holder.commit()
    holder.execute("begin immediate")  # a write lock held by another connection
    engine = store.make_engine(f"sqlite:///{path}?timeout=0.2")
    started = time.monotonic()
    try:
        with pytest.raises(OperationalError, match="locked"), engine.begin() as connection:
            connection.execute(text("insert into t values (1)"))
    finally:
        engine.dispose()
        holder.rollback()
        holder.close()
    assert time.monotonic() - started < 10  # 30 s before

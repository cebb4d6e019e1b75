"""The router's SQLite engine checkpoints its write-ahead log from a thread, not in its commits
(store.WalCheckpointer; issue 8's latency: the commit that checkpointed took 30-70 ms)."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import text
from sqlalchemy.pool import StaticPool

from decision_router.embedded import EmbeddedRedisError
from decision_router.service import serve
from decision_router.settings import Settings
from decision_router.store import WalCheckpointer, make_engine

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"

ROW = "x" * 4000  # about a page


def _write(engine, transactions: int, rows: int = 25) -> None:  # noqa: ANN001
    with engine.begin() as connection:
        connection.execute(text("create table if not exists t (v text)"))
    for _ in range(transactions):
        with engine.begin() as connection:
            connection.execute(text("insert into t values (:v)"), [{"v": ROW}] * rows)


def _until(condition, seconds: float = 10.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _autocheckpoint(engine) -> int:  # noqa: ANN001
    with engine.connect() as connection:
        return connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one()


def test_commits_leave_the_log_to_the_thread_which_copies_it_into_the_database(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    engine = make_engine(f"sqlite:///{path}", background_checkpoints=True)
    try:
        assert _autocheckpoint(engine) == 8000
        _write(engine, 60)  # ~1,500 pages: past the 1,000 at which a commit would checkpoint, short of 8,000
        # The thread copies the log back: the database file grows to hold the rows.
        assert _until(lambda: path.stat().st_size > 5_000_000), path.stat().st_size
    finally:
        engine.dispose()


def test_without_the_thread_the_commits_checkpoint_as_usual(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        assert _autocheckpoint(engine) == 1000
    finally:
        engine.dispose()


def _write_counting_restarts(engine, transactions: int, path: Path, rows: int = 25) -> int:  # noqa: ANN001
    """Like _write, and counts the log's restarts from its beginning (its header's checkpoint
    sequence number going up) over the transactions."""
    _write(engine, 1, rows)
    restarts, sequence = 0, _wal_checkpoint_sequence(path)
    for _ in range(transactions):
        _write(engine, 1, rows)
        now = _wal_checkpoint_sequence(path)
        restarts, sequence = restarts + (now != sequence), now
    return restarts


def _restarts_and_log_size(path: Path, *, interval: float) -> tuple[int, int]:
    """Write ~5,000 pages (20 MB) without a pause, with checkpoint rounds every `interval` seconds and
    the commits checkpointing past 500 pages: the log's restarts, and its size at the end."""
    engine = make_engine(f"sqlite:///{path}")
    WalCheckpointer(engine, interval=interval, backstop_pages=500).start()
    try:
        return _write_counting_restarts(engine, 200, path), Path(f"{path}-wal").stat().st_size
    finally:
        engine.dispose()


def test_past_the_backstop_a_commit_checkpoints_and_the_log_is_reused_from_its_start(tmp_path: Path) -> None:
    # A round every minute: none runs during the writes, so only the backstop copies the log.
    restarts, size = _restarts_and_log_size(tmp_path / "store.db", interval=60)
    # Each commit past 500 pages (~2 MB) copies the log, and the next starts it again.
    assert restarts >= 8, restarts  # without the backstop (8,000 pages): none
    assert size < 2_500_000


def test_under_writes_that_never_pause_the_log_is_still_reused(tmp_path: Path) -> None:
    # The thread's passes and the commits' contend for the log; how far it grows between restarts
    # depends on the machine's load (one CI run reached 15 MB), so this counts restarts: the log is
    # written again from its start instead of growing by every page.
    restarts, size = _restarts_and_log_size(tmp_path / "store.db", interval=0.005)
    assert restarts >= 1, restarts
    assert size < 20_000_000  # every page written: ~20 MB


def _wal_index(path: Path) -> tuple[int, int]:
    """(frames in the log, frames copied into the database), read from the wal-index (`-shm`)
    without checkpointing: its header's mxFrame at byte 16 and the checkpoint info's nBackfill at
    byte 96 (https://sqlite.org/walformat.html), native byte order."""
    header = Path(f"{path}-shm").read_bytes()[:100]
    return int.from_bytes(header[16:20], sys.byteorder), int.from_bytes(header[96:100], sys.byteorder)


def _wal_checkpoint_sequence(path: Path) -> int:
    """The log header's checkpoint sequence number (bytes 12-16, big-endian): one more each time
    the log restarts from its beginning."""
    return int.from_bytes(Path(f"{path}-wal").read_bytes()[12:16], "big")


def test_a_round_copies_what_commits_added_while_it_ran_so_the_next_commit_restarts_the_log(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")  # only the rounds below copy the log
    writer.execute("create table t (v text)")
    writer.execute("insert into t values (?)", (ROW,))

    class CommitAfterTheFirstPass:
        """The checkpoint thread's connection, with a commit landing right after its first pass."""

        def __init__(self) -> None:
            self.connection, self.passes = sqlite3.connect(path), 0

        def execute(self, sql: str) -> sqlite3.Cursor:
            cursor = self.connection.execute(sql)
            self.passes += 1
            if self.passes == 1:
                writer.execute("insert into t values (?)", (ROW,))
            return cursor

    before, _ = _wal_index(path)
    checkpoints = CommitAfterTheFirstPass()
    WalCheckpointer.catch_up(checkpoints)  # type: ignore[arg-type]
    logged, copied = _wal_index(path)
    assert logged == copied > before, (before, logged, copied)  # the commit's frames too (one pass leaves them out)
    assert checkpoints.passes == 3  # copied the first, copied the commit's, found nothing new
    # Copied to its end, the log is written again from its start by the next commit (a new
    # header: its checkpoint sequence number goes up) instead of growing.
    sequence = _wal_checkpoint_sequence(path)
    writer.execute("insert into t values (?)", (ROW,))
    assert _wal_checkpoint_sequence(path) == sequence + 1
    assert _wal_index(path)[0] < logged
    checkpoints.connection.close()
    writer.close()


def test_a_round_stops_when_there_is_no_log(tmp_path: Path) -> None:
    connection = sqlite3.connect(tmp_path / "store.db")  # rollback journal: the pragma answers (0, -1, -1)
    calls = []

    class Counting:
        def execute(self, sql: str) -> sqlite3.Cursor:
            calls.append(sql)
            return connection.execute(sql)

    WalCheckpointer.catch_up(Counting())  # type: ignore[arg-type]
    assert calls == ["PRAGMA wal_checkpoint(PASSIVE)"]
    connection.close()


def _checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sqlite-wal-checkpoints"]


def test_disposing_the_engine_stops_the_thread_and_new_connections_checkpoint_again(tmp_path: Path) -> None:
    before = len(_checkpoint_threads())
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}", background_checkpoints=True)
    assert len(_checkpoint_threads()) == before + 1
    _write(engine, 1)
    engine.dispose()
    assert len(_checkpoint_threads()) == before
    assert _autocheckpoint(engine) == 1000  # a connection made after it stopped
    engine.dispose()


def test_an_in_memory_database_gets_no_thread_and_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A URI naming an in-memory database: nothing to checkpoint, and no file to make.
    monkeypatch.chdir(tmp_path)
    before = len(_checkpoint_threads())
    engine = make_engine("sqlite:///file:store?mode=memory&cache=shared&uri=true", background_checkpoints=True,
                         poolclass=StaticPool)
    try:
        assert len(_checkpoint_threads()) == before
        _write(engine, 1)
        assert list(tmp_path.iterdir()) == []
    finally:
        engine.dispose()


def test_a_thread_that_cannot_open_the_database_says_so_and_the_commits_checkpoint_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect = sqlite3.connect

    def refused_to_the_thread(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        if threading.current_thread().name == "sqlite-wal-checkpoints":
            raise sqlite3.OperationalError("unable to open database file")
        return connect(*args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", refused_to_the_thread)
    with structlog.testing.capture_logs() as logs:
        engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}", background_checkpoints=True)
        try:
            assert _until(lambda: not _checkpoint_threads())
            # Not 8,000 pages with no thread to checkpoint before: the log as SQLite bounds it.
            assert _autocheckpoint(engine) == 1000
        finally:
            engine.dispose()
    assert [entry["event"] for entry in logs] == ["WAL checkpoint thread cannot open the database"], logs
    assert "unable to open database file" in logs[0]["error"]



def test_serve_that_fails_to_start_leaves_no_checkpoint_thread(tmp_path: Path) -> None:
    before = len(_checkpoint_threads())
    with socket.socket() as taken:  # the embedded Redis's port, in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = Settings(redis_url=None, database_url=f"sqlite:///{tmp_path / 'store.db'}", rules_dir=RULES_DIR,
                            embedded_port=taken.getsockname()[1])
        with pytest.raises(EmbeddedRedisError):
            asyncio.run(serve(settings, api=False))
    assert len(_checkpoint_threads()) == before

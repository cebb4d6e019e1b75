"""Support for the fault-injection tests (no tests in here): the router as a real `decision-router serve` process,
a backlog published fast, a private Redis that can be restarted, a TCP proxy that can cut
the database off, and the exactly-once check."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis
import sqlalchemy
from sqlalchemy import func, select
from sqlmodel import Session

from decision_router.contracts import Alert
from decision_router.keys import Keys
from decision_router.store import create_schema, make_engine
from decision_router.tables import AlertRecord, PredictionRecord
from decision_router.tracker import alert_id_for

ROOT = Path(__file__).resolve().parents[2]
MANAGERS = ["alice-moreau", "benoit-garnier", "chloe-dubois", "elena-petrova", "felix-wagner", "giulia-conti"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], bool], *, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# the backlog -------------------------------------------------------------------------------


def backlog_document(n: int, run: str) -> dict:
    """A mix like production: a quarter alert an enterprise account manager (no holdout, so an
    inbox alert is certain), the rest record, alert with a holdout, or match nothing."""
    kind = n % 4
    segment, score = [("enterprise", 0.93), ("smb", 0.7), ("mid-market", 0.75), ("enterprise", 0.1)][kind]
    return {
        "prediction_id": f"{run}-{n}",
        "model": "churn",
        "model_version": "2026.11",
        "entity_type": "account",
        "entity_id": f"acct-{run}-{n}",
        "score": score,
        "predicted_at": (datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
        "features": {"top_drivers": ["usage_drop"]},
        "context": {"segment": segment, "account_manager": MANAGERS[n % len(MANAGERS)], "arr": 50_000 + n},
    }


def publish_backlog(client: redis.Redis, stream: str, count: int, *, run: str | None = None, start: int = 0) -> list[dict]:
    """Pipelined XADD: 50,000 entries in about a second."""
    run = run or uuid.uuid4().hex[:6]
    documents = [backlog_document(n, run) for n in range(start, start + count)]
    for chunk in range(0, len(documents), 2000):
        with client.pipeline(transaction=False) as pipe:
            for document in documents[chunk:chunk + 2000]:
                pipe.xadd(stream, {"data": json.dumps(document)})
            pipe.execute()
    return documents


def certain_alerts(documents: list[dict]) -> dict[str, str]:
    """alert_id -> owner for the predictions that must reach an inbox (enterprise, score 0.93)."""
    return {
        alert_id_for(d["prediction_id"], "enterprise-churn-risk"): d["context"]["account_manager"]
        for d in documents
        if d["context"]["segment"] == "enterprise" and d["score"] >= 0.8
    }


# the store ----------------------------------------------------------------------------------


@dataclass
class PostgresSchema:
    """A private schema: the URL a subprocess can use, and an engine for the test's checks."""

    server: str
    name: str = field(default_factory=lambda: f"t_{uuid.uuid4().hex[:12]}")

    def url(self, host: str = "127.0.0.1", port: int = 5432) -> str:
        base = self.server.split("@", 1)[0] + f"@{host}:{port}/" + self.server.rsplit("/", 1)[1]
        return f"{base}?options=-csearch_path%3D{self.name}"

    def create(self) -> sqlalchemy.Engine:
        admin = sqlalchemy.create_engine(self.server)
        with admin.begin() as connection:
            connection.execute(sqlalchemy.text(f'create schema "{self.name}"'))
        admin.dispose()
        self.engine = make_engine(self.server, connect_args={"options": f"-csearch_path={self.name}"})
        create_schema(self.engine)
        return self.engine

    def drop(self) -> None:
        self.engine.dispose()
        admin = sqlalchemy.create_engine(self.server)
        with admin.begin() as connection:
            connection.execute(sqlalchemy.text(f'drop schema "{self.name}" cascade'))
        admin.dispose()


def count(engine: sqlalchemy.Engine, table, *where) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(table).where(*where)) or 0


# the router as a process ----------------------------------------------------------------------


class Router:
    """`python -m decision_router serve` with settings in its environment; logs to a file."""

    def __init__(self, log_path: Path, *, workers: int = 1, **settings: str) -> None:
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("DECISION_ROUTER_")}
        env.update({
            "DECISION_ROUTER_LOG_FORMAT": "json",
            "DECISION_ROUTER_RULES_DIR": str(ROOT / "rules"),
            "DECISION_ROUTER_RULES_POLL_INTERVAL": "0",
            "DECISION_ROUTER_DRIFT_INTERVAL": "0",
            "DECISION_ROUTER_SWEEP_INTERVAL": "1h",
            "DECISION_ROUTER_BATCH_SIZE": "500",
            "DECISION_ROUTER_READ_BLOCK_MS": "200",
            "DECISION_ROUTER_RETRY_BACKOFF_MAX": "1s",
        })
        env.update({f"DECISION_ROUTER_{k.upper()}": v for k, v in settings.items()})
        args = [sys.executable, "-m", "decision_router", "serve", "--no-api"] + (["--workers", str(workers)] if workers > 1 else [])
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        # A session of its own: with --workers, close() and kill() take the workers with the supervisor.
        self.process = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict]:
        events = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
        return events

    def said(self, event: str) -> int:
        return sum(1 for e in self.events() if e.get("event") == event)

    def wait_started(self, times: int = 1) -> None:
        wait_for(lambda: self.said("router started") >= times or self.process.poll() is not None,
                 timeout=30, what="the router to start")
        assert self.process.poll() is None, f"the router exited at start:\n{self.log()[-3000:]}"

    def kill(self) -> None:
        self._kill_group()
        self.wait()

    def terminate(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def stop_cleanly(self, timeout: float = 30) -> None:
        """SIGTERM; the exit code must be 0 (the log's tail is shown if not)."""
        code = self.terminate(timeout)
        assert code == 0, f"exit code {code}; log tail:\n{self.log()[-4000:]}"

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def close(self) -> None:
        # Also when the supervisor has gone: a worker it left behind would go on routing, and write
        # into the next test's keys and store.
        self._kill_group()
        self.process.wait()
        self._log.close()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


# a private Redis --------------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of our own, persisting to disk, so it can be killed and restarted
    (the shared one on 6379 keeps nothing on disk and serves every other test)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        # appendfsync always: every acknowledged write survives a SIGKILL of the server.
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", "redis.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(up, timeout=15, what="the private redis-server")
        client.close()
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# a TCP proxy that can cut a connection off ----------------------------------------------------


class CuttableProxy:
    """Loopback TCP proxy: `cut()` drops every connection and refuses new ones (the database
    has gone away, as far as the router can tell); `restore()` accepts again on the same port."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def restore(self) -> CuttableProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not.
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut while this one was being accepted
                    client.close()
                    upstream.close()
                    return
                self._sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# the exactly-once check ---------------------------------------------------------------------------


def inbox_alerts(client: redis.Redis, keys: Keys) -> Counter[tuple[str, str]]:
    """(alert_id, owner) -> how many times it is in an inbox stream, over every inbox."""
    seen: Counter[tuple[str, str]] = Counter()
    for stream in client.scan_iter(match=f"{keys.prefix}alerts:*", count=1000):
        name = stream.decode() if isinstance(stream, bytes) else stream
        if not name.startswith(keys.inbox("")):
            continue
        for _, fields in client.xrange(name):
            alert = Alert.model_validate_json(fields[b"data"] if b"data" in fields else fields["data"])
            seen[(alert.alert_id, alert.owner)] += 1
    return seen


def assert_exactly_once(
    client: redis.Redis, keys: Keys, engine: sqlalchemy.Engine, documents: list[dict], *, rejected: int = 0
) -> None:
    """Every prediction stored once, every alert in its owner's inbox once, store and inboxes agree;
    `rejected` entries (none of `documents`) on the predictions' DLQ."""
    assert client.xlen(keys.predictions_dlq) == rejected, client.xrange(keys.predictions_dlq, count=3)
    with Session(engine) as session:
        stored = set(session.scalars(select(PredictionRecord.prediction_id)))
        delivered = {
            (a, o) for a, o in session.execute(
                select(AlertRecord.alert_id, AlertRecord.owner).where(AlertRecord.delivered_at.is_not(None))
            )
        }
        undelivered = session.scalar(select(func.count()).select_from(AlertRecord).where(
            AlertRecord.action == "alert", AlertRecord.held_out.is_(False), AlertRecord.suppressed_by.is_(None),
            AlertRecord.delivered_at.is_(None),
        ))
    assert stored == {d["prediction_id"] for d in documents}, "lost predictions"
    assert undelivered == 0, "alerts stored but never delivered"
    inboxes = inbox_alerts(client, keys)
    duplicates = {k: n for k, n in inboxes.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} alerts delivered more than once, e.g. {list(duplicates.items())[:3]}"
    assert set(inboxes) == delivered, "store and inbox streams disagree"
    missing = {(a, o) for a, o in certain_alerts(documents).items()} - set(inboxes)
    assert not missing, f"{len(missing)} certain alerts missing from their inboxes, e.g. {sorted(missing)[:3]}"


def all_acknowledged(client: redis.Redis, keys: Keys, group: str, total: int) -> Callable[[], bool]:
    """The group has been handed every entry and holds none pending."""

    def check() -> bool:
        info = {g["name"]: g for g in client.xinfo_groups(keys.predictions)} if client.exists(keys.predictions) else {}
        g = info.get(group.encode()) or info.get(group)
        return bool(g) and g["pending"] == 0 and g.get("entries-read") == total

    return check

"""DECISION_ROUTER_REDIS_WAIT_REPLICAS on a real primary with one replica (private redis-servers): the router's
inbox and DLQ writes count only once the replica has them. While the replica is away (paused with SIGSTOP,
so it stays connected and acknowledges nothing), a batch is processed but neither marked delivered nor
acknowledged; once it is back, every alert is in its inbox exactly once and every entry acknowledged."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlmodel import Session
from structlog.testing import capture_logs

from decision_router.keys import Keys
from decision_router.rules import RuleSet
from decision_router.service import running_service
from decision_router.settings import ReplicaWait, Settings
from decision_router.store import create_schema, make_engine
from decision_router.streams import ReplicasBehind, StreamWrite, connected_replicas, xadd_once
from decision_router.tables import AlertRecord, PredictionRecord
from tests.integration.conftest import wait_until
from tests.integration.test_faults_helpers import (
    PrivateRedis,
    all_acknowledged,
    assert_exactly_once,
    certain_alerts,
    publish_backlog,
    wait_for,
)

pytestmark = [pytest.mark.redis]

TTL = timedelta(minutes=5)
# Long enough for a healthy replica on a busy machine; short where the replica is paused and the call must fail.
WAIT = ReplicaWait(replicas=1, timeout_ms=5000)
SHORT_WAIT = ReplicaWait(replicas=1, timeout_ms=200)


class Replica(PrivateRedis):
    """A redis-server replicating `primary`; pause() stops it answering (SIGSTOP) without disconnecting."""

    def __init__(self, directory: Path, primary: PrivateRedis) -> None:
        super().__init__(directory)
        self.primary = primary

    def start(self) -> Replica:
        with redis.Redis.from_url(self.primary.url) as primary:
            # A diskless full sync otherwise waits 5 s (its default delay) for more replicas to join it.
            primary.config_set("repl-diskless-sync-delay", 0)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "no", "--replicaof", "127.0.0.1", str(self.primary.port),
             "--logfile", "replica.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        with redis.Redis.from_url(self.url) as mine, redis.Redis.from_url(self.primary.url) as primary:
            wait_for(lambda: _answers(lambda: mine.info("replication")["master_link_status"] == "up"),
                     timeout=15, what="the replica to sync")
            wait_for(lambda: primary.info("replication")["connected_slaves"] == 1, timeout=15,
                     what="the primary to count its replica")
        return self

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()  # a stopped process takes SIGKILL too, but not a wait for SIGCONT
        super().close()


def _answers(check) -> bool:
    try:
        return bool(check())
    except redis.RedisError:
        return False


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[PrivateRedis]:
    directory = tmp_path / "primary"
    directory.mkdir()
    server = PrivateRedis(directory).start()
    yield server
    server.close()


@pytest.fixture
def replica(tmp_path: Path, primary: PrivateRedis) -> Iterator[Replica]:
    directory = tmp_path / "replica"
    directory.mkdir()
    server = Replica(directory, primary).start()
    yield server
    server.close()


@pytest.fixture
async def client(primary: PrivateRedis) -> AsyncIterator[Redis]:
    value = Redis.from_url(primary.url)
    yield value
    await value.aclose()


def writes(numbers: range) -> list[StreamWrite]:
    return [StreamWrite(stream="alerts:o", fields={"n": str(n)}, dedupe_key=f"dedupe:{n}") for n in numbers]


# xadd_once ---------------------------------------------------------------------------------------


async def test_writes_waited_for_are_on_the_replica_when_the_call_returns(client: Redis, replica: Replica) -> None:
    assert await xadd_once(client, writes(range(300)), ttl=TTL, wait=WAIT) == 300
    with redis.Redis.from_url(replica.url) as on_replica:
        assert on_replica.xlen("alerts:o") == 300


async def test_a_replica_that_does_not_acknowledge_fails_the_call_until_it_does(
    client: Redis, replica: Replica, primary: PrivateRedis
) -> None:
    replica.pause()
    started = time.monotonic()
    with pytest.raises(ReplicasBehind, match="0 of 1 within 200 ms"):
        await xadd_once(client, writes(range(5)), ttl=TTL, wait=SHORT_WAIT)
    assert time.monotonic() - started < 5  # WAIT's timeout, not forever
    assert await client.xlen("alerts:o") == 5  # written on the primary: only not known to be safe
    # The retry writes nothing (the markers are set), and on a connection of its own: it must still wait for
    # the writes before it, which its WAIT would not count without a write of its own.
    other = Redis.from_url(primary.url)
    try:
        with pytest.raises(ReplicasBehind):
            await xadd_once(other, writes(range(5)), ttl=TTL, wait=SHORT_WAIT)
        replica.resume()
        assert await xadd_once(other, writes(range(5)), ttl=TTL, wait=WAIT) == 0
    finally:
        await other.aclose()
    with redis.Redis.from_url(replica.url) as on_replica:
        assert [fields[b"n"] for _, fields in on_replica.xrange("alerts:o")] == [b"0", b"1", b"2", b"3", b"4"]


async def test_without_a_replica_wait_a_paused_replica_holds_nothing_up(client: Redis, replica: Replica) -> None:
    replica.pause()
    assert await xadd_once(client, writes(range(5)), ttl=TTL) == 5


async def test_the_connected_replicas_are_counted(client: Redis, primary: PrivateRedis, tmp_path: Path) -> None:
    assert await connected_replicas(client, "any") == 0
    directory = tmp_path / "replica"
    directory.mkdir()
    replica = Replica(directory, primary).start()
    try:
        assert await connected_replicas(client, "any") == 1
    finally:
        replica.close()


# the router --------------------------------------------------------------------------------------


def counted(engine, *what) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(what[0]).where(*what[1:])) or 0


@pytest.fixture
def router_settings(primary: PrivateRedis, prefix: str) -> Settings:
    return Settings(
        redis_url=primary.url, stream_prefix=prefix, consumer_name="worker-1", batch_size=50,
        redis_wait_replicas=1, redis_wait_timeout=0.2, retry_backoff_max=0.5,
    )


async def test_a_batch_is_neither_delivered_nor_acknowledged_until_the_replica_has_its_inbox_writes(
    router_settings: Settings, ruleset: RuleSet, primary: PrivateRedis, replica: Replica, tmp_path: Path
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    create_schema(engine)
    keys = Keys(router_settings.stream_prefix)
    client = redis.Redis.from_url(primary.url)
    try:
        with capture_logs() as logs:
            async with running_service(router_settings, ruleset, engine) as service:
                replica.pause()
                documents = await asyncio.to_thread(publish_backlog, client, keys.predictions, 120)
                # Stored, and the inbox writes made on the primary, but the batch (however much of the backlog
                # the first read found) waits for the replica: nothing delivered, nothing it read acknowledged.
                await wait_until(lambda: service.reader.outage.down == "Redis", what="the wait for the replica")
                assert counted(engine, PredictionRecord) >= 1
                assert counted(engine, AlertRecord, AlertRecord.delivered_at.is_not(None)) == 0
                (group,) = client.xinfo_groups(keys.predictions)
                assert group["pending"] == group["entries-read"] >= 1
                replica.resume()
                await wait_until(all_acknowledged(client, keys, "decision-router", len(documents)),
                                 what="the whole backlog acknowledged")
        assert_exactly_once(client, keys, engine, documents)
        assert certain_alerts(documents)
        with redis.Redis.from_url(replica.url) as on_replica:  # and the replica has every inbox entry
            for owner in set(certain_alerts(documents).values()):
                assert on_replica.xlen(keys.inbox(owner)) == client.xlen(keys.inbox(owner))
        assert said(logs, "Redis replicas did not acknowledge the writes; waiting"), logs
        assert said(logs, "Redis reachable again")
    finally:
        client.close()
        engine.dispose()


async def test_a_start_waits_for_the_replica_to_drain_the_outbox(
    router_settings: Settings, ruleset: RuleSet, primary: PrivateRedis, replica: Replica, tmp_path: Path
) -> None:
    """Alerts left undelivered by a router stopped while the replica was away are written at the next start,
    which waits for the replica as a batch does, rather than failing."""
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    create_schema(engine)
    keys = Keys(router_settings.stream_prefix)
    client = redis.Redis.from_url(primary.url)
    undelivered = (AlertRecord, AlertRecord.action == "alert", AlertRecord.held_out.is_(False),
                   AlertRecord.suppressed_by.is_(None), AlertRecord.delivered_at.is_(None))
    try:
        replica.pause()
        async with running_service(router_settings, ruleset, engine) as service:
            documents = await asyncio.to_thread(publish_backlog, client, keys.predictions, 40)
            # A batch (however much of the backlog the first read found) stored, waiting for the replica.
            await wait_until(lambda: service.reader.outage.down == "Redis", what="the wait for the replica")
        assert counted(engine, *undelivered) >= 1  # left in the outbox
        with capture_logs() as logs:
            starting = asyncio.create_task(_start_and_stop(router_settings, ruleset, engine))
            await wait_until(lambda: starting.done() or said(logs, "Redis replicas did not acknowledge"),
                             what="the start to wait for the replica")
            assert not starting.done(), starting.exception()  # waiting, not failed
            assert not any(e["event"] == "router started" for e in logs)
            replica.resume()
        await asyncio.wait_for(starting, 60)
        assert counted(engine, *undelivered) == 0
        # The restart drained the outbox; the entries it then read again wrote nothing twice.
        assert all_acknowledged(client, keys, "decision-router", len(documents))()
        assert_exactly_once(client, keys, engine, documents)
    finally:
        client.close()
        engine.dispose()


def said(logs: list[dict], start: str) -> bool:
    return any(e["event"].startswith(start) for e in logs)


async def _start_and_stop(settings: Settings, ruleset: RuleSet, engine) -> None:
    """Start a router, let it acknowledge what is pending, stop it."""
    keys = Keys(settings.stream_prefix)
    async with running_service(settings, ruleset, engine):
        with redis.Redis.from_url(settings.redis_url) as client:
            await wait_until(lambda: client.xpending(keys.predictions, "decision-router")["pending"] == 0,
                             what="the pending entries acknowledged")


async def replica_warnings_at_start(settings: Settings, ruleset: RuleSet, tmp_path: Path) -> tuple[list, list]:
    """(the start's warnings of too few replicas, every log line) of a router started and stopped on a new store."""
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    create_schema(engine)
    try:
        with capture_logs() as logs:
            async with running_service(settings, ruleset, engine):
                pass
    finally:
        engine.dispose()
    return [e for e in logs if e["event"].startswith("fewer Redis replicas connected")], logs


async def test_a_start_with_fewer_replicas_than_asked_warns_and_starts(
    router_settings: Settings, ruleset: RuleSet, tmp_path: Path
) -> None:
    warnings, logs = await replica_warnings_at_start(router_settings, ruleset, tmp_path)
    assert [(w["connected"], w["wanted"]) for w in warnings] == [(0, 1)]
    assert any(e["event"] == "router started" for e in logs)


async def test_a_start_with_the_replicas_asked_for_does_not_warn(
    router_settings: Settings, ruleset: RuleSet, replica: Replica, tmp_path: Path
) -> None:
    warnings, logs = await replica_warnings_at_start(router_settings, ruleset, tmp_path)
    assert not warnings
    assert any(e["event"] == "router started" for e in logs)

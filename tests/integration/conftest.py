"""Real Redis and PostgreSQL. Each test gets its own stream prefix and, on PostgreSQL, its
own schema, so tests never flush a shared server."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis
import sqlalchemy
from sqlalchemy.engine import Engine

from decision_router.rules import RuleSet, load_rules
from decision_router.service import RouterService, running_service
from decision_router.settings import Settings
from decision_router.store import create_schema, make_engine
from tests.conftest import unavailable
from tests.integration.test_faults_helpers import PostgresSchema

REDIS_URL = os.environ.get("DECISION_ROUTER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("DECISION_ROUTER_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RULES_DIR = Path(__file__).resolve().parents[2] / "rules"


@pytest.fixture
def rules_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A rules directory holding the test module's ROUTING and OWNERS (a module may define its own)."""
    directory = tmp_path / "rules"
    directory.mkdir()
    (directory / "routing.yaml").write_text(request.module.ROUTING)
    (directory / "owners.yaml").write_text(request.module.OWNERS)
    return directory


@pytest.fixture(scope="session")
def redis_server() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        unavailable(f"Redis at {REDIS_URL}", exc)
    return REDIS_URL


@pytest.fixture
def prefix(redis_server: str) -> Iterator[str]:
    """A private namespace of streams and keys for one test; removed afterwards."""
    value = f"test-{uuid.uuid4().hex[:10]}:"
    yield value
    client = redis.Redis.from_url(redis_server)
    keys = list(client.scan_iter(match=f"{value}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def r(redis_server: str) -> Iterator[redis.Redis]:
    """A plain redis-py client: the producer side never uses FastStream."""
    client = redis.Redis.from_url(redis_server, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def postgres_server() -> str:
    try:
        engine = sqlalchemy.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("select 1"))
        engine.dispose()
    except sqlalchemy.exc.OperationalError as exc:
        unavailable(f"PostgreSQL at {POSTGRES_URL}", exc)
    return POSTGRES_URL


@pytest.fixture
def schema(postgres_server: str) -> Iterator[PostgresSchema]:
    """A private PostgreSQL schema for a router run in a subprocess (test_faults_helpers.Router), dropped after."""
    store = PostgresSchema(postgres_server)
    store.create()
    yield store
    store.drop()


def _postgres_schema_engine(url: str) -> tuple[Engine, Callable[[], None]]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(url)
    with admin.begin() as connection:
        connection.execute(sqlalchemy.text(f'create schema "{schema}"'))
    engine = make_engine(url, connect_args={"options": f"-csearch_path={schema}"})

    def drop() -> None:
        engine.dispose()
        with admin.begin() as connection:
            connection.execute(sqlalchemy.text(f'drop schema "{schema}" cascade'))
        admin.dispose()

    return engine, drop


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        store = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
        drop = store.dispose
    else:
        store, drop = _postgres_schema_engine(request.getfixturevalue("postgres_server"))
    create_schema(store)
    yield store
    drop()


@pytest.fixture
def pg_engine(postgres_server: str) -> Iterator[Engine]:
    store, drop = _postgres_schema_engine(postgres_server)
    create_schema(store)
    yield store
    drop()


@pytest.fixture(scope="session")
def ruleset() -> RuleSet:
    return load_rules(RULES_DIR)


@pytest.fixture
def settings(redis_server: str, prefix: str) -> Settings:
    return Settings(
        redis_url=redis_server,
        stream_prefix=prefix,
        consumer_name="worker-1",
        claim_idle=0.2,  # seconds: reclaim quickly in tests
        batch_size=50,
    )


@pytest.fixture
async def service(settings: Settings, ruleset: RuleSet, engine: Engine) -> AsyncIterator[RouterService]:
    async with running_service(settings, ruleset, engine) as running:
        yield running


class ManualClock:
    """The service's clock in tests: time moves only when a test moves `now`."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


async def wait_until(condition: Callable[[], bool], *, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll a condition (no fixed sleeps); fail with `what` on timeout (generous: a busy CI machine is slow)."""
    deadline = time.monotonic() + timeout
    while True:
        if await asyncio.to_thread(condition):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)

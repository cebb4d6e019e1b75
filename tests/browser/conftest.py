"""A running service for the page tests: real Redis and PostgreSQL, a store seeded through
the pipeline, the app under uvicorn on a free loopback port, and one headless Chromium
(Debian's, never a downloaded one) per module."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
import uvicorn
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy.engine import Engine

from decision_router.api.app import create_app
from decision_router.pipeline import Pipeline
from decision_router.rules import RuleSet, load_rules
from decision_router.settings import Settings
from decision_router.store import create_schema
from decision_router.tokens import create_token
from tests.browser.seed import Clock, seed
from tests.conftest import unavailable
from tests.integration.conftest import _postgres_schema_engine, postgres_server, redis_server  # noqa: F401

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"
CHROMIUM = os.environ.get("DECISION_ROUTER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@dataclass
class Site:
    url: str
    engine: Engine
    ruleset: RuleSet
    # "ops", "owner" (alice-moreau), "other-owner" (elena-petrova), "manager" (lead-strategic, alice's), "publisher"
    tokens: dict[str, str]
    seeded: dict[str, list[str]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def site(redis_server: str, postgres_server: str) -> Iterator[Site]:  # noqa: F811
    prefix = f"test-{uuid.uuid4().hex[:10]}:"
    engine, drop = _postgres_schema_engine(postgres_server)
    create_schema(engine)
    ruleset = load_rules(RULES_DIR)
    settings = Settings(redis_url=redis_server, stream_prefix=prefix, rules_dir=RULES_DIR)

    async def seeding() -> dict[str, list[str]]:
        client = AsyncRedis.from_url(redis_server)
        now = datetime.now(UTC)
        clock = Clock(now)
        try:
            return await seed(Pipeline(settings=settings, ruleset=ruleset, engine=engine, redis=client, clock=clock),
                              clock, now)
        finally:
            await client.aclose()

    # In a thread of its own: the test session's thread may already run an event loop.
    with ThreadPoolExecutor(max_workers=1) as pool:
        seeded = pool.submit(asyncio.run, seeding()).result()
    tokens = {
        "ops": create_token(engine, role="ops")[0],
        "owner": create_token(engine, role="owner", owner="alice-moreau", owners=ruleset.owners)[0],
        "other-owner": create_token(engine, role="owner", owner="elena-petrova", owners=ruleset.owners)[0],
        "manager": create_token(engine, role="owner", owner="lead-strategic", owners=ruleset.owners)[0],
        "publisher": create_token(engine, role="publisher")[0],
    }
    app = create_app(settings, engine=engine, redis=AsyncRedis.from_url(redis_server), ruleset=ruleset)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="dashboard-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield Site(url=f"http://127.0.0.1:{port}", engine=engine, ruleset=ruleset, tokens=tokens, seeded=seeded)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        client = redis.Redis.from_url(redis_server)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
        drop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        unavailable(f"Chromium at {CHROMIUM}", FileNotFoundError(CHROMIUM))
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()

"""The request body cap on a real uvicorn server: 413 with a JSON detail, from the declared
Content-Length alone or, for a chunked body, at the chunk that crosses the cap."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy.engine import Engine

from decision_router.api.limits import max_body_bytes
from decision_router.api.routes_predictions import MAX_ITEMS
from decision_router.api.server import ApiServer, api_running
from decision_router.rules import RuleSet
from decision_router.settings import Settings
from decision_router.tokens import create_token
from tests.integration.test_router_loop import prediction

pytestmark = pytest.mark.redis

LIMIT = 64 * 1024
CHUNK = 8 * 1024


@pytest.fixture
async def served(settings: Settings, ruleset: RuleSet, engine: Engine) -> AsyncIterator[tuple[ApiServer, str]]:
    settings = settings.model_copy(update={"api_port": 0, "api_max_body_bytes": LIMIT})
    redis = Redis.from_url(settings.effective_redis_url)
    token = create_token(engine, role="publisher")[0]
    async with api_running(settings, engine=engine, redis=redis, ruleset=lambda: ruleset) as server:
        yield server, token
    await redis.aclose()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status = int(head.split(" ", 2)[1])
    length = next(int(line.split(":", 1)[1]) for line in head.split("\r\n") if line.lower().startswith("content-length:"))
    return status, json.loads(await reader.readexactly(length))


def request_head(token: str, framing: str) -> bytes:
    return (
        f"POST /v1/predictions HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n"
    ).encode()


def test_the_default_cap_is_the_largest_batch_the_gate_could_accept() -> None:
    assert max_body_bytes(Settings()) == 64 * 1024 * MAX_ITEMS
    assert max_body_bytes(Settings(max_payload_bytes=2048)) == 2048 * MAX_ITEMS
    assert max_body_bytes(Settings(api_max_body_bytes=5000)) == 5000


async def test_a_declared_length_over_the_cap_is_refused_before_any_body_is_sent(served) -> None:
    server, token = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        # Headers only: the answer cannot wait for a body that is never sent.
        writer.write(request_head(token, f"Content-Length: {LIMIT + 1}"))
        await writer.drain()
        status, body = await asyncio.wait_for(read_response(reader), timeout=10)
    finally:
        writer.close()
    assert status == 413
    assert f"over {LIMIT} bytes" in body["detail"] and "DECISION_ROUTER_API_MAX_BODY_BYTES" in body["detail"]


async def test_a_chunked_body_is_refused_at_the_cap_not_read_to_its_end(served) -> None:
    server, token = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    answer = asyncio.create_task(read_response(reader))
    sent = 0
    try:
        writer.write(request_head(token, "Transfer-Encoding: chunked"))
        # Offer a little over the cap, never the body's end: without the cap the server would wait
        # for the rest and never answer. Once past the cap, wait for the answer (a busy machine may be
        # slow to give it) rather than send more.
        while sent < LIMIT + 4 * CHUNK and not answer.done():
            writer.write(f"{CHUNK:x}\r\n".encode() + b" " * CHUNK + b"\r\n")
            await writer.drain()
            sent += CHUNK
            await asyncio.wait({answer}, timeout=0.05)
        await asyncio.wait({answer}, timeout=30)
        assert answer.done(), f"no answer after {sent} bytes"
        status, body = answer.result()
    finally:
        answer.cancel()
        writer.close()
    assert status == 413 and "DECISION_ROUTER_API_MAX_BODY_BYTES" in body["detail"]
    assert LIMIT < sent <= LIMIT + 4 * CHUNK, sent


async def test_a_body_under_the_cap_is_served_and_one_over_it_is_413_json(served) -> None:
    server, token = served
    headers = {"Authorization": f"Bearer {token}"}
    under = [prediction(f"cap-{i}") for i in range(20)]
    over = [prediction(f"cap-big-{i}", features={"pad": "x" * 4000}) for i in range(20)]
    assert len(json.dumps(under)) < LIMIT < len(json.dumps(over))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", headers=headers) as client:
        accepted = await client.post("/v1/predictions", json=under)
        refused = await client.post("/v1/predictions", json=over)
    assert accepted.status_code == 202 and accepted.json()["accepted"] == 20, accepted.text
    assert refused.status_code == 413 and refused.headers["content-type"] == "application/json"
    assert "DECISION_ROUTER_API_MAX_BODY_BYTES" in refused.json()["detail"]

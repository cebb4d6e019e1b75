"""streams.xadd_once on fakeredis (the embedded default runs the same Lua): the script reloaded
when Redis forgot it, without writing anything twice. SCRIPT FLUSH is never sent to the shared
Redis of the integration tests."""

from __future__ import annotations

import ast
import contextlib
from datetime import timedelta
from pathlib import Path

import fakeredis

import decision_router
from decision_router.consumer import infrastructure_failure
from decision_router.settings import ReplicaWait, load_settings
from decision_router.streams import ReplicasBehind, StreamWrite, xadd_once

TTL = timedelta(minutes=5)


def writes(numbers: range) -> list[StreamWrite]:
    return [StreamWrite(stream="alerts:o", fields={"n": str(n)}, dedupe_key=f"dedupe:{n}") for n in numbers]


async def test_script_flushed_between_batches_is_loaded_again_and_nothing_written_twice() -> None:
    redis = fakeredis.aioredis.FakeRedis()
    assert await xadd_once(redis, writes(range(3)), ttl=TTL) == 3  # first use: NOSCRIPT, loaded
    await redis.script_flush()  # a restart or failover to a Redis without the script
    assert await xadd_once(redis, writes(range(5)), ttl=TTL) == 2
    assert [fields[b"n"] for _, fields in await redis.xrange("alerts:o")] == [b"0", b"1", b"2", b"3", b"4"]
    await redis.aclose()


def recorded_commands(redis: fakeredis.aioredis.FakeRedis) -> list[str]:
    """The names of the commands `redis`'s pipelines send from now on."""
    sent: list[str] = []
    pipeline = redis.pipeline

    def recording(*args, **kwargs):
        pipe = pipeline(*args, **kwargs)
        execute_command = pipe.execute_command

        def record(*command, **options):
            sent.append(command[0])
            return execute_command(*command, **options)

        pipe.execute_command = record
        return pipe

    redis.pipeline = recording  # type: ignore[method-assign]
    return sent


async def test_without_a_replica_wait_the_round_trip_is_the_script_calls_alone() -> None:
    """DECISION_ROUTER_REDIS_WAIT_REPLICAS=0 (the default) leaves the hot path as it was: no EXPIRE, no WAIT."""
    redis = fakeredis.aioredis.FakeRedis()
    sent = recorded_commands(redis)
    assert await xadd_once(redis, writes(range(300)), ttl=TTL) == 300  # two script calls, NOSCRIPT first
    assert await xadd_once(redis, writes(range(300)), ttl=TTL, wait=load_settings().replica_wait) == 0
    assert sent == ["EVALSHA"] * 6
    await redis.aclose()


async def test_with_a_replica_wait_the_round_trip_ends_with_a_write_and_wait() -> None:
    redis = fakeredis.aioredis.FakeRedis()
    sent = recorded_commands(redis)
    with contextlib.suppress(Exception):  # fakeredis may not know WAIT: only what is sent counts here
        await xadd_once(redis, writes(range(3)), ttl=TTL, wait=ReplicaWait(replicas=1, timeout_ms=100))
    assert sent[-3:] == ["EVALSHA", "EXPIRE", "WAIT"]
    await redis.aclose()


def test_replicas_that_did_not_acknowledge_are_an_outage_to_wait_out() -> None:
    """Retried like Redis failing over, never dead-lettered; notify.py's DLQ writes retry only on "Redis"."""
    assert infrastructure_failure(ReplicasBehind("0 of 1")) == "Redis"


def test_every_stream_write_of_the_router_passes_the_replica_wait() -> None:
    """A call that left `wait` out would write without waiting for replicas, silently."""
    package = Path(decision_router.__file__).parent
    calls = [
        (path.relative_to(package), node.lineno, {k.arg for k in node.keywords})
        for path in package.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "xadd_once"
    ]
    assert len(calls) >= 7
    assert [(path, line) for path, line, keywords in calls if "wait" not in keywords] == []

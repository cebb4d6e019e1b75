"""streams.xadd_once on fakeredis (the embedded default runs the same Lua): the script reloaded
when Redis forgot it, without writing anything twice. SCRIPT FLUSH is never sent to the shared
Redis of the integration tests."""

from __future__ import annotations

from datetime import timedelta

import fakeredis

from decision_router.streams import StreamWrite, xadd_once

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

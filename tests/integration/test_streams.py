"""streams.xadd_once on a real Redis: a batch of writes in one script call per chunk, each write
once by its dedupe key, in order, and a failing write leaving no marker behind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import redis
from redis.asyncio import Redis

from decision_router import streams
from decision_router.streams import StreamWrite, xadd_once

pytestmark = [pytest.mark.integration, pytest.mark.redis]

TTL = timedelta(minutes=5)


@pytest.fixture
async def client(redis_server: str) -> AsyncIterator[Redis]:
    value = Redis.from_url(redis_server, decode_responses=True)
    yield value
    await value.aclose()


def writes(prefix: str, numbers: range, *, owners: int = 2) -> list[StreamWrite]:
    return [
        StreamWrite(
            stream=f"{prefix}alerts:owner-{n % owners}",
            fields={"data": f"alert {n}", "n": str(n)},
            dedupe_key=f"{prefix}dedupe:alert:{n}",
        )
        for n in numbers
    ]


async def written(client: Redis, prefix: str, *, owners: int = 2) -> dict[str, list[int]]:
    """Entry numbers per owner's stream, in stream order."""
    return {
        f"owner-{o}": [int(fields["n"]) for _, fields in await client.xrange(f"{prefix}alerts:owner-{o}")]
        for o in range(owners)
    }


async def test_a_batch_writes_only_the_writes_not_deduplicated_yet_in_order(client: Redis, prefix: str) -> None:
    assert await xadd_once(client, writes(prefix, range(1, 8, 3)), ttl=TTL) == 3  # 1, 4, 7
    assert await xadd_once(client, writes(prefix, range(10)), ttl=TTL) == 7
    assert await written(client, prefix) == {"owner-0": [4, 0, 2, 6, 8], "owner-1": [1, 7, 3, 5, 9]}
    assert await xadd_once(client, writes(prefix, range(10)), ttl=TTL) == 0  # redelivered: nothing again
    assert 0 < await client.ttl(f"{prefix}dedupe:alert:9") <= TTL.total_seconds()


async def test_writes_across_chunk_boundaries_each_once_in_order(
    client: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "WRITES_PER_CALL", 3)
    calls: list[int] = []
    script_args = streams._script_args
    monkeypatch.setattr(streams, "_script_args", lambda chunk, ttl: calls.append(len(chunk)) or script_args(chunk, ttl))
    # Already written: the last of the first chunk and the first of the third.
    assert await xadd_once(client, writes(prefix, range(2, 7, 4)), ttl=TTL) == 2  # 2, 6
    calls.clear()
    assert await xadd_once(client, writes(prefix, range(10)), ttl=TTL) == 8
    assert calls == [3, 3, 3, 1]  # one script call per chunk
    assert await written(client, prefix) == {"owner-0": [2, 6, 0, 4, 8], "owner-1": [1, 3, 5, 7, 9]}


async def test_a_batch_larger_than_one_call_is_written_whole(client: Redis, prefix: str) -> None:
    count = 2 * streams.WRITES_PER_CALL + 1
    assert await xadd_once(client, writes(prefix, range(count), owners=1), ttl=TTL) == count
    assert (await written(client, prefix, owners=1))["owner-0"] == list(range(count))


async def test_a_write_that_fails_leaves_no_marker_so_a_retry_writes_it(client: Redis, prefix: str) -> None:
    """Atomic per write: the XADD fails (the stream key holds a string), so its marker is taken
    back; otherwise the retry would skip it and the entry would be lost. The other writes of the
    call go through, before and after the failing one, as they would one call each."""
    batch = writes(prefix, range(4))
    await client.set(batch[1].stream, "not a stream")  # owner-1: writes 1 and 3
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        await xadd_once(client, batch, ttl=TTL)
    assert [bool(await client.exists(w.dedupe_key)) for w in batch] == [True, False, True, False]
    assert len(await client.xrange(batch[0].stream)) == 2  # owner-0: writes 0 and 2, around the failed one
    await client.delete(batch[1].stream)
    assert await xadd_once(client, batch, ttl=TTL) == 2
    assert await written(client, prefix) == {"owner-0": [0, 2], "owner-1": [1, 3]}

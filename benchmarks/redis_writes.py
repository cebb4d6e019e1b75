"""`python -m benchmarks.redis_writes [--writes 1000] [--rounds 20]`: client CPU (process_time)
of the router's Redis traffic, on a real Redis, per entry:
- `streams.xadd_once` for batches of inbox-like writes (one `data` field of ~600 bytes of JSON,
  50 owners, a fresh dedupe key each), and for a batch whose writes were all written before (a
  redelivered batch: every write skipped);
- the consumer's side of a batch of predictions (`Consumer.handle`: decoding the entries read
  by XREADGROUP, then XACK), with a pipeline that does nothing, so only the consumer is timed.
Prints the least and the median of the rounds, in microseconds per entry; keys are under a
private prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from benchmarks.workload import new_run_id, prediction

OWNERS = 50


def batch(prefix: str, round_no: int, size: int) -> list:
    from decision_router.streams import StreamWrite

    data = json.dumps({"alert_id": "x" * 32, "detail": "y" * 520})
    return [
        StreamWrite(
            stream=f"{prefix}alerts:owner-{n % OWNERS}",
            fields={"data": data},
            dedupe_key=f"{prefix}dedupe:alert:{round_no}-{n}:owner-{n % OWNERS}",
        )
        for n in range(size)
    ]


async def measure(redis_url: str, size: int, rounds: int) -> dict[str, list[float]]:
    from redis.asyncio import Redis

    from decision_router.streams import xadd_once

    prefix = f"bench-writes-{new_run_id()}:"
    redis = Redis.from_url(redis_url)
    ttl = timedelta(minutes=10)
    figures: dict[str, list[float]] = {"new": [], "skipped": []}
    try:
        await xadd_once(redis, batch(prefix, -1, 10), ttl=ttl)  # warm up: script loaded, connection open
        for round_no in range(rounds):
            writes = batch(prefix, round_no, size)
            for label, expected in (("new", size), ("skipped", 0)):
                started = time.process_time()
                written = await xadd_once(redis, writes, ttl=ttl)
                figures[label].append((time.process_time() - started) / size * 1e6)
                assert written == expected, (label, written)
        figures["consumer"] = await consumer_rounds(redis, redis_url, prefix, size, rounds)
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 1000):
            await redis.delete(*keys[i : i + 1000])
        await redis.aclose()
    return figures


async def consumer_rounds(redis: Any, redis_url: str, prefix: str, size: int, rounds: int) -> list[float]:
    """CPU per entry of Consumer.handle on batches just read, the pipeline's work left out."""
    from decision_router.consumer import Consumer, Input, ensure_group
    from decision_router.pipeline import BatchResult
    from decision_router.settings import Settings

    settings = Settings(redis_url=redis_url, stream_prefix=prefix, consumer_name="bench-1", batch_size=size)
    stream = f"{prefix}predictions"

    async def nothing(entries: Any) -> BatchResult:
        return BatchResult()

    source = Input(stream=stream, label="predictions", process=nothing, dlq=f"{prefix}predictions:dlq")
    consumer = Consumer(redis, settings, [source], engine=None, clock=None)  # type: ignore[arg-type]
    await ensure_group(redis, stream, settings.consumer_group)
    run = new_run_id()
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(size * rounds):
            pipe.xadd(stream, {"data": json.dumps(prediction(n, run, now=datetime.now(UTC)))})
        await pipe.execute()
    figures = []
    for _ in range(rounds):
        [(_, messages)] = await redis.xreadgroup(settings.consumer_group, "bench-1", {stream: ">"}, count=size)
        started = time.process_time()
        assert await consumer.handle(source, messages)
        figures.append((time.process_time() - started) / len(messages) * 1e6)
    assert not (await redis.xpending(stream, settings.consumer_group))["pending"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--writes", type=int, default=1000, help="writes per xadd_once call, entries per consumer batch")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    figures = asyncio.run(measure(args.redis_url, args.writes, args.rounds))
    for label, values in figures.items():
        what = f"xadd_once {args.writes} writes, {label}"
        if label == "consumer":
            what = f"Consumer.handle, {args.writes} entries"
        print(f"{what:38s}: client CPU per entry "
              f"min {min(values):.2f} us, median {statistics.median(values):.2f} us ({len(values)} rounds)")


if __name__ == "__main__":
    main()

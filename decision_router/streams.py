"""Stream writes that happen once even when the input that caused them is redelivered."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

# SET NX and XADD in one script: atomic, so a crash leaves either both or neither.
_XADD_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
end
return false
"""


def as_text(value: bytes | str) -> str:
    """A Redis reply (bytes) or field as text; bad UTF-8 from a producer is replaced, not fatal."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class StreamWrite:
    stream: str
    fields: Mapping[str, str]
    dedupe_key: str


_XADD_ONCE_SHA = hashlib.sha1(_XADD_ONCE.encode()).hexdigest()


async def xadd_once(redis: Redis, writes: Sequence[StreamWrite], *, ttl: timedelta) -> int:
    """Write each entry unless its dedupe key is already set; returns how many were written.

    One pipelined round trip of EVALSHA calls (not redis-py's Script wrapper, which costs a
    SCRIPT EXISTS round trip and per-call overhead per batch). If Redis does not know the
    script (first use, or after a restart), it is loaded and the whole batch sent again:
    writes that got through the first time are skipped by their dedupe keys."""
    if not writes:
        return 0
    seconds = max(1, int(ttl.total_seconds()))
    for attempt in (1, 2):
        async with redis.pipeline(transaction=False) as pipe:
            for write in writes:
                flat = [item for pair in write.fields.items() for item in pair]
                pipe.execute_command("EVALSHA", _XADD_ONCE_SHA, 2, write.dedupe_key, write.stream, seconds, *flat)
            results = await pipe.execute(raise_on_error=False)
        missing = [r for r in results if isinstance(r, NoScriptError)]
        if not missing or attempt == 2:
            break
        await redis.script_load(_XADD_ONCE)
    for result in results:
        if isinstance(result, Exception):
            raise result
    return sum(1 for r in results if r)


async def xadd_all(redis: Redis, stream: str, entries: Sequence[Mapping[str, str]]) -> list[str]:
    """Append entries in one pipelined round trip (producers: no dedupe); their entry ids."""
    async with redis.pipeline(transaction=False) as pipe:
        for entry in entries:
            pipe.xadd(stream, dict(entry))
        return [as_text(entry_id) for entry_id in await pipe.execute()]

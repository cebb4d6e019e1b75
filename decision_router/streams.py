"""Stream writes that happen once even when the input that caused them is redelivered."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from redis.asyncio import Redis

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


async def xadd_once(redis: Redis, writes: Sequence[StreamWrite], *, ttl: timedelta) -> int:
    """Write each entry unless its dedupe key is already set; returns how many were written."""
    if not writes:
        return 0
    script = redis.register_script(_XADD_ONCE)
    seconds = max(1, int(ttl.total_seconds()))
    async with redis.pipeline(transaction=False) as pipe:
        for write in writes:
            flat = [item for pair in write.fields.items() for item in pair]
            await script(keys=[write.dedupe_key, write.stream], args=[seconds, *flat], client=pipe)
        results = await pipe.execute()
    return sum(1 for r in results if r)

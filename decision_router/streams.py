"""Stream writes that happen once even when the input that caused them is redelivered."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

# Per write, SET NX of its dedupe key and XADD of its entry, for a batch of writes in one call.
# KEYS: dedupe key and stream of each write, in turn. ARGV: the ttl in seconds, then per write
# its number of field items (names and values) and the items. Returns how many were written.
# A script runs atomically, so a crash leaves both the marker and the entry of a write or
# neither. A failing XADD (e.g. WRONGTYPE) takes its marker back and the others go on, as
# they would one call each; the call then answers with the first error, and the caller's
# retry writes the failed ones and skips the rest by their markers.
_XADD_ONCE = """
local ttl = ARGV[1]
local at = 2
local written = 0
local failed = nil
for i = 1, #KEYS, 2 do
  local items = tonumber(ARGV[at])
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ttl) then
    local reply = redis.pcall('XADD', KEYS[i + 1], '*', unpack(ARGV, at + 1, at + items))
    if type(reply) == 'table' and reply['err'] then
      redis.call('DEL', KEYS[i])
      failed = failed or reply
    else
      written = written + 1
    end
  end
  at = at + items + 1
end
if failed then
  return failed
end
return written
"""

# Writes per script call: bounds how long one call keeps Redis from its other clients (on the
# benchmark machine about 1 ms for 250 inbox writes, up to 10 ms for 1,000 under load). The
# client's CPU per write is the same for 250 as for 1,000 (benchmarks/redis_writes.py).
WRITES_PER_CALL = 250


def as_text(value: bytes | str) -> str:
    """A Redis reply (bytes) or field as text; bad UTF-8 from a producer is replaced, not fatal."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class StreamWrite:
    """One entry to write once: names and values of its fields are text (sent UTF-8 encoded)."""

    stream: str
    fields: Mapping[str, str]
    dedupe_key: str


_XADD_ONCE_SHA = hashlib.sha1(_XADD_ONCE.encode()).hexdigest()


async def xadd_once(redis: Redis, writes: Sequence[StreamWrite], *, ttl: timedelta) -> int:
    """Write each entry unless its dedupe key is already set; returns how many were written.

    One EVALSHA per WRITES_PER_CALL writes, all pipelined in one round trip: the script loops
    over the writes, so the client packs and parses one command per chunk, not one per write
    (not redis-py's Script wrapper either, which costs a SCRIPT EXISTS round trip). If Redis
    does not know the script (first use, after a restart or SCRIPT FLUSH), it is loaded and
    the whole batch sent again: writes that got through the first time are skipped by their
    dedupe keys.

    Redis Cluster runs a script only if all its keys share a slot: every key here is under
    the deployment's prefix, so a hash-tagged prefix (README, "Redis Cluster") puts a whole
    chunk in one slot, as it already had to for one write's marker and stream."""
    if not writes:
        return 0
    seconds = max(1, int(ttl.total_seconds()))
    calls = [_script_args(writes[i : i + WRITES_PER_CALL], seconds) for i in range(0, len(writes), WRITES_PER_CALL)]
    for attempt in (1, 2):
        async with redis.pipeline(transaction=False) as pipe:
            for args in calls:
                pipe.execute_command("EVALSHA", _XADD_ONCE_SHA, *args)
            results = await pipe.execute(raise_on_error=False)
        if attempt == 2 or not any(isinstance(r, NoScriptError) for r in results):
            break
        await redis.script_load(_XADD_ONCE)
    for result in results:
        if isinstance(result, Exception):
            raise result
    return sum(results)


def _script_args(writes: Sequence[StreamWrite], seconds: int) -> list[bytes]:
    """numkeys, KEYS and ARGV of one script call (layout: see _XADD_ONCE), as bytes: redis-py's
    encoder then passes each argument through, which halves its cost per argument."""
    keys: list[bytes] = []
    argv: list[bytes] = [b"%d" % seconds]
    for write in writes:
        keys += (write.dedupe_key.encode(), write.stream.encode())
        argv.append(b"%d" % (2 * len(write.fields)))
        for name, value in write.fields.items():
            argv += (name.encode(), value.encode())
    return [b"%d" % len(keys), *keys, *argv]


async def xadd_all(redis: Redis, stream: str, entries: Sequence[Mapping[str, str]]) -> list[str]:
    """Append entries in one pipelined round trip (producers: no dedupe); their entry ids."""
    async with redis.pipeline(transaction=False) as pipe:
        for entry in entries:
            pipe.xadd(stream, dict(entry))
        return [as_text(entry_id) for entry_id in await pipe.execute()]

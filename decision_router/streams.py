"""Stream writes that happen once even when the input that caused them is redelivered."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from redis.asyncio import Redis
from redis.asyncio.cluster import PipelineCommand, RedisCluster
from redis.exceptions import AskError, MovedError, NoScriptError, RedisClusterException, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from decision_router.settings import ReplicaWait

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


class ReplicasBehind(RedisError):
    """Fewer replicas than DECISION_ROUTER_REDIS_WAIT_REPLICAS acknowledged the writes in time: a failover
    now could lose them. Retried like a Redis outage (consumer.infrastructure_failure): the retry skips the
    writes that got through by their markers, and redoes any a failover lost (their markers went with them)."""


# A MOVED reply to the cluster path below: the slot map is patched and the writes sent again, at most
# this many times (a failover moves the slot once; more means the cluster is still reshaping).
_MOVED_RETRIES = 3


async def xadd_once(
    redis: Redis, writes: Sequence[StreamWrite], *, ttl: timedelta, wait: ReplicaWait | None = None
) -> int:
    """Write each entry unless its dedupe key is already set; returns how many were written.

    One EVALSHA per WRITES_PER_CALL writes, all pipelined in one round trip: the script loops
    over the writes, so the client packs and parses one command per chunk, not one per write
    (not redis-py's Script wrapper either, which costs a SCRIPT EXISTS round trip). If Redis
    does not know the script (first use, after a restart or SCRIPT FLUSH), it is loaded and
    the whole batch sent again: writes that got through the first time are skipped by their
    dedupe keys.

    Redis Cluster runs a script only if all its keys share a slot: every key here is under
    the deployment's prefix, so a hash-tagged prefix (README, "Redis Cluster") puts a whole
    chunk in one slot, as it already had to for one write's marker and stream.

    `wait` (settings.replica_wait): the same round trip ends with a WAIT for that many replicas,
    and ReplicasBehind is raised if fewer acknowledged in time."""
    if not writes:
        return 0
    seconds = max(1, int(ttl.total_seconds()))
    calls = [_script_args(writes[i : i + WRITES_PER_CALL], seconds) for i in range(0, len(writes), WRITES_PER_CALL)]
    for attempt in (1, 2):
        if wait is None:  # the default: the round trip is the script calls alone
            async with redis.pipeline(transaction=False) as pipe:
                for args in calls:
                    pipe.execute_command("EVALSHA", _XADD_ONCE_SHA, *args)
                results = await pipe.execute(raise_on_error=False)
        else:
            results = await _replicated(redis, calls, wait, marker=writes[0].dedupe_key, seconds=seconds)
        if attempt == 2 or not any(isinstance(r, NoScriptError) for r in results):
            break
        await redis.script_load(_XADD_ONCE)
    for result in results:
        if isinstance(result, Exception):
            raise result
    return sum(results)


async def _replicated(
    redis: Redis, calls: Sequence[list[bytes]], wait: ReplicaWait, *, marker: str, seconds: int
) -> list:
    """The script calls' replies, once `wait.replicas` replicas have them; else ReplicasBehind.

    WAIT waits for the calling connection's own writes, so it goes down the same connection, after
    one more write: EXPIRE of a marker, which the calls have just set or found set. A retry whose
    writes were all made before (by a call that raised ReplicasBehind, maybe on another connection)
    writes nothing itself, and WAIT promises nothing for a connection that wrote nothing (Redis 7.0
    happens to wait for its last command of any kind; later versions need not). Replication is in
    order, so a replica that has this EXPIRE has every write made before it."""
    commands = [
        *(("EVALSHA", _XADD_ONCE_SHA, *args) for args in calls),
        ("EXPIRE", marker, seconds),
        ("WAIT", wait.replicas, wait.timeout_ms),
    ]
    if isinstance(redis, RedisCluster):
        replies = await _on_slot_owner(redis, marker, commands)
    else:
        async with redis.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            replies = await pipe.execute(raise_on_error=False)
    results, acknowledged = replies[: len(calls)], replies[-1]
    if any(isinstance(r, Exception) for r in results):
        return results  # the caller loads the script or raises the error
    if isinstance(acknowledged, Exception):
        raise acknowledged
    if acknowledged < wait.replicas:
        raise ReplicasBehind(
            f"Redis replicas did not acknowledge the writes: {acknowledged} of {wait.replicas} within "
            f"{wait.timeout_ms} ms (DECISION_ROUTER_REDIS_WAIT_REPLICAS); waiting for them before acknowledging"
        )
    return results


async def _on_slot_owner(cluster: RedisCluster, key: str, commands: Sequence[tuple]) -> list:
    """The commands' replies, pipelined on one connection to the primary owning `key`'s slot (every key
    of the deployment's is in it). The cluster client would send WAIT, which has no key, to every
    primary on connections of their own, where it counts none of these writes."""
    for _ in range(_MOVED_RETRIES):
        await cluster.initialize()  # learns the slots on first use (and again after an outage)
        node = cluster.get_node_from_key(key)
        piped = [PipelineCommand(i, *command) for i, command in enumerate(commands)]
        try:
            await node.execute_pipeline(piped)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            # The primary is gone (a failover, maybe): read the slots anew for the caller's retry.
            await _reread_slots(cluster, failed=node.name)
            raise
        replies = [command.result for command in piped]
        redirect = next((r for r in replies if isinstance(r, AskError)), None)  # MovedError is an AskError
        if redirect is None:
            return replies
        if not isinstance(redirect, MovedError):
            # The slot is being migrated: Redis says TRYAGAIN to a script whose keys are split between
            # nodes, too, and the retry finds the slot where it ends up.
            raise TryAgainError(f"slot {redirect.slot_id} is migrating to {redirect.host}:{redirect.port}")
        await cluster.nodes_manager.move_slot(redirect)  # a failover: the slot's new primary, and again
    raise TryAgainError(f"the slot of {key!r} moved {_MOVED_RETRIES} times in a row: the cluster is reshaping")


async def _reread_slots(cluster: RedisCluster, *, failed: str) -> None:
    """Read the slot map again from the other nodes, as the cluster client does after its own connection
    errors; if none answers either, the caller's error stands, and its retry tries again."""
    with contextlib.suppress(RedisError, RedisClusterException, OSError):
        await cluster.nodes_manager.initialize(last_failed_node_name=failed)


async def connected_replicas(redis: Redis, key: str) -> int:
    """How many replicas the primary that the router's writes of `key` go to has connected now (the one
    owning its slot, in a cluster)."""
    if isinstance(redis, RedisCluster):
        await redis.initialize()
        info = await redis.info("replication", target_nodes=redis.get_node_from_key(key))
    else:
        info = await redis.info("replication")
    return int(info.get("connected_slaves", 0))


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

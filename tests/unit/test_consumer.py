"""What the read loop treats as an outage (retry, never dead-letter), how it decodes entries, and
how it reads: blocking only when idle, and a blocked read cut short by stop()."""

from __future__ import annotations

import asyncio
import errno

import psycopg
import pytest
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DataError, IntegrityError, InternalError, OperationalError

from decision_router.consumer import Consumer, Input, decoded, infrastructure_failure
from decision_router.settings import Settings


@pytest.mark.parametrize(
    ("error", "service"),
    [
        (RedisConnectionError("Connection refused"), "Redis"),
        (RedisTimeoutError("Timeout reading from socket"), "Redis"),
        (BusyLoadingError("Redis is loading the dataset in memory"), "Redis"),  # just restarted
        (ConnectionResetError("reset by peer"), "Redis"),
        (OperationalError("select 1", {}, ConnectionRefusedError("refused")), "store"),
        (OperationalError("insert", {}, Exception("database is locked")), "store"),
        # As redis-py raises them: the reply code is mapped to a class and stripped from the message.
        (ReadOnlyError("You can't write against a read only replica."), "Redis"),  # failover
        (MasterDownError("Link with MASTER is down and replica-serve-stale-data is set to 'no'."), "Redis"),
        (TryAgainError("Multiple keys request during rehashing of slot"), "Redis"),
        (ClusterDownError("The cluster is down"), "Redis"),
        (ResponseError("NOREPLICAS Not enough good replicas to write."), "Redis"),
        # Writes refused until an operator acts (maxmemory with noeviction; snapshots failing): waited out.
        (OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), "Redis"),
        (ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist "
                       "to disk."), "Redis"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "Redis"),
        (InternalError("insert", {}, psycopg.errors.ReadOnlySqlTransaction("read-only transaction")), "store"),
        # The cluster client's own, as redis-py 8 raises them: they are no ConnectionError (or no RedisError).
        (RedisClusterException("Redis Cluster cannot be connected. Please provide at least one reachable node: "
                               "Error 111 connecting to 127.0.0.1:7000. Connect call failed."), "Redis"),
        (SlotNotCoveredError('Slot "6459" is not covered by the cluster.'), "Redis"),
        (ClusterError("TTL exhausted."), "Redis"),
    ],
)
def test_outages_are_recognised(error: Exception, service: str) -> None:
    assert infrastructure_failure(error) == service


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad value"),
        KeyError("field"),
        IntegrityError("insert", {}, Exception("duplicate key")),
        DataError("insert", {}, Exception("PostgreSQL text fields cannot contain NUL (0x00) bytes")),
        ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        PermissionError("audit events are append-only"),  # a bug, not an outage: never retried forever
        FileNotFoundError("no such file"),
        RedisClusterException("EVALSHA - all keys must map to the same key slot"),  # a bug: keys outside the tag
    ],
)
def test_other_errors_count_against_the_entry(error: Exception) -> None:
    assert infrastructure_failure(error) is None


def test_entries_are_decoded_once_bad_utf8_left_as_bytes_for_the_gate_and_deleted_ones_set_aside() -> None:
    entries, gone = decoded([
        (b"1-0", {b"data": b'{"a": 1}'}),
        (b"2-0", {}),  # deleted from the stream while pending
        (b"3-0", {b"entity_id": b"caf\xe9"}),
    ])
    # Bad bytes are not replaced (that would change ids): the gate rejects them as invalid_encoding.
    assert entries == [("1-0", {"data": '{"a": 1}'}), ("3-0", {b"entity_id": b"caf\xe9"})]
    assert gone == [b"2-0"]


def test_entries_read_by_a_client_that_decodes_replies_are_taken_as_text() -> None:
    entries, _ = decoded([("1-0", {"data": '{"a": 1}'}), (b"2-0", {b"data": b"x", "kind": "y"})])
    assert entries == [("1-0", {"data": '{"a": 1}'}), ("2-0", {"data": "x", "kind": "y"})]


def test_the_embedded_redis_keeps_the_connection_after_an_error_reply() -> None:
    """Like Redis: BUSYGROUP (a group that exists) and NOSCRIPT (a script not loaded yet) are
    routine replies, and the next command on the same connection must still work."""
    import redis as redis_sync
    from redis.exceptions import NoScriptError

    from decision_router.embedded import EmbeddedRedis

    with EmbeddedRedis(port=0) as embedded:
        client = redis_sync.Redis.from_url(embedded.url, retry_on_error=[], single_connection_client=True)
        client.xgroup_create("s", "g", id="0", mkstream=True)
        with pytest.raises(ResponseError, match="BUSYGROUP"):
            client.xgroup_create("s", "g", id="0", mkstream=True)
        assert client.ping()
        with pytest.raises(NoScriptError):
            client.evalsha("0" * 40, 0)
        assert client.xadd("s", {"a": "1"})
        client.close()


class ScriptedRedis:
    """XREADGROUP replies from a script, each read's BLOCK recorded; past the script, a read
    blocks as Redis does on empty streams. XACK is counted."""

    def __init__(self, replies: list) -> None:
        self.replies, self.blocks, self.acked = list(replies), [], 0

    async def xreadgroup(self, group, consumer, streams, *, count, block):
        self.blocks.append(block)
        if self.replies:
            return self.replies.pop(0)
        await asyncio.sleep(3600 if block is not None else 0)
        return None

    async def xack(self, stream, group, *ids):
        self.acked += len(ids)
        return len(ids)


async def test_only_a_read_after_one_that_found_nothing_blocks_and_stop_cuts_it_short() -> None:
    entry = (b"1-0", {b"data": b"{}"})
    redis = ScriptedRedis([
        [(b"p", [])],  # our own pending history: none
        [(b"p", [entry])],  # new entries: a batch
        None,  # nothing more: the next read may block
    ])
    processed = []

    async def process(entries):
        processed.extend(entries)

    settings = Settings(consumer_name="w-1", read_block_ms=4_000)
    consumer = Consumer(redis, settings, [Input("p", "predictions", process, "p-dlq")], engine=None, clock=None)
    consumer.groups_ready = True
    reading = asyncio.create_task(consumer.run())
    while len(redis.blocks) < 4:
        await asyncio.sleep(0.01)
    assert redis.blocks == [None, None, None, 4_000]
    assert processed == [("1-0", {"data": "{}"})] and redis.acked == 1
    consumer.stop()
    # Not the 4 s read_block_ms allows: the blocked read held no batch, and run() ends cleanly.
    await asyncio.wait_for(reading, 1.0)
    assert not reading.cancelled() and reading.exception() is None


async def test_the_entries_of_a_second_stream_read_with_the_first_are_in_hand_from_the_read() -> None:
    """They wait while the first stream's batch is processed: kept alive (keep_alive) meanwhile, or a reclaim
    would take them over from a live worker and count a delivery each time."""
    redis = ScriptedRedis([
        [(b"p", []), (b"o", [])],  # our own pending history: none
        [(b"p", [(b"1-0", {b"data": b"{}"})]), (b"o", [(b"7-0", {b"type": b"x"}), (b"8-0", {})])],
    ])
    held_while_p: list[set[str]] = []

    async def process_p(entries):
        held_while_p.append(set(consumer.in_hand["o"]))

    async def process_o(entries):
        pass

    settings = Settings(consumer_name="w-1")
    consumer = Consumer(redis, settings, [Input("p", "predictions", process_p, "p-dlq"),
                                          Input("o", "outcomes", process_o, "o-dlq")], engine=None, clock=None)
    consumer.groups_ready = True
    reading = asyncio.create_task(consumer.run())
    while redis.acked < 3:  # 1-0, 7-0, and 8-0 (deleted while pending)
        await asyncio.sleep(0.01)
    consumer.stop()
    await asyncio.wait_for(reading, 1.0)
    assert held_while_p == [{"7-0"}]
    assert consumer.in_hand == {"p": {}, "o": {}}  # none left behind once handled

"""What the read loop treats as an outage (retry, never dead-letter) and how it decodes entries."""

from __future__ import annotations

import errno

import psycopg
import pytest
from redis.exceptions import BusyLoadingError, ClusterDownError, MasterDownError, ReadOnlyError, ResponseError
from redis.exceptions import TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DataError, IntegrityError, InternalError, OperationalError

from decision_router.consumer import decoded, infrastructure_failure


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
        (OSError(errno.EHOSTUNREACH, "No route to host"), "Redis"),
        (InternalError("insert", {}, psycopg.errors.ReadOnlySqlTransaction("read-only transaction")), "store"),
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

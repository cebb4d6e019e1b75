"""DECISION_ROUTER_REDIS_WAIT_REPLICAS on a Redis Cluster (three primaries with a replica each, started here):
WAIT has no key, so xadd_once sends it with the writes down one connection to the primary owning the
deployment's slot. A stale slot map (a failover since) is corrected by the MOVED reply, not retried forever."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from decision_router.settings import ReplicaWait
from decision_router.streams import ReplicasBehind, StreamWrite, connected_replicas, xadd_once
from tests.conftest import unavailable
from tests.integration.cluster_helpers import ClusterUnavailable, LocalCluster
from tests.integration.test_faults_helpers import wait_for

pytestmark = pytest.mark.redis  # redis-server and redis-cli; not the shared server

TTL = timedelta(minutes=5)
# Long enough for a healthy replica on a busy machine; short where the replica is paused and the call must fail.
WAIT = ReplicaWait(replicas=1, timeout_ms=5000)
SHORT_WAIT = ReplicaWait(replicas=1, timeout_ms=200)
TAG = "{wait-test}:"


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    local = LocalCluster(replicas=1)
    try:
        local.start()
    except ClusterUnavailable as exc:
        unavailable("a local Redis Cluster (redis-server and redis-cli)", exc)
    try:
        yield local
    finally:
        local.close()


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    value = RedisCluster.from_url(cluster.url)
    yield value
    await value.aclose()


def writes(numbers: range) -> list[StreamWrite]:
    return [StreamWrite(stream=f"{TAG}alerts:o", fields={"n": str(n)}, dedupe_key=f"{TAG}dedupe:{n}") for n in numbers]


def on_replica(cluster: LocalCluster) -> int:
    """Entries of the test's stream on the replica of the primary owning its slot."""
    replica = cluster.replica_of(cluster.primary_of(f"{TAG}alerts:o"))
    with redis.Redis(port=replica) as node:
        node.execute_command("READONLY")
        return node.xlen(f"{TAG}alerts:o")


async def test_writes_waited_for_are_on_the_slot_owners_replica(client: RedisCluster, cluster: LocalCluster) -> None:
    assert await connected_replicas(client, f"{TAG}alerts:o") == 1
    assert await xadd_once(client, writes(range(300)), ttl=TTL, wait=WAIT) == 300
    assert on_replica(cluster) == 300


async def test_a_paused_replica_of_the_slot_owner_fails_the_call_until_it_is_back(
    client: RedisCluster, cluster: LocalCluster
) -> None:
    replica = cluster.replica_of(cluster.primary_of(f"{TAG}alerts:o"))
    process = cluster.processes[cluster.ports.index(replica)]
    os.kill(process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(ReplicasBehind, match="0 of 1"):
            await xadd_once(client, writes(range(5)), ttl=TTL, wait=SHORT_WAIT)
    finally:
        os.kill(process.pid, signal.SIGCONT)
    assert await xadd_once(client, writes(range(5)), ttl=TTL, wait=WAIT) == 0
    assert on_replica(cluster) == 5


async def test_a_failover_since_the_slots_were_learned_is_followed_by_its_moved_reply(
    client: RedisCluster, cluster: LocalCluster
) -> None:
    assert await xadd_once(client, writes(range(3)), ttl=TTL, wait=WAIT) == 3  # the slot map learned
    old = cluster.primary_of(f"{TAG}alerts:o")
    new = cluster.replica_of(old)
    with redis.Redis(port=new) as node:
        # TAKEOVER: at once, without the old primary's agreement (which a cluster just formed may not give in
        # time); it has every write (the calls waited for the replica), and follows the new primary.
        node.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
    wait_for(lambda: cluster.primary_of(f"{TAG}alerts:o") == new, timeout=30, what="the failover")
    with redis.Redis(port=new) as node:
        wait_for(lambda: node.info("replication")["connected_slaves"] == 1, timeout=30,
                 what="the old primary to follow")
    assert await xadd_once(client, writes(range(6)), ttl=TTL, wait=WAIT) == 3
    assert client.get_node_from_key(f"{TAG}alerts:o").port == new

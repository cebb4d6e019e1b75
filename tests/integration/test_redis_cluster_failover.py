"""The router through a Redis Cluster failover: three primaries with a replica each, on loopback, started
here. `serve --workers 2` routes a steady stream of predictions while the primary holding the deployment's
slot is SIGKILLed and its replica takes over. Every entry the stream kept is routed exactly once, the
router waits the failover out as an outage, and its reload subscribers listen again."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from decision_router.keys import Keys
from decision_router.streams import as_text
from tests.conftest import unavailable
from tests.integration.cluster_helpers import ClusterUnavailable, LocalCluster
from tests.integration.test_faults_helpers import (
    PostgresSchema,
    Router,
    all_acknowledged,
    assert_exactly_once,
    backlog_document,
    wait_for,
)

pytestmark = pytest.mark.redis  # redis-server and redis-cli; not the shared server

GROUP = "decision-router"
BATCH = 20  # predictions per published batch, plus one reject every REJECT_EVERY batches
REJECT_EVERY = 5


@pytest.fixture
def replicated_cluster() -> Iterator[LocalCluster]:
    """Its own cluster: this test kills one of its nodes. A node silent for 2 s counts as failed (15 s by
    default; 1 s would risk failing over a node that is only slow on a busy CI machine)."""
    cluster = LocalCluster(replicas=1, node_timeout_ms=2000)
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        unavailable("a local Redis Cluster (redis-server and redis-cli)", exc)
    try:
        yield cluster
    finally:
        cluster.close()


class Publisher(threading.Thread):
    """Publishes a batch every 50 ms to the primary holding the stream's slot, on one connection: the
    XADDs, then WAIT 1 (a replica has them). A batch counts as published only when WAIT says so: Redis
    replicates asynchronously, and a batch the old primary took but had not passed on dies with it.
    A batch that fails (the primary is gone, or WAIT timed out) is left uncertain, and never sent again:
    sent again, it would be a duplicate of whatever part of it did get through."""

    def __init__(self, cluster: LocalCluster, stream: str, tag: str) -> None:
        super().__init__(daemon=True)
        self.cluster, self.stream, self.tag = cluster, stream, tag
        self.published: list[dict] = []  # predictions a replica acknowledged
        self.uncertain = 0  # predictions in failed batches
        self.failures = 0
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._publish()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def _publish(self) -> None:
        n, batch = 0, 0
        node = self._primary()
        while not self.stopping.is_set():
            documents = [backlog_document(i, self.tag) for i in range(n, n + BATCH)]
            entries = [json.dumps(d) for d in documents]
            if batch % REJECT_EVERY == 0:
                entries.append(f"not json {self.tag}-{batch}")
            n, batch = n + BATCH, batch + 1
            try:
                with node.pipeline(transaction=False) as pipe:
                    for data in entries:
                        pipe.xadd(self.stream, {"data": data})
                    pipe.execute_command("WAIT", 1, 1000)
                    replicated = pipe.execute()[-1]
            except redis.RedisError:
                replicated = 0
            if replicated >= 1:
                self.published.extend(documents)
            else:
                self.uncertain += len(documents)
                self.failures += 1
                node.close()
                node = self._primary()
            self.stopping.wait(0.05)
        node.close()

    def _primary(self) -> redis.Redis:
        """A client of the slot's primary, as the live nodes see it now (the dead one until the failover)."""
        while True:
            try:
                port = self.cluster.primary_of(self.stream)
            except redis.RedisError:
                time.sleep(0.05)
                continue
            # No retries inside redis-py (by default 3, backing off for seconds): a batch fails at once.
            return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=1,
                               retry=Retry(NoBackoff(), 0))


@pytest.mark.postgres
# "1": the router's own inbox and DLQ writes wait for the replica (DECISION_ROUTER_REDIS_WAIT_REPLICAS), on the
# slot owner's connection, across the failover (MOVED, connection errors); the promoted replica has none of its
# own until the old primary is back, and the router waits for that too.
@pytest.mark.parametrize("wait_replicas", ["0", "1"])
def test_a_failover_to_the_replica_is_waited_out_and_every_published_prediction_is_routed_once(
    replicated_cluster: LocalCluster, schema: PostgresSchema, tmp_path: Path, wait_replicas: str
) -> None:
    cluster = replicated_cluster
    run = uuid.uuid4().hex[:8]
    prefix = f"{{fo-{run}}}:"  # one tag: every key of the deployment in one slot
    keys = Keys(prefix)
    primary = cluster.primary_of(keys.predictions)
    replica = cluster.replica_of(primary)
    publisher = Publisher(cluster, keys.predictions, run)
    client: redis.RedisCluster | None = None
    router = None
    try:
        # The one node the router is told of is the one that dies: it must follow the cluster, not the URL.
        # CLAIM_IDLE 1s: an XACK the old primary took but never passed on leaves its entry pending on the new
        # one, where only a reclaim takes it.
        router = Router(tmp_path / "router.log", workers=2, consumer_name="box", batch_size="100", claim_idle="1s",
                        redis_url=f"redis://127.0.0.1:{primary}/0", redis_cluster="true", stream_prefix=prefix,
                        database_url=schema.url(), redis_wait_replicas=wait_replicas)
        router.wait_started(times=2)
        publisher.start()
        wait_for(lambda: len(publisher.published) >= 400, timeout=20, what="a stream to flow")

        cluster.kill_node(primary)
        killed_at = time.monotonic()
        cluster.wait_promoted(replica, timeout=20)
        failover = time.monotonic() - killed_at
        # Back, the old primary is the new one's replica: until then no batch can be acknowledged by a replica.
        cluster.restart_node(primary)
        during = len(publisher.published)
        wait_for(lambda: len(publisher.published) >= during + 400, timeout=20, what="the stream to flow again")
        publisher.stopping.set()
        publisher.join(10)
        assert publisher.error is None, repr(publisher.error)
        assert publisher.failures > 0, "the publisher saw the primary go"

        # A client that learned the cluster before the failover keeps the old primary among its primaries
        # (redis-py), and would scan the inboxes twice: this one starts after it.
        client = redis.RedisCluster.from_url(f"redis://127.0.0.1:{replica}/0")

        # What the stream kept, on the promoted replica: the router must route exactly that.
        entries = [(as_text(i), as_text(f[b"data"])) for i, f in client.xrange(keys.predictions)]
        kept = [json.loads(data) for _, data in entries if not data.startswith("not json")]
        rejected = {i: "invalid_json" for i, data in entries if data.startswith("not json")}
        kept_ids = {d["prediction_id"] for d in kept}
        lost = [d["prediction_id"] for d in publisher.published if d["prediction_id"] not in kept_ids]
        assert not lost, f"{len(lost)} predictions a replica acknowledged are gone (Redis, not the router)"

        wait_for(all_acknowledged(client, keys, GROUP, len(entries)), timeout=30, what="every entry acknowledged")
        # Both workers' reload subscribers, cut off with the old primary, listen again.
        wait_for(lambda: _subscribers(client, keys.rules_reload) == 2, timeout=15, what="both workers to resubscribe")
        client.publish(keys.rules_reload, json.dumps({"by": "test", "origin": None}))
        wait_for(lambda: router.said("rules reload requested") == 2, timeout=10, what="both workers to reload")
        assert router.process.poll() is None, f"the router exited:\n{router.log()[-4000:]}"
        router.stop_cleanly()

        dead = {as_text(f[b"source_id"]): as_text(f[b"reason"]) for _, f in client.xrange(keys.predictions_dlq)}
        assert dead == rejected, "each reject on the DLQ once, with its reason; nothing else"
        assert_exactly_once(client, keys, schema.engine, kept, rejected=len(rejected))
        assert router.said("Redis unavailable; retrying in 0.2s") >= 1, "the outage was logged"
        assert router.said("Redis reachable again") >= 1, "the recovery was logged"
        errors = [e for e in router.events() if e.get("level") == "error"]
        assert not errors, f"a failover is an outage, not a bug: {errors[:2]}"
        assert "Traceback" not in router.log(), router.log()[-4000:]
        print(f"failover in {failover:.1f}s; {len(kept)} predictions in the stream, {len(publisher.published)} "
              f"acknowledged by a replica, {publisher.uncertain} in failed batches")
    finally:
        publisher.stopping.set()
        if publisher.is_alive():
            publisher.join(10)
        if router is not None:
            router.close()
        if client is not None:
            client.close()


def _subscribers(client: redis.RedisCluster, channel: str) -> int:
    """Subscribers of `channel` over every node: PUBLISH reaches them all, wherever they subscribed."""
    total = 0
    for node in client.get_nodes():
        total += dict(client.pubsub_numsub(channel, target_nodes=node)).get(channel.encode(), 0)
    return total

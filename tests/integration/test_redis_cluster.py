"""The router on a real Redis Cluster (three primaries on loopback, started here, DECISION_ROUTER_REDIS_CLUSTER
on): `serve --workers 2` routes a backlog exactly once, dead-letters rejects and hears a rules reload request;
the CLI publishes and checks health, the API takes predictions and actions, `simulate` runs and cleans up.
Without the setting, the plain client is refused with a hint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import redis

from decision_router import metrics
from decision_router.api.server import api_for_service
from decision_router.keys import Keys
from decision_router.rules import load_rules
from decision_router.service import running_service
from decision_router.settings import Settings, hash_tag
from decision_router.store import create_schema, make_engine
from decision_router.streams import as_text
from decision_router.tokens import create_token
from decision_router.tracker import alert_id_for
from tests.conftest import unavailable
from tests.integration.cluster_helpers import ClusterUnavailable, LocalCluster
from tests.integration.conftest import RULES_DIR, wait_until
from tests.integration.test_api_access import ALICE, ELENA, RULE
from tests.integration.test_api_endpoints import metric
from tests.integration.test_faults_helpers import (
    ROOT,
    PostgresSchema,
    Router,
    all_acknowledged,
    assert_exactly_once,
    backlog_document,
    publish_backlog,
    wait_for,
)
from tests.integration.test_router_loop import prediction

pytestmark = pytest.mark.redis  # redis-server and redis-cli; not the shared server

GROUP = "decision-router"


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster()
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        unavailable("a local Redis Cluster (redis-server and redis-cli)", exc)
    yield cluster
    cluster.close()


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decision_router", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)


def rejects(run: str) -> dict[str, str]:
    """Entry data -> the reason the gate gives it."""
    out_of_range = {**backlog_document(0, f"{run}-bad"), "score": 1.5}
    no_id = {**backlog_document(1, f"{run}-bad"), "prediction_id": ""}
    return {"not json": "invalid_json", json.dumps(out_of_range): "score_out_of_range", json.dumps(no_id): "missing_id"}


@pytest.mark.postgres
def test_workers_on_a_cluster_route_a_backlog_exactly_once_and_hear_a_reload(
    local_cluster: LocalCluster, schema: PostgresSchema, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    prefix = f"{{cl-{run}}}:"  # one tag: every key of the deployment in one slot
    keys = Keys(prefix)
    client = redis.RedisCluster.from_url(local_cluster.url)
    # Not the node owning the slot: the router must follow the cluster, not just talk to one node.
    url = local_cluster.url_not_owning(keys.predictions)
    settings = {"redis_url": url, "redis_cluster": "true", "database_url": schema.url(), "stream_prefix": prefix}
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECISION_ROUTER_")}
    env.update({f"DECISION_ROUTER_{k.upper()}": v for k, v in settings.items()})
    router = None
    try:
        documents = publish_backlog(client, keys.predictions, 2_000, run=run)
        bad = rejects(run)
        ids = {as_text(client.xadd(keys.predictions, {"data": data})): reason for data, reason in bad.items()}
        router = Router(tmp_path / "router.log", workers=2, consumer_name="box", batch_size="200", **settings)
        router.wait_started(times=2)

        # The CLI's client: publish (a pipelined XADD) and health (PING) through the cluster.
        extra = [backlog_document(n, run) for n in range(2_000, 2_010)]
        for document in extra:
            document["predicted_at"] = datetime.now(UTC).isoformat()
        (tmp_path / "more.jsonl").write_text("".join(json.dumps(d) + "\n" for d in extra))
        published = cli("publish", str(tmp_path / "more.jsonl"), env=env)
        assert published.returncode == 0, published.stderr
        assert f"published 10 predictions to {keys.predictions}" in published.stdout
        health = cli("health", env=env)
        assert health.returncode == 0, health.stderr

        total = len(documents) + len(bad) + len(extra)
        wait_for(all_acknowledged(client, keys, GROUP, total), timeout=45, what="the whole backlog")
        consumers = {as_text(c["name"]) for c in client.xinfo_consumers(keys.predictions, GROUP)}
        assert consumers == {"box-1", "box-2"}, "both workers read from the one group"

        # Each worker's subscriber (on the node of the channel's slot) hears it, and reloads.
        notified = client.publish(keys.rules_reload, json.dumps({"by": "test", "origin": None}))
        wait_for(lambda: router.said("rules reload requested") == 2, timeout=10, what="both workers to reload")
        assert notified == 2, "PUBLISH counted both subscribed workers"

        router.stop_cleanly()
        dead = {as_text(f[b"source_id"]): as_text(f[b"reason"]) for _, f in client.xrange(keys.predictions_dlq)}
        assert dead == ids, "each reject on the DLQ once, with its reason"
        assert_exactly_once(client, keys, schema.engine, documents + extra, rejected=len(bad))
        assert "Traceback" not in router.log(), router.log()[-4000:]
    finally:
        if router is not None:
            router.close()
        client.close()  # the cluster is the tests' own, removed at the end of the session


@pytest.mark.parametrize("command", ["serve", "publish", "outcome"])
def test_a_plain_client_on_a_cluster_node_is_one_error_line_with_a_hint(
    local_cluster: LocalCluster, tmp_path: Path, command: str
) -> None:
    """Without DECISION_ROUTER_REDIS_CLUSTER the router and the CLI talk to one node, which redirects them
    (MOVED); PING still answers, so the first command on a key fails."""
    prefix = f"plain-{uuid.uuid4().hex[:8]}:"
    keys = Keys(prefix)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECISION_ROUTER_")}
    # Not the node owning either input stream's slot (they differ: no tag).
    env.update({
        "DECISION_ROUTER_REDIS_URL": local_cluster.url_not_owning(keys.predictions, keys.outcomes),
        "DECISION_ROUTER_STREAM_PREFIX": prefix,
        "DECISION_ROUTER_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}",
        "DECISION_ROUTER_RULES_DIR": str(ROOT / "rules"),
    })
    (tmp_path / "one.jsonl").write_text(json.dumps(backlog_document(0, "plain")) + "\n")
    args = {
        "serve": ["serve", "--no-api"],
        "publish": ["publish", str(tmp_path / "one.jsonl")],
        "outcome": ["outcome", "acknowledged", "--actor", "crm", "--prediction", "plain-0"],
    }[command]
    result = cli(*args, env=env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    assert "a redirection: this Redis is a cluster node; set DECISION_ROUTER_REDIS_CLUSTER=true" in last


async def test_the_api_on_a_cluster_publishes_acts_on_alerts_and_broadcasts_a_reload(
    local_cluster: LocalCluster, tmp_path: Path
) -> None:
    """`serve`'s API in process, on the cluster client: predictions in (pipelined XADD), routed by the
    service, reassigned (an outcome entry, an inbox write), readiness and lag read, a reload published."""
    prefix = f"{{api-{uuid.uuid4().hex[:8]}}}:"
    keys = Keys(prefix)
    settings = Settings(
        redis_url=local_cluster.url_not_owning(keys.predictions), redis_cluster=True, stream_prefix=prefix,
        database_url=f"sqlite:///{tmp_path / 'store.db'}", rules_dir=RULES_DIR, consumer_name="w1", api_port=0,
        claim_idle=0.2, batch_size=50,
    )
    engine = make_engine(settings.database_url)
    create_schema(engine)
    ruleset = load_rules(RULES_DIR)
    admin = {"Authorization": f"Bearer {create_token(engine, role='admin')[0]}"}
    client = redis.RedisCluster.from_url(local_cluster.url)
    alert_id = alert_id_for("c1", RULE)
    try:
        async with running_service(settings, ruleset, engine, watch_rules=True) as service:
            async with api_for_service(service, engine) as server:
                assert server is not None
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
                    assert (await http.get("/readyz")).status_code == 200
                    posted = await http.post("/v1/predictions", json=[prediction("c1"), prediction("c2", score=2)],
                                             headers=admin)
                    assert posted.status_code == 202, posted.text
                    assert (posted.json()["accepted"], posted.json()["rejected"]) == (1, 1)
                    await wait_until(lambda: client.xlen(keys.inbox(ALICE)) == 1, what="c1 in Alice's inbox")
                    moved = await http.post(f"/v1/alerts/{alert_id}/reassign", json={"owner": ELENA}, headers=admin)
                    assert moved.status_code < 300, moved.text
                    await wait_until(lambda: client.xlen(keys.inbox(ELENA)) == 1, what="c1 reassigned to Elena")
                    reloaded = (await http.post("/v1/rules/reload", headers=admin)).json()
                    assert reloaded["notified_processes"] == 1, "this process's subscriber, on the channel's node"
                    metrics.set_group_state("predictions", GROUP, lag=99, pending=99)  # overwritten by a scrape
                    scraped = (await http.get("/metrics", headers=admin)).text
                    labels = {"stream": "predictions", "group": GROUP}
                    assert metric(scraped, "decision_router_consumer_group_lag", **labels) == 0, "XINFO read"
                    assert metric(scraped, "decision_router_consumer_group_pending", **labels) == 0
        assert [as_text(f[b"reason"]) for _, f in client.xrange(keys.predictions_dlq)] == ["score_out_of_range"]
    finally:
        client.close()
        engine.dispose()


def test_simulate_on_a_cluster_runs_under_a_tagged_prefix_and_removes_its_keys(local_cluster: LocalCluster) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECISION_ROUTER_")}
    env.update({"DECISION_ROUTER_REDIS_CLUSTER": "true", "DECISION_ROUTER_STREAM_PREFIX": "{dr}:"})
    result = cli("simulate", "--redis", local_cluster.url, "--days", "3", "--entities", "200", "--format", "json",
                 env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    prefix = report["stream_prefix"]
    assert hash_tag(prefix) is not None, prefix
    assert report["simulated"]["treated"] > 0, "alerts were seen in inboxes"
    with redis.RedisCluster.from_url(local_cluster.url) as client:
        assert list(client.scan_iter(match=f"{prefix}*")) == [], "removed from every node after the run"


def test_the_whole_cluster_down_is_waited_out_and_routing_resumes(tmp_path: Path) -> None:
    """With no node reachable the cluster client raises its own error (no ConnectionError): the read
    loop must wait it out as an outage, then route what arrives once the nodes are back, and the rules
    reload subscriber listen again."""
    cluster = LocalCluster(persistent=True)
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        unavailable("a local Redis Cluster (redis-server and redis-cli)", exc)
    prefix = f"{{down-{uuid.uuid4().hex[:8]}}}:"
    keys = Keys(prefix)
    router = None
    try:
        with redis.RedisCluster.from_url(cluster.url) as client:
            first = publish_backlog(client, keys.predictions, 100, run="before")
        router = Router(tmp_path / "router.log", redis_url=cluster.url, redis_cluster="true", stream_prefix=prefix,
                        database_url=f"sqlite:///{tmp_path / 'store.db'}", claim_idle="1s")
        router.wait_started()
        with redis.RedisCluster.from_url(cluster.url) as client:
            wait_for(all_acknowledged(client, keys, GROUP, 100), timeout=30, what="the first backlog")
        cluster.kill()
        wait_for(lambda: router.said("Redis unavailable; retrying in 0.2s") == 1, timeout=15, what="the outage")
        cluster.restart()
        with redis.RedisCluster.from_url(cluster.url) as client:
            second = publish_backlog(client, keys.predictions, 100, run="after", start=100)
            wait_for(all_acknowledged(client, keys, GROUP, 200), timeout=30, what="the second backlog")
            # The reload subscriber is back too (it resubscribes every second until Redis answers).
            wait_for(lambda: client.publish(keys.rules_reload, "{}") == 1, timeout=15, what="the resubscription")
            wait_for(lambda: router.said("rules reload requested") == 1, timeout=10, what="the reload")
            router.stop_cleanly()
            engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
            try:
                assert_exactly_once(client, keys, engine, first + second)
            finally:
                engine.dispose()
        errors = [e for e in router.events() if e.get("level") == "error" and not _redis_py_writer_race(e)]
        assert not errors, f"an outage, not a bug: {errors[:2]}"
        assert router.said("Redis reachable again") == 1
    finally:
        if router is not None:
            router.close()
        cluster.close()


def _redis_py_writer_race(event: dict) -> bool:
    """redis-py 8.1 writing on a connection another task just dropped, as the nodes come back: an
    AttributeError where a ConnectionError belongs (redis-py issue 4287, fixed after 8.1.0). A periodic
    job logs it once and retries; it is not this code's to hide."""
    return any("object has no attribute 'writelines'" in str(e.get("exc_value")) for e in event.get("exception", []))

"""`decision-router serve --workers N`: N processes in one consumer group route each prediction
once; a worker that dies is restarted under its name; SIGTERM stops them all cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from decision_router.keys import Keys
from decision_router.store import make_engine
from decision_router.streams import as_text
from decision_router.tokens import create_token
from tests.integration.test_api_endpoints import metric
from tests.integration.test_faults_helpers import (
    ROOT,
    Router,
    all_acknowledged,
    assert_exactly_once,
    backlog_document,
    publish_backlog,
    wait_for,
)

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


def test_two_workers_route_a_backlog_exactly_once_and_a_dead_worker_is_restarted(
    prefix, schema, redis_server, tmp_path
) -> None:
    client = redis.Redis.from_url(redis_server)
    keys = Keys(prefix)
    documents = publish_backlog(client, keys.predictions, 4_000)
    router = Router(tmp_path / "router.log", workers=2, redis_url=redis_server, database_url=schema.url(),
                    stream_prefix=prefix, consumer_name="box", batch_size="100", claim_idle="1s")
    try:
        router.wait_started(times=2)
        (started,) = [e for e in router.events() if e.get("event") == "workers started"]
        assert started["workers"] == ["box-1", "box-2"]
        first_pid = started["pids"][0]
        # entries-read is nil (None) until the group's first read: the group is created at id 0.
        wait_for(lambda: (client.xinfo_groups(keys.predictions)[0]["entries-read"] or 0) >= 1_000, timeout=60,
                 what="the workers to get going")
        os.kill(first_pid, signal.SIGKILL)
        wait_for(lambda: router.said("worker restarted") == 1, timeout=30, what="the dead worker's restart")
        wait_for(lambda: router.said("router started") >= 3, timeout=30, what="the restarted worker to start")
        wait_for(all_acknowledged(client, keys, "decision-router", 4_000), timeout=120, what="the whole backlog")
        consumers = {c["name"] for c in client.xinfo_consumers(keys.predictions, "decision-router")}
        assert consumers == {b"box-1", b"box-2"}, "two consumers, the restarted one under its old name"
        stopped = time.monotonic()
        router.stop_cleanly()
        print(f"\n--workers 2: SIGTERM to all stopped {time.monotonic() - stopped:.2f}s")
        assert router.said("workers stopped") == 1
        assert router.said("stopping") == 2, router.log()[-4000:]  # each worker stopped on the forwarded signal"
        assert_exactly_once(client, keys, schema.engine, documents)
    finally:
        router.close()
        client.close()


def test_workers_stop_cleanly_when_their_supervisor_alone_is_killed_and_a_restart_finishes_the_backlog(
    prefix, schema, redis_server, tmp_path
) -> None:
    """The OOM killer (or `kill -9 PID`) ends the supervisor alone. Its workers must not route on
    unsupervised, beside the workers of the supervisor started next under the same names (holding the
    API port, serving /metrics from a directory that supervisor removes): each stops as on SIGTERM,
    finishing its batch, and the restarted supervisor routes the rest exactly once."""
    client = redis.Redis.from_url(redis_server)
    keys = Keys(prefix)
    documents = publish_backlog(client, keys.predictions, 6_000)
    settings = {"redis_url": redis_server, "database_url": schema.url(), "stream_prefix": prefix,
                "consumer_name": "box", "batch_size": "100"}
    killed = Router(tmp_path / "killed.log", workers=2, **settings)
    try:
        killed.wait_started(times=2)
        (started,) = [e for e in killed.events() if e.get("event") == "workers started"]
        wait_for(lambda: (client.xinfo_groups(keys.predictions)[0]["entries-read"] or 0) >= 500, timeout=60,
                 what="the workers to get going")
        os.kill(killed.process.pid, signal.SIGKILL)  # the supervisor only, not its process group
        killed.process.wait()

        def gone(pid: int) -> bool:
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    return stat.read().rpartition(")")[2].split()[0] in ("Z", "X")
            except OSError:
                return True

        wait_for(lambda: all(gone(pid) for pid in started["pids"]), timeout=60,
                 what="the killed supervisor's workers to stop")
        assert killed.said("the supervisor is gone; stopping") == 2, killed.log()[-4000:]
        assert killed.said("stopping") == 2, killed.log()[-4000:]  # as on SIGTERM: the batch in hand finished
        pending = client.xpending(keys.predictions, "decision-router")["pending"]
        assert pending == 0, "a worker stopped without finishing its batch"
        after = Router(tmp_path / "after.log", workers=2, **settings)
        try:
            after.wait_started(times=2)
            wait_for(all_acknowledged(client, keys, "decision-router", 6_000), timeout=120, what="the whole backlog")
            after.stop_cleanly()
        finally:
            after.close()
        assert_exactly_once(client, keys, schema.engine, documents)
    finally:
        killed.close()
        client.close()


def test_a_killed_supervisors_metrics_directory_is_removed_at_the_next_start(
    prefix, redis_server, tmp_path, monkeypatch
) -> None:
    """SIGKILL leaves the supervisor no time to remove its metrics directory; the next `serve
    --workers` on the machine removes it (a container restarting after crashes keeps its /tmp)."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))  # the supervisors' tempfile.gettempdir()
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    settings = {"redis_url": redis_server, "database_url": f"sqlite:///{tmp_path / 'store.db'}",
                "stream_prefix": prefix, "consumer_name": "box"}
    killed = Router(tmp_path / "killed.log", workers=2, **settings)
    try:
        killed.wait_started(times=2)
        (left,) = temporary.glob("decision-router-metrics-*")
        killed.kill()  # the supervisor and its workers at once, as the OOM killer or a container's end would
        assert left.exists()
        after = Router(tmp_path / "after.log", workers=2, **settings)
        try:
            after.wait_started(times=2)
            assert not left.exists()
            assert len(list(temporary.glob("decision-router-metrics-*"))) == 1  # its own
            after.stop_cleanly()
        finally:
            after.close()
    finally:
        killed.close()
    assert after.said("removed the metrics directory of a supervisor that was killed") == 1
    assert list(temporary.iterdir()) == []  # its own too, at its clean stop


def test_workers_refused_on_the_embedded_redis(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECISION_ROUTER_")}
    env["DECISION_ROUTER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'store.db'}"
    result = subprocess.run([sys.executable, "-m", "decision_router", "serve", "--workers", "2"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "--workers needs a real Redis: set DECISION_ROUTER_REDIS_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_with_workers_the_first_one_serves_the_api_and_only_it(redis_server: str, tmp_path) -> None:
    """One port, one listener: worker 1 serves the HTTP API, the others run consumers only; SIGHUP
    reaches the workers without stopping anything."""
    import shutil

    import httpx

    from tests.e2e.helpers import free_port

    port = free_port()
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECISION_ROUTER_")}
    env.update(
        DECISION_ROUTER_REDIS_URL=redis_server,
        DECISION_ROUTER_STREAM_PREFIX=f"workers-api-{port}:",
        DECISION_ROUTER_DATABASE_URL=f"sqlite:///{tmp_path / 'store.db'}",
        DECISION_ROUTER_RULES_DIR=str(rules),
        DECISION_ROUTER_RULES_POLL_INTERVAL="0",  # only SIGHUP reloads
        DECISION_ROUTER_API_PORT=str(port),
        DECISION_ROUTER_LOG_FORMAT="json",
        DECISION_ROUTER_CONSUMER_NAME="box",
        DECISION_ROUTER_BATCH_SIZE="20",
    )
    log_path = tmp_path / "serve.log"
    log_file = log_path.open("w")
    process = subprocess.Popen([sys.executable, "-m", "decision_router", "serve", "--workers", "2"], env=env,
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the API never came up"
            time.sleep(0.2)
        # Both workers started (not a fixed second after worker 1's API: on a busy machine worker 2 could still
        # be starting, and a SIGHUP before its handler is installed ends it). A second listener on the same port
        # would have failed by then.
        wait_for(lambda: log_path.read_text().count('"router started"') == 2 or process.poll() is not None,
                 timeout=60, what="both workers to start")
        assert process.poll() is None, log_path.read_text()[-3000:]
        # SIGHUP (re-read the rules) goes on to the workers; the supervisor keeps running.
        with (rules / "routing.yaml").open("a") as routing:
            routing.write("\n# edited: a new version of the same rules\n")
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: log_path.read_text().count('"rules reloaded"') == 2 or process.poll() is not None,
                 timeout=30, what="each worker to re-read its rules")
        assert process.poll() is None, log_path.read_text()[-3000:]
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        # /metrics, served by worker 1, counts what both workers routed.
        client = redis.Redis.from_url(redis_server)
        keys = Keys(f"workers-api-{port}:")
        total = 600
        documents = [backlog_document(n, f"m{port}") for n in range(total)]
        for chunk in range(0, total, 10):  # a trickle, so that both blocked workers are handed entries
            with client.pipeline(transaction=False) as pipe:
                for document in documents[chunk:chunk + 10]:
                    pipe.xadd(keys.predictions, {"data": json.dumps(document)})
                pipe.execute()
            time.sleep(0.005)
        wait_for(all_acknowledged(client, keys, "decision-router", total), timeout=60, what="the predictions routed")
        consumers = {as_text(c["name"]) for c in client.xinfo_consumers(keys.predictions, "decision-router")}
        assert consumers == {"box-1", "box-2"}, consumers  # both were handed some
        client.close()
        engine = make_engine(env["DECISION_ROUTER_DATABASE_URL"])
        secret, _ = create_token(engine, role="ops")
        engine.dispose()
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {secret}"},
                            timeout=5)
        assert scraped.status_code == 200, scraped.text
        assert metric(scraped.text, "decision_router_entries_consumed_total", stream="predictions") == total
        assert metric(scraped.text, "decision_router_predictions_routed_total") == total
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        log_file.close()
        stderr = log_path.read_text()
        client = redis.Redis.from_url(redis_server)
        stale = list(client.scan_iter(match=f"workers-api-{port}:*"))  # the groups' streams on the shared Redis
        if stale:
            client.delete(*stale)
        client.close()
    assert process.returncode == 0, stderr[-3000:]
    assert "Address already in use" not in stderr and "cannot listen" not in stderr
    assert "Traceback" not in stderr
    assert stderr.count('"rules reloaded"') == 2, stderr[-3000:]  # each worker re-read its rules


def test_a_sighup_while_the_workers_start_is_acted_on_once_they_listen(redis_server: str, tmp_path) -> None:
    """SIGHUP to the supervisor as soon as it has spawned the workers: passed on to workers still starting, it
    ended them (SIGHUP's default action, before their handler), and they were restarted. Held back until each
    worker's service has its handler, it reloads each worker's rules once, and no worker exits."""
    import shutil

    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    prefix = f"workers-hup-{os.getpid()}-{time.monotonic_ns()}:"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECISION_ROUTER_")}
    env.update(
        DECISION_ROUTER_REDIS_URL=redis_server,
        DECISION_ROUTER_STREAM_PREFIX=prefix,
        DECISION_ROUTER_DATABASE_URL=f"sqlite:///{tmp_path / 'store.db'}",
        DECISION_ROUTER_RULES_DIR=str(rules),
        DECISION_ROUTER_RULES_POLL_INTERVAL="0",  # only SIGHUP reloads
        DECISION_ROUTER_LOG_FORMAT="json",
    )
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "decision_router", "serve", "--workers", "2", "--no-api"],
                                   env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            wait_for(lambda: '"workers started"' in log_path.read_text() or process.poll() is not None,
                     timeout=60, what="the supervisor to spawn its workers")
            assert '"router started"' not in log_path.read_text()  # the workers are still starting
            process.send_signal(signal.SIGHUP)
            wait_for(lambda: log_path.read_text().count('"SIGHUP: re-reading the rules"') >= 2
                     or process.poll() is not None, timeout=60, what="each worker to re-read its rules once it listens")
            time.sleep(0.5)  # a restart, had a worker been ended, is logged by now (the supervisor ticks faster)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
            client = redis.Redis.from_url(redis_server)
            stale = list(client.scan_iter(match=f"{prefix}*"))
            if stale:
                client.delete(*stale)
            client.close()
    stderr = log_path.read_text()
    assert process.returncode == 0, stderr[-3000:]
    assert '"worker exited; restarting it"' not in stderr, stderr[-3000:]
    assert stderr.count('"router started"') == 2, stderr[-3000:]
    assert stderr.count('"SIGHUP: re-reading the rules"') == 2, stderr[-3000:]  # once each, not lost, not twice

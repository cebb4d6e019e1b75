"""Hot reload reaching everything it should: every router process on the stream prefix (POST
/v1/rules/reload broadcasts), and the channel receivers (webhooks from owners.yaml are rebuilt,
no queued delivery lost). Real Redis; real `serve --workers 2` processes for the broadcast."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import redis
from redis.asyncio import Redis
from sqlalchemy import select
from sqlmodel import Session

from decision_router import notify
from decision_router.api.server import api_for_service, run_api
from decision_router.keys import Keys
from decision_router.rules import load_rules
from decision_router.service import request_reload, running_service
from decision_router.store import make_engine
from decision_router.tables import AlertRecord, DeliveryRecord
from decision_router.tokens import create_token
from decision_router.tracker import alert_id_for
from tests.integration.conftest import RULES_DIR, wait_until
from tests.integration.test_channels_webhook import ReceiverState, receiver  # noqa: F401  (fixture)
from tests.integration.test_faults_helpers import (
    ROOT,
    PrivateRedis,
    all_acknowledged,
    free_port,
    publish_backlog,
    wait_for,
)
from tests.integration.test_router_loop import count

pytestmark = pytest.mark.redis

# The edit every test makes: enterprise churn goes to the enterprise desk, not the account manager.
ACCOUNT_MANAGER = "owner: {from: context.account_manager, fallback: enterprise-desk}\n    priority: high"
DESK = "owner: enterprise-desk\n    priority: high"


def send_enterprise_churn_to_the_desk(rules_dir: Path) -> None:
    routing = rules_dir / "routing.yaml"
    text = routing.read_text()
    assert text.count(ACCOUNT_MANAGER) == 1
    routing.write_text(text.replace(ACCOUNT_MANAGER, DESK))


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def log_events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_an_api_reload_reaches_every_worker_at_once(redis_server: str, prefix: str, tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECISION_ROUTER_")}
    env.update(
        DECISION_ROUTER_REDIS_URL=redis_server,
        DECISION_ROUTER_STREAM_PREFIX=prefix,
        DECISION_ROUTER_DATABASE_URL=store,
        DECISION_ROUTER_RULES_DIR=str(rules),
        DECISION_ROUTER_RULES_POLL_INTERVAL="1h",  # only the broadcast can explain a reload
        DECISION_ROUTER_BATCH_SIZE="10",  # both workers take part of the backlog
        DECISION_ROUTER_READ_BLOCK_MS="200",
        DECISION_ROUTER_DRIFT_INTERVAL="0",
        DECISION_ROUTER_API_PORT=str(port),
        DECISION_ROUTER_LOG_FORMAT="json",
    )
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "decision_router", "serve", "--workers", "2"], env=env,
                                   cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # one group, so a hang is killed whole
    engine = make_engine(store)
    client = redis.Redis.from_url(redis_server)
    keys = Keys(prefix)
    try:
        wait_for(lambda: log_path.read_text().count('"router started"') == 2 or process.poll() is not None,
                 timeout=60, what="both workers to start")
        assert process.poll() is None, log_path.read_text()[-3000:]
        admin = {"Authorization": f"Bearer {create_token(engine, role='admin')[0]}"}
        # Each worker subscribes before it logs "router started" (or, with Redis slow, 5 s on): check it.
        wait_for(lambda: client.pubsub_numsub(keys.rules_reload)[0][1] == 2, timeout=60,
                 what="both workers to subscribe to reload requests")
        time.sleep(1.0)  # past each worker's first look at the files, which it takes as it starts
        send_enterprise_churn_to_the_desk(rules)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/rules/reload", headers=admin, timeout=10)
        answered = datetime.now(UTC)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["changed"] is True and body["notified_processes"] == 2, body  # both workers subscribe
        new_version = body["rules_version"]

        def reloads() -> list[dict]:
            return [e for e in log_events(log_path.read_text()) if e.get("event") == "rules reloaded"]

        # Worker 1 reloaded to answer; worker 2 on the broadcast, within a second or two (on a quiet
        # machine; a busy one may take longer, and either is far short of the one-hour poll).
        wait_for(lambda: len(reloads()) == 2, timeout=30, what="both workers to reload")
        assert {e["rules_version"] for e in reloads()} == {new_version}
        assert all((datetime.fromisoformat(e["timestamp"]) - answered).total_seconds() < 30 for e in reloads())
        requested = [e for e in log_events(log_path.read_text()) if e.get("event") == "rules reload requested"]
        assert len(requested) == 1, requested  # the API's own worker does not reload twice

        documents = publish_backlog(client, keys.predictions, 400)
        wait_for(all_acknowledged(client, keys, "decision-router", 400), timeout=60, what="the backlog")
        enterprise = {alert_id_for(d["prediction_id"], "enterprise-churn-risk") for d in documents
                      if d["context"]["segment"] == "enterprise" and d["score"] >= 0.8}
        with Session(engine) as session:
            owners = {alert_id: owner for alert_id, owner in session.execute(
                select(AlertRecord.alert_id, AlertRecord.owner).where(AlertRecord.alert_id.in_(enterprise)))}
        assert len(owners) == len(enterprise) == 100
        assert set(owners.values()) == {"enterprise-desk"}  # by the new rules, whichever worker routed it
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail("serve --workers 2 did not stop within 30 s of SIGTERM:\n" + log_path.read_text()[-3000:])
        finally:
            engine.dispose()
            client.close()
    assert code == 0, log_path.read_text()[-3000:]
    assert "Traceback" not in log_path.read_text()


def subscribers(settings) -> int:
    """How many processes listen for reload requests on the settings' prefix (running_service has
    started its subscriber when it returns, not necessarily subscribed)."""
    with redis.Redis.from_url(settings.effective_redis_url) as client:
        return client.pubsub_numsub(Keys(settings.stream_prefix).rules_reload)[0][1]


async def test_an_api_reload_reaches_a_separate_service_which_rereads_its_own_files(
    settings, engine, tmp_path: Path
) -> None:
    """Two `serve` processes (say, two hosts, each with its copy of the rules) on one prefix."""
    here, there = tmp_path / "here", tmp_path / "there"
    for directory in (here, there):
        shutil.copytree(RULES_DIR, directory)
    ruleset = load_rules(here)
    first = settings.model_copy(update={"rules_dir": here, "api_port": 0, "consumer_name": "host-a",
                                        "rules_poll_interval": timedelta(hours=1)})
    second = settings.model_copy(update={"rules_dir": there, "consumer_name": "host-b",
                                         "rules_poll_interval": timedelta(hours=1)})
    admin = {"Authorization": f"Bearer {create_token(engine, role='admin')[0]}"}
    async with (
        running_service(first, ruleset, engine, watch_rules=True) as a,
        running_service(second, ruleset, engine, watch_rules=True) as b,
        api_for_service(a, engine) as server,
    ):
        assert server is not None
        await wait_until(lambda: subscribers(settings) == 2, timeout=30, what="both services to subscribe")
        for directory in (here, there):
            send_enterprise_churn_to_the_desk(directory)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            body = (await client.post("/v1/rules/reload", headers=admin)).json()
        assert body["changed"] is True and body["notified_processes"] == 2
        assert a.pipeline.ruleset.version == body["rules_version"]
        await wait_until(lambda: b.pipeline.ruleset.version == body["rules_version"], timeout=30,
                         what="the other service to reload")
        # Unchanged files: nothing to swap anywhere, and the answer says so.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            again = (await client.post("/v1/rules/reload", headers=admin)).json()
        assert again["changed"] is False and again["rules_version"] == body["rules_version"]


async def test_a_reload_rebuilds_the_webhook_receivers_and_loses_no_queued_delivery(
    settings, engine, tmp_path: Path, receiver: ReceiverState, r, monkeypatch  # noqa: F811
) -> None:
    monkeypatch.setattr(notify, "CLOSE_TIMEOUT_S", 0.5)  # how long the replaced dispatcher may finish
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "routing.yaml").write_text(
        "defaults: {ack_within: 1h, act_within: 4h}\n"
        "rules:\n  - {name: churn, when: {model: churn}, owner: {from: context.account_manager, fallback: am}}\n"
        "  - {name: rest, when: {}, owner: am, action: record}\n"
    )
    owners = rules_dir / "owners.yaml"

    def write_owners(am_path: str, new_owner_webhook: bool) -> None:
        new = (f"channels: [inbox, webhook], webhook: {{url: '{receiver.url('/ok/new')}'}}"
               if new_owner_webhook else "channels: [inbox]")
        owners.write_text(
            "owners:\n"
            f"  - {{id: am, name: AM, channels: [inbox, webhook], webhook: {{url: '{receiver.url(am_path)}', timeout_s: 30}}}}\n"
            f"  - {{id: new, name: New, {new}}}\n"
        )

    write_owners("/hang/am", new_owner_webhook=False)  # am's receiver hangs: its delivery stays in flight
    tuned = settings.model_copy(update={"rules_dir": rules_dir, "rules_poll_interval": timedelta(0)})
    keys = Keys(settings.stream_prefix)

    def publish(pid: str, manager: str) -> None:
        r.xadd(keys.predictions, {"data": json.dumps({
            "prediction_id": pid, "model": "churn", "model_version": "1", "entity_type": "account",
            "entity_id": f"acct-{pid}", "score": 0.9, "predicted_at": datetime.now(UTC).isoformat(),
            "context": {"account_manager": manager},
        })})

    def delivered_to(path: str) -> list[str]:
        return [json.loads(request.body)["alert_id"] for request in receiver.to(path)]

    async with running_service(tuned, load_rules(rules_dir), engine, watch_rules=True) as service:
        publish("p-am", "am")
        await wait_until(lambda: len(receiver.to("/hang/am")) == 1, what="am's delivery in flight")
        # Edit owners.yaml: am's webhook moves, and `new` gets one. Then reload, as SIGHUP or the API do.
        write_owners("/ok/am-moved", new_owner_webhook=True)
        await service.check_rules(force=True)
        assert set(service.pipeline.channels.receivers) == {"am:webhook", "new:webhook"}
        publish("p-new", "new")
        await wait_until(lambda: delivered_to("/ok/new") == [alert_id_for("p-new", "churn")], what="new's webhook")
        # The delivery the old dispatcher could not finish went back to the outbox and out to the new URL.
        await wait_until(lambda: delivered_to("/ok/am-moved") == [alert_id_for("p-am", "churn")], timeout=15,
                         what="am's delivery at its new address")
        await wait_until(lambda: count(engine, DeliveryRecord, DeliveryRecord.status == "delivered") == 2,
                         what="both rows delivered")
    with Session(engine) as session:
        rows = {row.alert_id: (row.recipient, row.status) for row in session.scalars(select(DeliveryRecord))}
    assert rows == {alert_id_for("p-am", "churn"): ("am", "delivered"), alert_id_for("p-new", "churn"): ("new", "delivered")}


async def test_reloads_at_once_leave_the_receivers_of_the_last_rules_read(
    settings, engine, tmp_path: Path, monkeypatch
) -> None:
    """The poll, SIGHUP, the API and the broadcast can each start a reload; one that read older
    files must not finish after a newer one and put its receivers back (the watcher already
    holds the newer rules, so no later check would repair it)."""
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "routing.yaml").write_text(
        "rules:\n  - {name: churn, when: {model: churn}, owner: am}\n  - {name: rest, when: {}, owner: am, action: record}\n"
    )

    def write_owners(path: str) -> None:
        (rules_dir / "owners.yaml").write_text(
            f"owners:\n  - {{id: am, name: AM, channels: [inbox, webhook], webhook: {{url: 'http://127.0.0.1:9{path}'}}}}\n"
        )

    write_owners("/v1")
    tuned = settings.model_copy(update={"rules_dir": rules_dir, "rules_poll_interval": timedelta(0)})
    async with running_service(tuned, load_rules(rules_dir), engine, watch_rules=True) as service:
        channels = service.pipeline.channels
        configure = channels._configure
        first_in, release_first = threading.Event(), threading.Event()

        def first_is_slow(ruleset):
            if not first_in.is_set():
                first_in.set()
                assert release_first.wait(10)
            return configure(ruleset)

        monkeypatch.setattr(channels, "_configure", first_is_slow)
        write_owners("/v2")
        first = asyncio.create_task(service.check_rules(force=True))
        assert await asyncio.to_thread(first_in.wait, 10)  # read v2; rebuilding its receivers
        write_owners("/v3")
        second = asyncio.create_task(service.check_rules(force=True))
        # Unserialised, the second reload finishes meanwhile; serialised, it waits for the first's lock. Waited for,
        # not a fixed second: on a busy machine an unserialised second reload could take longer than that.
        await wait_until(lambda: second.done() or bool(service.rules.reloading._waiters),
                         what="the second reload to finish or to wait for the first")
        release_first.set()
        await asyncio.gather(first, second)
        assert service.pipeline.ruleset.version == load_rules(rules_dir).version
        assert str(channels.receivers["am:webhook"].url).endswith("/v3")


async def test_a_standalone_api_named_like_a_router_still_reaches_it(settings, engine, tmp_path: Path) -> None:
    """`decision-router api` and `serve` sharing one environment (one DECISION_ROUTER_CONSUMER_NAME):
    only the process whose API reloaded may skip the broadcast, not every process of that name."""
    here, there = tmp_path / "here", tmp_path / "there"
    for directory in (here, there):
        shutil.copytree(RULES_DIR, directory)
    port = free_port()
    api_settings = settings.model_copy(update={"rules_dir": here, "api_port": port, "consumer_name": "router"})
    router_settings = settings.model_copy(update={"rules_dir": there, "consumer_name": "router",
                                                  "rules_poll_interval": timedelta(hours=1)})
    stop = asyncio.Event()
    admin = {"Authorization": f"Bearer {create_token(engine, role='admin')[0]}"}
    redis_client = Redis.from_url(settings.effective_redis_url)
    async with running_service(router_settings, load_rules(there), engine, watch_rules=True) as router:
        api = asyncio.create_task(run_api(api_settings, load_rules(here), engine, redis_client, stop))
        try:
            await wait_until(lambda: listening(port) or api.done(), what="the API to listen")
            # The standalone API follows reload requests too (and skips its own).
            await wait_until(lambda: subscribers(settings) == 2, timeout=30, what="the router and the API to subscribe")
            for directory in (here, there):
                send_enterprise_churn_to_the_desk(directory)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                body = (await client.post("/v1/rules/reload", headers=admin)).json()
            assert body["changed"] is True and body["notified_processes"] == 2, body
            await wait_until(lambda: router.pipeline.ruleset.version == body["rules_version"], timeout=30,
                             what="the router to reload")
        finally:
            stop.set()
            await api
            await redis_client.aclose()


async def test_the_reload_subscriber_outlives_a_redis_restart(settings, engine, tmp_path: Path) -> None:
    """Its connection dies with the server; it must subscribe again, not end quietly."""
    private = PrivateRedis(tmp_path).start()
    rules = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules)
    tuned = settings.model_copy(update={"redis_url": private.url, "rules_dir": rules,
                                        "rules_poll_interval": timedelta(hours=1)})
    keys = Keys(tuned.stream_prefix)
    asker, probe = Redis.from_url(private.url), redis.Redis.from_url(private.url)
    try:
        async with running_service(tuned, load_rules(rules), engine, watch_rules=True) as service:
            await wait_until(lambda: probe.pubsub_numsub(keys.rules_reload)[0][1] == 1, what="the subscription")
            private.kill()
            private.start()
            send_enterprise_churn_to_the_desk(rules)
            version = load_rules(rules).version

            async def ask_until_reloaded() -> bool:
                # A request published before it has subscribed again is not seen (the poll catches those).
                with contextlib.suppress(redis.RedisError):
                    await request_reload(asker, keys, rules_version=version, by="test", origin=None)
                return service.pipeline.ruleset.version == version

            deadline = time.monotonic() + 15
            while not await ask_until_reloaded():
                assert time.monotonic() < deadline, "the service no longer follows reload requests"
                await asyncio.sleep(0.2)
    finally:
        await asker.aclose()
        probe.close()
        private.close()


async def test_a_sighup_reload_is_held_until_done_and_its_failure_logged(settings, engine, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """SIGHUP starts a reload from a signal handler: the task must be held (the loop keeps only a
    weak reference), the service's stop must wait for it, and a failure must be logged."""
    from structlog.testing import capture_logs

    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    tuned = settings.model_copy(
        update={"rules_dir": rules_dir, "rules_poll_interval": timedelta(0), "read_block_ms": 100}
    )
    entered, release = threading.Event(), threading.Event()
    with capture_logs() as logs:
        async with running_service(tuned, load_rules(rules_dir), engine, watch_rules=True) as service:
            channels = service.pipeline.channels

            def slow_then_broken(ruleset):
                entered.set()
                assert release.wait(10)
                # Longer than the rest of a stop (the read loop's last block, tuned to 0.1 s here): a stop
                # that did not wait for the reload would be done before it.
                time.sleep(1.0)
                raise RuntimeError("receivers could not be rebuilt")

            monkeypatch.setattr(channels, "_configure", slow_then_broken)
            send_enterprise_churn_to_the_desk(rules_dir)
            service.reload_now()
            assert await asyncio.to_thread(entered.wait, 10)
            [held] = [t for t in service._tasks if t.get_name() == "rules-sighup"]
            assert not held.done()

            async def release_once_stopping() -> None:
                await service._stopping.wait()
                release.set()

            releaser = asyncio.create_task(release_once_stopping())
        # Leaving running_service stopped the service: that waited for the reload, released only once stopping.
        assert held.done() and held.exception() is None
        await releaser
    [failure] = [e for e in logs if e["event"] == "rules reload failed"]
    assert failure["log_level"] == "error" and "receivers could not be rebuilt" in str(failure.get("exc_info"))


async def test_a_started_service_already_follows_reload_requests(settings, engine, tmp_path: Path) -> None:
    """Once start() returns (and "router started" is logged), a published request reaches the service:
    before, the subscriber subscribed some time after, and a request meanwhile waited for the file poll."""
    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    tuned = settings.model_copy(update={"rules_dir": rules_dir, "rules_poll_interval": timedelta(hours=1)})
    keys = Keys(tuned.stream_prefix)
    async with running_service(tuned, load_rules(rules_dir), engine, watch_rules=True) as service:
        before = service.pipeline.ruleset.version
        send_enterprise_churn_to_the_desk(rules_dir)
        received = await request_reload(service.pipeline.redis, keys, rules_version="?", by="test", origin=None)
        assert received == 1
        await wait_until(lambda: service.pipeline.ruleset.version != before, timeout=30, what="the reload")



# A standalone `decision-router api` (run_api) follows rule changes as `serve` does. What it shows: the
# owner directory its stats filter checks (an owner unknown to the rules and the store is a 422).
NEW_OWNER = "  - {id: new-hire, name: New Hire, channels: [inbox]}\n"


def add_an_owner(rules_dir: Path) -> None:
    owners = rules_dir / "owners.yaml"
    owners.write_text(owners.read_text() + NEW_OWNER)


class StandaloneApi:
    def __init__(self, port: int, engine) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.ops = {"Authorization": f"Bearer {create_token(engine, role='ops')[0]}"}

    def new_hire(self) -> int:
        """GET /v1/stats?owner=new-hire: 422 while the API's rules lack the owner, 200 once they have it."""
        return httpx.get(f"{self.url}/v1/stats", params={"owner": "new-hire"}, headers=self.ops, timeout=10).status_code


@contextlib.asynccontextmanager
async def standalone_api(settings, engine, rules_dir: Path, **update):
    """run_api on its own rules directory, until the block ends."""
    port = free_port()
    tuned = settings.model_copy(update={"rules_dir": rules_dir, "api_port": port, **update})
    stop, redis_client = asyncio.Event(), Redis.from_url(settings.effective_redis_url)
    api = asyncio.create_task(run_api(tuned, load_rules(rules_dir), engine, redis_client, stop))
    try:
        await wait_until(lambda: listening(port) or api.done(), what="the API to listen")
        assert not api.done()
        yield StandaloneApi(port, engine)
    finally:
        stop.set()
        await api
        await redis_client.aclose()


async def test_a_standalone_api_picks_up_an_edit_at_its_next_poll(settings, engine, tmp_path: Path) -> None:
    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    async with standalone_api(settings, engine, rules_dir, rules_poll_interval=timedelta(seconds=1)) as api:
        assert await asyncio.to_thread(api.new_hire) == 422
        add_an_owner(rules_dir)
        # Nothing else reloads it (no SIGHUP, no request); it polls every second.
        await wait_until(lambda: api.new_hire() == 200, timeout=20, what="the API to see the new owner")


async def test_a_standalone_api_follows_a_reload_requested_elsewhere(settings, engine, tmp_path: Path) -> None:
    """POST /v1/rules/reload on any process publishes on `<prefix>rules:reload`: an `api` running alone
    re-reads its own files then, not only when its own endpoint is called."""
    from structlog.testing import capture_logs

    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    keys = Keys(settings.stream_prefix)
    asker = Redis.from_url(settings.effective_redis_url)
    try:
        with capture_logs() as logs:
            async with standalone_api(settings, engine, rules_dir, rules_poll_interval=timedelta(hours=1)) as api:
                assert await asyncio.to_thread(subscribers, settings) == 1  # subscribed before it listens
                assert await asyncio.to_thread(api.new_hire) == 422
                add_an_owner(rules_dir)
                received = await request_reload(asker, keys, rules_version="?", by="elsewhere", origin=None)
                assert received == 1
                await wait_until(lambda: api.new_hire() == 200, timeout=20, what="the API to follow the request")
    finally:
        await asker.aclose()
    [requested] = [e for e in logs if e["event"] == "rules reload requested"]
    assert requested["by"] == "elsewhere"
    [reloaded] = [e for e in logs if e["event"] == "rules reloaded"]
    assert reloaded["rules_version"] == load_rules(rules_dir).version != reloaded["previous"]


async def test_a_standalone_api_reloads_once_for_its_own_request(settings, engine, tmp_path: Path) -> None:
    """Its own POST /v1/rules/reload reaches its subscriber too: skipped, as `serve` skips its API's."""
    from structlog.testing import capture_logs

    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    admin = {"Authorization": f"Bearer {create_token(engine, role='admin')[0]}"}
    with capture_logs() as logs:
        async with standalone_api(settings, engine, rules_dir, rules_poll_interval=timedelta(hours=1)) as api:
            add_an_owner(rules_dir)
            async with httpx.AsyncClient(base_url=api.url) as client:
                body = (await client.post("/v1/rules/reload", headers=admin)).json()
            assert body["changed"] is True and body["notified_processes"] == 1, body  # itself
            assert await asyncio.to_thread(api.new_hire) == 200
            # A request from elsewhere after it: the subscriber sees messages in order, so once it has acted
            # on this one, it has seen its own (instead of a fixed sleep for something not to happen).
            asker = Redis.from_url(settings.effective_redis_url)
            try:
                await request_reload(asker, Keys(settings.stream_prefix), rules_version="?", by="marker", origin=None)
            finally:
                await asker.aclose()
            await wait_until(lambda: any(e["event"] == "rules reload requested" for e in logs), what="the marker")
    assert [e["by"] for e in logs if e["event"] == "rules reload requested"] == ["marker"]
    assert len([e for e in logs if e["event"] == "rules reloaded"]) == 1  # the files did not change since


async def test_a_leavers_owner_token_is_refused_while_they_are_out_of_the_directory(
    settings, engine, tmp_path: Path
) -> None:
    """An owner removed from owners.yaml kept acting through their token after a reload: whoami, their
    alerts, stats, dashboard and ack all still worked. Refused (403) while the owner is out of the API's
    current rules; nothing is stored, so a reload that put them back by mistake undoes it."""
    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    original = (rules_dir / "owners.yaml").read_text()
    add_an_owner(rules_dir)
    leaver = {"Authorization": f"Bearer {create_token(engine, role='owner', owner='new-hire')[0]}"}
    admin = {"Authorization": f"Bearer {create_token(engine, role='admin')[0]}"}
    async with standalone_api(settings, engine, rules_dir, rules_poll_interval=timedelta(hours=1)) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:

            async def reload() -> None:
                body = (await client.post("/v1/rules/reload", headers=admin)).json()
                assert body["changed"] is True, body

            async def answers() -> dict[str, int]:
                return {
                    path: (await client.request(method, path, headers=leaver)).status_code
                    for method, path in (
                        ("GET", "/v1/whoami"), ("GET", "/v1/alerts"), ("GET", "/v1/stats"),
                        ("GET", "/v1/dashboard/owner"), ("POST", "/v1/alerts/al-0123456789abcdef/ack"),
                    )
                }

            assert (await client.get("/v1/whoami", headers=leaver)).json() == {"role": "owner", "owner": "new-hire"}
            (rules_dir / "owners.yaml").write_text(original)  # new-hire leaves
            await reload()
            assert set((await answers()).values()) == {403}
            refused = await client.get("/v1/whoami", headers=leaver)
            assert refused.json() == {"detail": "owner 'new-hire' is no longer in the owner directory (owners.yaml); "
                                                "ask an admin for a token of the alert's new owner"}
            assert (await client.get("/v1/alerts", headers=admin)).status_code == 200  # other roles unaffected
            add_an_owner(rules_dir)  # the removal was a mistake: back, and the same token works again
            await reload()
            assert (await answers())["/v1/whoami"] == 200
            assert (await answers())["/v1/dashboard/owner"] == 200

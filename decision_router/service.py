"""The router service: one read/ack loop (consumer.py) on the input streams, feeding the pipeline.

Both inputs are consumed in batches by one consumer group. Entries pending on a consumer
that died are reclaimed (XAUTOCLAIM) after `claim_idle` and run through the same pipeline.
FastStream is not on the hot path (see consumer.py for why).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta

import structlog
from sqlalchemy.engine import Engine

from decision_router import cooldowns, tallies
from decision_router.consumer import Consumer, Input, ensure_group
from decision_router.embedded import EmbeddedRedis
from decision_router.enrich import build_enricher
from decision_router.escalation import EscalationSweeper
from decision_router.monitor import DataQualityMonitor
from decision_router.notify import ChannelDelivery
from decision_router.outbox import OutboxDrain
from decision_router.pipeline import Clock, Pipeline, utcnow
from decision_router.redis_client import redis_for
from decision_router.reloads import RulesFollower, finish_tasks, request_reload, run_every
from decision_router.rules import RuleSet, load_rules
from decision_router.rules.watch import RulesWatcher
from decision_router.settings import Settings, redact_url
from decision_router.store import check_writable, create_schema, make_engine
from decision_router.streams import ReplicasBehind, connected_replicas
from decision_router.workers import stop_when_orphaned

__all__ = ["RouterService", "ensure_group", "request_reload", "running_service", "serve"]

log = structlog.get_logger("decision_router.service")


class RouterService:
    """Owns the read loop, the pipeline and the periodic tasks of one worker process:
    reclaiming orphaned entries, escalating missed deadlines, draining the outbox, reloading changed rules."""

    def __init__(self, pipeline: Pipeline, watcher: RulesWatcher | None = None) -> None:
        self.pipeline = pipeline
        self.sweeper = EscalationSweeper(pipeline)
        self.outbox = OutboxDrain(pipeline)
        self.monitor = DataQualityMonitor(pipeline)
        self.watcher = watcher
        settings = pipeline.settings
        self.keys = pipeline.keys
        self.group = settings.consumer_group
        self.consumer = settings.consumer_name
        self.reader = Consumer(
            pipeline.redis,
            settings,
            [
                Input(self.keys.predictions, "predictions", pipeline.process_predictions, self.keys.predictions_dlq,
                      pipeline.finish_stored_predictions),
                Input(self.keys.outcomes, "outcomes", pipeline.process_outcomes, self.keys.outcomes_dlq,
                      pipeline.finish_stored_outcomes),
            ],
            engine=pipeline.engine,
            clock=pipeline.clock,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = self.reader.stopping
        # The poll, SIGHUP, the API and the broadcast (reloads.py, shared with a standalone `api`).
        self.rules = RulesFollower(
            watcher or RulesWatcher(settings.rules_dir, pipeline.ruleset), pipeline, redis=pipeline.redis,
            keys=self.keys, stopping=self._stopping, log=log, on_reload=self._reconfigure_channels,
        )
        # Tells this service's own reload broadcasts from the others (RulesFollower.instance).
        self.instance = self.rules.instance

    async def start(self) -> None:
        await self.reader.ensure_groups()
        await self.warn_if_few_replicas()
        await self.drain_outbox_at_start()
        read = asyncio.create_task(self.reader.run(), name="read")
        self._tasks.append(read)
        settings = self.pipeline.settings
        self._every("reclaim", max(0.05, settings.claim_idle.total_seconds() / 2), self.reclaim_once)
        # Its own task: the reclaim job may itself be busy with a batch it took over.
        self._tasks.append(asyncio.create_task(self._keep_alive(read), name="keep-alive"))
        self._every("escalate", settings.sweep_interval.total_seconds(), self.sweeper.sweep_once)
        # Alerts a failed inbox write left in the outbox (outbox.py); started after a wait, the start drained it.
        self._every("outbox", settings.sweep_interval.total_seconds(), self.outbox.drain_once, wait_first=True)
        self._every("cooldowns", cooldowns.PRUNE_INTERVAL_S, self.prune_cooldowns)
        if settings.drift_interval.total_seconds() > 0:
            self._every("drift", settings.drift_interval.total_seconds(), self.monitor.check_once)
        if self.pipeline.engine.dialect.name == "postgresql":  # the stats' running counts, summed
            self._every("tallies", tallies.FOLD_INTERVAL_S, self.fold_tallies)
        if self.pipeline.channels is not None:
            # Pending channel deliveries left by a crash, or queued by another path.
            self._every("channels", 1.0, self.pipeline.channels.pump)
        if self.watcher is not None:
            # "router started" waits for the reload subscriber: a request as soon as it is logged reaches us.
            await self.rules.start(self._every, settings.rules_poll_interval.total_seconds())
        log.info(
            "router started",
            redis=redact_url(self.pipeline.settings.effective_redis_url),
            group=self.group,
            consumer=self.consumer,
            rules_version=self.pipeline.ruleset.version,
            rules=len(self.pipeline.ruleset.rules),
            owners=len(self.pipeline.ruleset.owners),
        )

    async def warn_if_few_replicas(self) -> None:
        """DECISION_ROUTER_REDIS_WAIT_REPLICAS above the replicas connected now: said at start, not only by the
        first batch that waits for them (the service starts anyway: a replica may be on its way)."""
        wait = self.pipeline.settings.replica_wait
        if wait is None:
            return
        connected = await connected_replicas(self.pipeline.redis, self.keys.predictions)
        if connected < wait.replicas:
            log.warning(
                "fewer Redis replicas connected than DECISION_ROUTER_REDIS_WAIT_REPLICAS: inbox and DLQ writes "
                "wait for them, and no input is acknowledged until they acknowledge", connected=connected,
                wanted=wait.replicas,
            )

    async def drain_outbox_at_start(self) -> int:
        """The outbox drained; returns how many alerts. Replicas that do not acknowledge its writes are waited
        for as a batch waits for them; a Redis or store that cannot be reached still stops the start."""
        while True:
            try:
                # Every undelivered alert, however young: no batch of this worker is delivering any yet.
                delivered = await self.outbox.drain_once(grace=timedelta(0))
            except ReplicasBehind as exc:
                if not await self.reader.outage.wait("Redis", exc):
                    return 0  # stopping
            else:
                self.reader.outage.ok()
                return delivered

    async def stop(self) -> None:
        """Stop reading, finish and acknowledge the batch in hand, stop the periodic jobs.
        Bounded by shutdown_timeout: past it, whatever is unfinished stays pending (and is
        redelivered later, which the pipeline's idempotency makes harmless)."""
        # An event, not cancel(): redis-py may turn a cancellation mid-command into a
        # connection error, and a cancelled batch would be left half-done for no reason. Only a
        # read waiting for new entries, with no batch in hand, is cancelled (Consumer.stop).
        self.reader.stop()
        await finish_tasks(self._tasks, self.pipeline.settings.shutdown_timeout.total_seconds(), log)
        if self.pipeline.channels is not None:
            # Unfinished channel deliveries stay pending in the store for the next start.
            await self.pipeline.channels.close()

    async def check_rules(self, *, force: bool = False) -> None:
        """Swap in changed rule files if they are valid; a bad file keeps the old rules."""
        assert self.watcher is not None
        await self.rules.check(force=force)

    async def _reconfigure_channels(self, fresh: RuleSet) -> None:
        if self.pipeline.channels is not None:
            # Webhook URLs, secrets, emails and digest windows come from the owner directory.
            await self.pipeline.channels.reconfigure(fresh)

    def reload_now(self) -> None:
        """SIGHUP: re-read the rules now rather than at the next poll (RulesFollower.reload_now). The
        task is kept, and waited for at stop."""
        task = self.rules.reload_now()
        self._tasks = [t for t in self._tasks if not (t.done() and t.get_name() == "rules-sighup")] + [task]

    async def follow_reload_requests(self) -> None:
        """Re-read the rules when any process on this stream prefix asks, until stop (RulesFollower)."""
        await self.rules.follow_reload_requests()

    def _every(
        self, name: str, interval: float, job: Callable[[], Awaitable[object]], *, wait_first: bool = False
    ) -> None:
        loop = run_every(name, interval, job, self._stopping, log, wait_first=wait_first)
        self._tasks.append(asyncio.create_task(loop, name=name))

    async def _keep_alive(self, read: asyncio.Task[None]) -> None:
        """The entries in hand kept alive (Consumer.keep_alive) every claim_idle / 4 until the read loop
        ends, not when stopping begins: the batch in hand is finished during shutdown (up to
        shutdown_timeout), and a reclaim meanwhile would count a delivery and handle it a second time."""
        interval = max(0.05, self.pipeline.settings.claim_idle.total_seconds() / 4)
        while not read.done():
            await self.reader.keep_alive()  # best effort: its errors are suppressed (Consumer._touch)
            await asyncio.wait({read}, timeout=interval)

    async def fold_tallies(self) -> int:
        """Sum PostgreSQL's appended count differences (tallies.py); returns how many rows were folded."""
        return await asyncio.to_thread(tallies.fold_tallies, self.pipeline.engine)

    async def prune_cooldowns(self) -> int:
        """Delete cooldown windows that ended (see cooldowns.py); returns how many."""
        pruned = await asyncio.to_thread(cooldowns.prune_ended, self.pipeline.engine, now=self.pipeline.clock())
        if pruned:
            log.info("ended cooldown windows pruned", pruned=pruned)
        return pruned

    async def reclaim_once(self) -> int:
        """Take over entries idle on any consumer longer than claim_idle; returns how many."""
        return await self.reader.reclaim_once()


@contextlib.asynccontextmanager
async def running_service(
    settings: Settings, ruleset: RuleSet, engine: Engine, *, clock: Clock = utcnow, watch_rules: bool = False
) -> AsyncIterator[RouterService]:
    """Start one worker against settings.effective_redis_url; stop it cleanly on exit."""
    redis = redis_for(settings)
    pipeline = Pipeline(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=clock)
    # Reads pipeline.ruleset per batch, so a hot reload's context_sources apply at once.
    pipeline.enricher = enricher = build_enricher(
        lambda: pipeline.ruleset, redis=redis, engine=engine, keys=pipeline.keys, limits=settings.payload_limits
    )
    pipeline.channels = ChannelDelivery(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=clock)
    service = RouterService(pipeline, RulesWatcher(settings.rules_dir, ruleset) if watch_rules else None)
    try:
        await service.start()
        yield service
    finally:
        await service.stop()
        await redis.aclose()
        enricher.close()


# The young generation's collection threshold (CPython's default is 700 allocations). A batch in
# hand keeps tens of thousands of container objects alive (entries, documents, row dicts), so at
# 700 the collector walked them ~100 times a batch and promoted them to the older generations,
# whose collections walked them again: ~8% of a backlog's CPU. Most die with their batch, freed by
# reference counting long before 50,000 allocations add up; cycles are still collected, later.
BATCH_GC_THRESHOLDS = (50_000, 20, 100)


@contextlib.contextmanager
def collecting_for_batches() -> Iterator[None]:
    """`serve`'s garbage collection: start-up objects frozen, then young collections ~70x rarer;
    as they were before on the way out (for a caller that goes on in the same process)."""
    thresholds = gc.get_threshold()
    freeze_startup_objects()
    gc.set_threshold(*BATCH_GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def freeze_startup_objects() -> None:
    """Exempt what start-up made (imports, compiled rules, the app) from garbage collection.
    A full collection walks every tracked object: ~45 ms with these, a pause that lands on
    whichever batch is in hand (the 40-90 ms stalls behind issue 8's p99). Collected first, so
    no garbage is kept; what is made afterwards is collected as usual."""
    gc.collect()
    gc.freeze()


async def serve(settings: Settings, *, stop: asyncio.Event | None = None, api: bool = True) -> None:
    """`decision-router serve`: run until SIGINT/SIGTERM (or `stop` is set), with the HTTP API unless `api=False`."""
    from decision_router.api.server import api_for_service
    ruleset = load_rules(settings.rules_dir)  # invalid rules: refuse to start, before anything else
    engine = make_engine(settings.database_url, background_checkpoints=True)
    embedded = orphaned = None
    try:  # from here, so that a start that fails (a taken port, say) still stops the engine's thread
        create_schema(engine)
        check_writable(engine)  # a read-only store is a mistake to say now, not an outage to wait out
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        orphaned = asyncio.create_task(stop_when_orphaned(stop))  # a `--workers` worker outlives no supervisor
        embedded = EmbeddedRedis(settings.embedded_host, settings.embedded_port).start() if settings.embedded else None
        if embedded:
            log.info("embedded Redis (fakeredis) serving", url=embedded.url, database=redact_url(settings.database_url))
        # Before the consumers start, so that no batch waits for the collection.
        with collecting_for_batches():
            async with running_service(settings, ruleset, engine, watch_rules=True) as service:
                # SIGHUP: re-read the rules now rather than at the next poll.
                loop.add_signal_handler(signal.SIGHUP, service.reload_now)
                # One held back while starting (the `serve` command blocks it first) is delivered now, to it.
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
                async with api_for_service(service, engine, enabled=api):  # stops before the consumers
                    gc.freeze()  # and what the service and its API made since (no collection: no batch waits)
                    await stop.wait()
                    log.info("stopping")
    finally:
        if orphaned:
            orphaned.cancel()
        if embedded:
            embedded.stop()
        engine.dispose()

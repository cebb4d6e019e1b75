"""The router service: FastStream subscribers on the input streams, feeding the pipeline.

Both inputs are consumed in batches by one consumer group. Entries pending on a consumer
that died are reclaimed (XAUTOCLAIM) after `claim_idle` and run through the same pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import structlog
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.annotations import RedisBatchStreamMessage
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from sqlalchemy.engine import Engine

from decision_router.embedded import EmbeddedRedis
from decision_router.enrich import build_enricher
from decision_router.escalation import EscalationSweeper
from decision_router.monitor import DataQualityMonitor
from decision_router.notify import ChannelDelivery
from decision_router.pipeline import BatchResult, Clock, Entry, Pipeline, utcnow
from decision_router.rules import RuleSet, load_rules
from decision_router.rules.watch import RulesWatcher
from decision_router.settings import Settings, redact_url
from decision_router.store import create_schema, make_engine
from decision_router.streams import as_text

log = structlog.get_logger("decision_router.service")

Process = Callable[[Sequence[Entry]], Awaitable[BatchResult]]


def _entries(msg: RedisBatchStreamMessage) -> list[Entry]:
    raw = msg.raw_message
    return [(mid.decode(), fields) for mid, fields in zip(raw["message_ids"], raw["data"], strict=True)]


async def ensure_group(redis: Redis, stream: str, group: str) -> None:
    """Create the group at the start of the stream, so a backlog published before the
    service first started is routed too (FastStream would start at `$`)."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class RouterService:
    """Owns the broker, the pipeline and the periodic tasks of one worker process:
    reclaiming orphaned entries, escalating missed deadlines, reloading changed rules."""

    def __init__(self, pipeline: Pipeline, watcher: RulesWatcher | None = None) -> None:
        self.pipeline = pipeline
        self.sweeper = EscalationSweeper(pipeline)
        self.monitor = DataQualityMonitor(pipeline)
        self.watcher = watcher
        settings = pipeline.settings
        self.keys = pipeline.keys
        self.group = settings.consumer_group
        self.consumer = settings.consumer_name
        # FastStream logs two lines per message by default; we log per batch instead.
        self.broker = RedisBroker(settings.effective_redis_url, logger=None)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._subscribe(self.keys.predictions, pipeline.process_predictions)
        self._subscribe(self.keys.outcomes, pipeline.process_outcomes)

    def _subscribe(self, stream: str, process: Process) -> None:
        sub = StreamSub(
            stream,
            group=self.group,
            consumer=self.consumer,
            batch=True,
            max_records=self.pipeline.settings.batch_size,
            polling_interval=100,
        )

        @self.broker.subscriber(stream=sub)
        async def handle(msg: RedisBatchStreamMessage) -> None:
            try:
                await process(_entries(msg))
            except Exception:
                # Not bad input (the gate turns that into DLQ entries) but a broken store or
                # Redis: leave the batch pending so it is retried or reclaimed.
                log.exception("batch failed; left pending for retry", stream=stream)
                raise

    async def start(self) -> None:
        redis = self.pipeline.redis
        for stream in (self.keys.predictions, self.keys.outcomes):
            await ensure_group(redis, stream, self.group)
        delivered = await self.pipeline.drain_outbox()
        if delivered:
            log.info("outbox drained at start", delivered=delivered)
        await self.broker.start()
        settings = self.pipeline.settings
        self._every("reclaim", max(0.05, settings.claim_idle.total_seconds() / 2), self.reclaim_once)
        self._every("escalate", settings.sweep_interval.total_seconds(), self.sweeper.sweep_once)
        if settings.drift_interval.total_seconds() > 0:
            self._every("drift", settings.drift_interval.total_seconds(), self.monitor.check_once)
        if self.pipeline.channels is not None:
            # Pending channel deliveries left by a crash, or queued by another path.
            self._every("channels", 1.0, self.pipeline.channels.pump)
        if self.watcher is not None and settings.rules_poll_interval.total_seconds() > 0:
            self._every("rules", settings.rules_poll_interval.total_seconds(), self.check_rules)
        log.info(
            "router started",
            redis=redact_url(self.pipeline.settings.effective_redis_url),
            group=self.group,
            consumer=self.consumer,
            rules_version=self.pipeline.ruleset.version,
            rules=len(self.pipeline.ruleset.rules),
            owners=len(self.pipeline.ruleset.owners),
        )

    async def stop(self) -> None:
        # An event, not cancel(): redis-py may turn a cancellation mid-command into a
        # connection error, which the loop would log and carry on past.
        self._stopping.set()
        await asyncio.gather(*self._tasks)
        await self.broker.stop()
        if self.pipeline.channels is not None:
            # Unfinished channel deliveries stay pending in the store for the next start.
            await self.pipeline.channels.close()

    async def check_rules(self, *, force: bool = False) -> None:
        """Swap in changed rule files if they are valid; a bad file keeps the old rules."""
        assert self.watcher is not None
        fresh = await asyncio.to_thread(self.watcher.reload if force else self.watcher.check)
        if fresh is not None:
            old = self.pipeline.ruleset.version
            self.pipeline.ruleset = fresh  # one assignment: each batch sees one rule set
            log.info("rules reloaded", rules_version=fresh.version, previous=old, rules=len(fresh.rules))

    def _every(self, name: str, interval: float, job: Callable[[], Awaitable[object]]) -> None:
        async def loop() -> None:
            while not self._stopping.is_set():
                try:
                    await job()
                except Exception:
                    log.exception(f"{name} failed; will retry")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), max(0.05, interval))

        self._tasks.append(asyncio.create_task(loop(), name=name))

    async def reclaim_once(self) -> int:
        """Take over entries idle on any consumer longer than claim_idle; returns how many."""
        total = 0
        for stream, process in (
            (self.keys.predictions, self.pipeline.process_predictions),
            (self.keys.outcomes, self.pipeline.process_outcomes),
        ):
            total += await self._reclaim(stream, process)
        return total

    async def _reclaim(self, stream: str, process: Process) -> int:
        redis = self.pipeline.redis
        idle_ms = int(self.pipeline.settings.claim_idle.total_seconds() * 1000)
        start, total = "0-0", 0
        while True:
            next_id, messages, *_ = await redis.xautoclaim(
                stream, self.group, self.consumer, min_idle_time=idle_ms, start_id=start,
                count=self.pipeline.settings.batch_size,
            )
            # Entries deleted from the stream while pending come back empty: just ack them.
            entries = [(as_text(mid), fields) for mid, fields in messages if fields]
            if entries:
                log.info("reclaimed pending entries", stream=stream, count=len(entries))
                await process(entries)
            if messages:
                await redis.xack(stream, self.group, *[mid for mid, _ in messages])
            total += len(entries)
            if as_text(next_id) == "0-0":
                return total
            start = as_text(next_id)


@contextlib.asynccontextmanager
async def running_service(
    settings: Settings, ruleset: RuleSet, engine: Engine, *, clock: Clock = utcnow, watch_rules: bool = False
) -> AsyncIterator[RouterService]:
    """Start one worker against settings.effective_redis_url; stop it cleanly on exit."""
    redis = Redis.from_url(settings.effective_redis_url)
    pipeline = Pipeline(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=clock)
    # Reads pipeline.ruleset per batch, so a hot reload's context_sources apply at once.
    pipeline.enricher = enricher = build_enricher(lambda: pipeline.ruleset, redis=redis, engine=engine, keys=pipeline.keys)
    pipeline.channels = ChannelDelivery(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=clock)
    service = RouterService(pipeline, RulesWatcher(settings.rules_dir, ruleset) if watch_rules else None)
    try:
        await service.start()
        yield service
    finally:
        await service.stop()
        await redis.aclose()
        enricher.close()


async def serve(settings: Settings, *, stop: asyncio.Event | None = None, api: bool = True) -> None:
    """`decision-router serve`: run until SIGINT/SIGTERM (or `stop` is set), with the HTTP API unless `api=False`."""
    from decision_router.api.server import api_for_service
    ruleset = load_rules(settings.rules_dir)  # invalid rules: refuse to start, before anything else
    engine = make_engine(settings.database_url)
    create_schema(engine)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    embedded = EmbeddedRedis(settings.embedded_host, settings.embedded_port).start() if settings.embedded else None
    if embedded:
        log.info("embedded Redis (fakeredis) serving", url=embedded.url, database=redact_url(settings.database_url))
    try:
        async with running_service(settings, ruleset, engine, watch_rules=True) as service:
            # SIGHUP: re-read the rules now rather than at the next poll.
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(service.check_rules(force=True)))
            async with api_for_service(service, engine, enabled=api):  # stops before the consumers
                await stop.wait()
                log.info("stopping")
    finally:
        if embedded:
            embedded.stop()
        engine.dispose()

"""The read/ack loop: XREADGROUP a batch, hand it to the pipeline, XACK it, read the next.

Why redis-py and not a FastStream subscriber: on this hardware a FastStream batch subscriber
with an empty handler reads only 0.35-0.45x of what a bare redis-py + hiredis loop reads
(../shared/NOTES.md), which alone would put the routing target (>= 0.5x the bare loop) out of
reach. FastStream still describes the streams (AsyncAPI); only the hot path reads directly.

Failure handling, per batch:
- infrastructure down (Redis or the store unreachable): nothing is acknowledged, the same
  batch is retried with capped exponential backoff, and the state change is logged once
  ("store unavailable; retrying in 2s" ... "store reachable again"). Never dead-lettered.
- anything else: the batch is split in halves until the failing entries are isolated, so the
  good entries in it go through; an entry failing on its own `max_attempts` times goes to its
  DLQ (reason `processing_failed`, the error as detail) and is acknowledged.
- a worker gone while holding it (a crash, the OOM killer): no error is counted, but Redis counts the
  deliveries. Read again more than 2 x max_attempts times, an entry is a suspect, and so is every entry of
  the batch that killed the worker: finished if the store holds its effects already (stored, then its worker
  gone before the ack), else handled on its own under a marker (_sort_out_crashers, _settle_alone). A worker
  that dies then leaves the marker, which names the culprit: dead-lettered when read again, unprocessed (unless
  the store holds its effects by then: finished, as above), while its neighbours go through. Finishing, a batch at once, gets max_attempts deliveries too: past
  3 x max_attempts suspects are handled on their own without it (alerts the store holds stay in the outbox,
  which every worker drains every sweep_interval: outbox.py).
The pipeline is idempotent per stream entry, so retrying a batch that half-succeeded is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis
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
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session

from decision_router import metrics, tracker
from decision_router.contracts import Rejection, RejectionReason
from decision_router.keys import Keys
from decision_router.pipeline import BatchResult, Clock, Entry, dlq_writes
from decision_router.quality import decode_entry, original_payload
from decision_router.settings import Settings
from decision_router.streams import ReplicasBehind, as_text, xadd_once

log = structlog.get_logger("decision_router.consumer")

Process = Callable[[Sequence[Entry]], Awaitable[BatchResult]]
Finish = Callable[[Sequence[Entry]], Awaitable[Sequence[str]]]

_FIRST_BACKOFF = 0.2  # seconds; doubled per failed retry up to settings.retry_backoff_max


@dataclass(frozen=True)
class Input:
    """One input stream: where it is read from, what processes it, where its poison goes."""

    stream: str
    label: str  # "predictions" or "outcomes", for metrics
    process: Process
    dlq: str
    # Of entries about to be dead-lettered as crashers, finishes those the store holds already and returns
    # their ids (Pipeline.finish_stored_predictions); None: every one of them is dead-lettered.
    finish_stored: Finish | None = None


# Replies of a Redis that is failing over or not ready (READONLY: a replica just demoted), or that refuses
# writes until an operator acts: OOM (at maxmemory with noeviction) and MISCONF (snapshots failing). Those
# are no fault of the batch in hand: dead-lettering it would not help (the DLQ write is refused too), and
# its predictions are stored already; waiting loses nothing. So is ReplicasBehind: replicas that did not
# acknowledge the router's writes (DECISION_ROUTER_REDIS_WAIT_REPLICAS), which a failover could lose.
_REDIS_NOT_READY = ("READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS", "LOADING", "MISCONF")
_REDIS_NOT_READY_ERRORS = (
    ReadOnlyError, MasterDownError, TryAgainError, ClusterDownError, BusyLoadingError, OutOfMemoryError,
    ReplicasBehind,
)
# The cluster client's own outages: no node reachable, slots not covered while the cluster reshapes
# (SlotNotCoveredError), redirections exhausted mid-failover (ClusterError "TTL exhausted"). They are
# no ConnectionError; its other errors (keys in different slots, say) are bugs.
_CLUSTER_UNREACHABLE = (
    "Redis Cluster cannot be connected", "All slots are not covered", "startup_nodes could not agree",
)
_CLUSTER_NOT_READY_ERRORS = (SlotNotCoveredError, ClusterError)
_NETWORK_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.EPIPE})
# PostgreSQL SQLSTATEs of a server going away or not taking writes: connection exceptions (08...),
# shutdown (57P01-57P03), too many connections (53300), read-only after a failover (25006).
_PG_NOT_READY = ("08", "57P01", "57P02", "57P03", "53300", "25006")


def infrastructure_failure(exc: BaseException) -> str | None:
    """'Redis' or 'store' if `exc` means a service is unreachable (retry, never dead-letter)."""
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return "Redis"
    # redis-py maps these replies to classes and strips the code from the message; the others
    # (NOREPLICAS...) keep it.
    if isinstance(exc, _REDIS_NOT_READY_ERRORS) or (
        isinstance(exc, ResponseError) and str(exc).startswith(_REDIS_NOT_READY)
    ):
        return "Redis"
    if isinstance(exc, _CLUSTER_NOT_READY_ERRORS) or (
        isinstance(exc, RedisClusterException) and str(exc).startswith(_CLUSTER_UNREACHABLE)
    ):
        return "Redis"
    if isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return "store"
    if isinstance(exc, DBAPIError) and str(getattr(exc.orig, "sqlstate", "") or "").startswith(_PG_NOT_READY):
        return "store"
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)) or (
        isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS
    ):
        # Socket errors outside redis-py's wrappers (the store's are wrapped by SQLAlchemy). Not
        # every OSError: a PermissionError from a bug must count against the entry, not wait forever.
        return "Redis"
    return None


async def ensure_group(redis: Redis, stream: str, group: str) -> None:
    """Create the group at the start of the stream, so a backlog published before the
    service first started is routed too (FastStream would start at `$`)."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _strict_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decoded(messages: Sequence[tuple[bytes, dict[bytes, bytes]]]) -> tuple[list[Entry], list[bytes]]:
    """(entries with text ids and fields, ids of entries deleted while pending). Decoded once here."""
    entries: list[Entry] = []
    gone: list[bytes] = []
    for mid, fields in messages:
        if not fields:
            gone.append(mid)
            continue
        try:
            # The common case, bytes of UTF-8 from a client that does not decode replies: no
            # per-field type checks (this runs for every entry read).
            entries.append((mid.decode(), {k.decode(): v.decode() for k, v in fields.items()}))
        except (AttributeError, UnicodeDecodeError):
            entries.append(_decoded_one(mid, fields))
    return entries, gone


def _decoded_one(mid: bytes | str, fields: dict) -> Entry:
    """One entry that is not all bytes of UTF-8: text as it is, bad bytes left for the gate."""
    try:
        return as_text(mid), {_strict_text(k): _strict_text(v) for k, v in fields.items()}
    except UnicodeDecodeError:
        # Not UTF-8: hand the bytes to the gate, which rejects the entry as invalid_encoding
        # (replacing bad bytes would silently change ids and values).
        return as_text(mid), dict(fields)


class Outage:
    """Backoff and once-per-state-change logging while Redis or the store is unreachable."""

    def __init__(self, settings: Settings, stopping: asyncio.Event) -> None:
        self.cap = max(_FIRST_BACKOFF, settings.retry_backoff_max.total_seconds())
        self.stopping = stopping
        self.down: str | None = None  # which service, while an outage lasts
        self.since = 0.0
        self.delay = _FIRST_BACKOFF

    async def wait(self, what: str, exc: BaseException) -> bool:
        """Sleep before the next retry; False if the service is stopping instead."""
        if self.down is None:
            self.down, self.since, self.delay = what, time.monotonic(), _FIRST_BACKOFF
            if isinstance(exc, ReplicasBehind):  # Redis answers: say what it is waiting for, not "unavailable"
                log.warning(f"Redis replicas did not acknowledge the writes; waiting, retrying in {self.delay:g}s",
                            error=str(exc).strip()[:300])
            else:
                log.warning(f"{what} unavailable; retrying in {self.delay:g}s", error=str(exc).strip()[:300])
        else:
            log.debug(f"{what} still unavailable; retrying in {self.delay:g}s", error=str(exc).strip()[:300])
        try:
            await asyncio.wait_for(self.stopping.wait(), self.delay)
            return False
        except TimeoutError:
            self.delay = min(self.cap, self.delay * 2)
            return True

    def ok(self) -> None:
        if self.down is not None:
            log.info(f"{self.down} reachable again", down_for=round(time.monotonic() - self.since, 2))
            self.down = None


class Consumer:
    """Reads the input streams as one consumer of the group and processes each batch."""

    def __init__(
        self, redis: Redis, settings: Settings, inputs: Sequence[Input], *, engine: Engine, clock: Clock
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.engine = engine
        self.keys = Keys(settings.stream_prefix)
        self.inputs = {i.stream: i for i in inputs}
        self.group = settings.consumer_group
        self.name = settings.consumer_name
        self.clock = clock
        self.stopping = asyncio.Event()
        self.outage = Outage(settings, self.stopping)
        # The entries this process is working on, per stream: its own reclaim must not run them a second
        # time. Entry id -> when its idle time was last reset (read, or touched: see keep_alive).
        self.in_hand: dict[str, dict[str, float]] = {stream: {} for stream in self.inputs}
        self.groups_ready = False
        # The read loop's task while it waits in a blocking read, holding no batch: stop() cancels that wait.
        self._idle_read: asyncio.Task | None = None
        self._read_cut_short = False

    def stop(self) -> None:
        """Finish the batch in hand, then read no more. A read blocked waiting for new entries holds
        no batch, so it is cut short rather than waited out (up to read_block_ms: most of an idle
        `serve`'s exit time). Entries that came in the instant before, handed over as the read was
        cut, stay pending on this consumer as after a crash: read first by the next start under this
        name, or reclaimed by another consumer after claim_idle."""
        self.stopping.set()
        if self._idle_read is not None and not self._read_cut_short:
            self._read_cut_short = True
            self._idle_read.cancel()

    async def retrying(self, what: Callable[[], Awaitable[object]]) -> bool:
        """Run `what` until it gets through an outage; False if stopping first."""
        while True:
            try:
                await what()
            except Exception as exc:
                service = infrastructure_failure(exc)
                if service is None:
                    raise
                if not await self.outage.wait(service, exc):
                    return False
            else:
                self.outage.ok()
                return True

    async def ensure_groups(self) -> None:
        for stream in self.inputs:
            await ensure_group(self.redis, stream, self.group)
        # Once, at start; the read loop recreates them only if Redis lost them (NOGROUP).
        self.groups_ready = True

    async def run(self) -> None:
        """Until stop(): first this consumer's own pending entries (left by an earlier run under
        the same name), then new ones. Each batch is finished and acknowledged before the next read."""

        if not self.groups_ready and not await self.retrying(self.ensure_groups):
            return
        cursors = {stream: "0" for stream in self.inputs}  # "0": our own pending history first
        # The last read found nothing new. Only then does a read block: one that stop() cuts short
        # was sent when the streams had nothing for us, so it rarely holds entries (see stop()).
        idle = False
        while not self.stopping.is_set():
            history = any(c != ">" for c in cursors.values())
            try:
                reply = await self._read(cursors, block=self.settings.read_block_ms if idle and not history else None)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    # A failover reply (READONLY...) waits like an outage; anything else is logged.
                    # Never raise: nothing would restart this task.
                    await self._failed(exc, "read failed")
                    continue
                # Redis restarted without persistence: the group is gone; recreate it (from 0).
                log.warning("consumer group missing; recreating it", error=str(exc))
                await self.retrying(self.ensure_groups)
                continue
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one failed read
                await self._failed(exc, "read failed")
                continue
            self.outage.ok()
            idle = not history and not reply
            read_at = time.monotonic()
            if reply and len(reply) > 1:
                self._hold(reply[1:], read_at)
            for raw_stream, messages in reply or []:
                stream = as_text(raw_stream)
                if cursors[stream] != ">":
                    cursors[stream] = as_text(messages[-1][0]) if messages else ">"
                if messages:
                    try:
                        await self.handle(self.inputs[stream], messages, redelivered=history, read_at=read_at)
                    except Exception as exc:  # noqa: BLE001 - left pending; reclaimed after claim_idle
                        await self._failed(exc, "batch failed; left pending")

    def _hold(self, reply: list, read_at: float) -> None:
        """Entries read with another stream's batch, which is processed first: in hand (kept alive) from now."""
        for raw_stream, messages in reply:
            self.in_hand[as_text(raw_stream)].update((as_text(mid), read_at) for mid, fields in messages if fields)

    async def _read(self, cursors: dict[str, str], *, block: int | None) -> list | None:
        """One XREADGROUP; None if stop() cut a blocking one short."""
        read = self.redis.xreadgroup(self.group, self.name, cursors, count=self.settings.batch_size, block=block)
        if block is None:
            return await read
        task = asyncio.current_task()
        self._idle_read = task
        try:
            return await read
        except asyncio.CancelledError:
            if not self._read_cut_short:  # someone else's cancellation
                raise
            assert task is not None
            task.uncancel()
            return None
        finally:
            self._idle_read = None

    async def _failed(self, exc: Exception, what: str) -> None:
        service = infrastructure_failure(exc)
        if service is not None:
            await self.outage.wait(service, exc)
            return
        # A bug, not an outage: log it in full, pause, carry on.
        log.exception(what, exc_info=exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), 1.0)

    async def handle(
        self, source: Input, messages: Sequence[tuple[bytes, dict[bytes, bytes]]], *, redelivered: bool = False,
        read_at: float | None = None,
    ) -> bool:
        """Process and acknowledge one batch as read from Redis (at `read_at`, time.monotonic(); now if None);
        False if left pending (stopping). `redelivered`: read again (own pending history, or reclaimed), so
        it may be one that brought its worker down each time it was read."""
        entries, gone = decoded(messages)
        in_hand = self.in_hand[source.stream]
        ids = [entry_id for entry_id, _ in entries]
        in_hand.update(dict.fromkeys(ids, time.monotonic() if read_at is None else read_at))
        try:
            # Deleted from the stream while pending: nothing to process, just ack.
            if gone and not await self.retrying(lambda: self.redis.xack(source.stream, self.group, *gone)):
                return False
            if redelivered and entries:
                sorted_out = await self._sort_out_crashers(source, entries)
                if sorted_out is None:
                    return False
                entries, suspects = sorted_out
                for suspect in suspects:
                    if not await self._settle_alone(source, suspect):
                        return False
            return await self._settle(source, entries)
        finally:
            for entry_id in ids:
                in_hand.pop(entry_id, None)

    async def _sort_out_crashers(self, source: Input, entries: list[Entry]) -> tuple[list[Entry], list[Entry]] | None:
        """Sort out entries delivered more than 2 x max_attempts times without an ack: each read ended with its
        worker gone (a crash, the OOM killer) before any error could be counted, and the entry that did it may
        be any one of the batch it came with. Returns (the others, the suspects to handle one at a time); None
        if stopping first. Outages do not count: retries do not redeliver.

        - Those the store holds already (their worker went after the commit) are finished and acknowledged
          instead: no failure, and no culprit either, even with a marker (accepted once, not also dead-lettered).
          Finishing, all of them at once, is tried up to 3 x max_attempts deliveries, as many as processing had;
          past that it stopped its worker each time too, and they are suspects.
        - Any other that was being handled on its own when its worker went (its handled_alone marker is there)
          is the culprit: dead-lettered, unprocessed. Its neighbours are not: they were never alone.
        - The rest are suspects: handled one at a time (_settle_alone), so the next crash names its entry."""
        limit = 2 * self.settings.max_attempts
        last_finish = 3 * self.settings.max_attempts
        pending = await self.redis.xpending_range(
            source.stream, self.group, min=entries[0][0], max=entries[-1][0],
            count=len(entries) + len(self.in_hand[source.stream]), consumername=self.name,
        )
        deliveries = {as_text(p["message_id"]): p["times_delivered"] for p in pending}
        crashers = [entry for entry in entries if deliveries.get(entry[0], 0) > limit]
        others = [entry for entry in entries if deliveries.get(entry[0], 0) <= limit]
        if not crashers:
            return others, []
        markers = {entry_id: self.keys.handled_alone(source.stream, entry_id) for entry_id, _ in crashers}
        culprits: set[str] = set()

        async def read_markers() -> None:
            values = await self.redis.mget(list(markers.values()))
            culprits.update(entry_id for entry_id, value in zip(markers, values, strict=True) if value)

        if not await self.retrying(read_markers):
            return None
        # Asked first, culprits too: one that stored before its worker went (after the commit, before the ack) is
        # finished, not dead-lettered on top of being accepted.
        stored = await self._finish_stored(
            source, [entry for entry in crashers if deliveries[entry[0]] <= last_finish], deliveries)
        if stored is None:
            return None
        for entry_id in culprits & stored:
            await self.retrying(lambda: self.redis.delete(markers[entry_id]))  # noqa: B023
        for entry in crashers:
            if entry[0] not in culprits or entry[0] in stored:
                continue
            times = deliveries[entry[0]]
            outbox = "; alerts the store holds from it reach their inboxes through the outbox drain" \
                if source.finish_stored is not None else ""
            error = RuntimeError(f"delivered {times} times and never acknowledged: its worker stopped each time, the"
                                 f" last time while handling this entry on its own{outbox}")
            if not await self._dead_letter(source, entry, error, attempts=times):
                return None
            await self.retrying(lambda: self.redis.delete(markers[entry[0]]))  # noqa: B023
        return others, [entry for entry in crashers if entry[0] not in culprits and entry[0] not in stored]

    async def _settle_alone(self, source: Input, entry: Entry) -> bool:
        """Handle a suspected crasher on its own, under its handled_alone marker: if its worker dies now, the
        marker is left behind and the next reader dead-letters this entry, not its neighbours (_sort_out_crashers).
        A stop is no death: the marker goes, during a Redis outage once Redis answers (_drop_marker)."""
        marker = self.keys.handled_alone(source.stream, entry[0])
        ttl = int(self.settings.dedupe_ttl.total_seconds())
        if not await self.retrying(lambda: self.redis.set(marker, self.name, ex=ttl)):
            return False
        log.warning("entry delivered to workers that stopped each time; handling it on its own",
                    stream=source.stream, entry_id=entry[0])
        try:
            settled = await self._settle(source, [entry])
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.redis.delete(marker)
            raise
        if not settled:  # stopping, maybe in an outage: the marker must go all the same
            await self._drop_marker(marker, source, entry)
            return False
        with contextlib.suppress(Exception):  # acknowledged: never read again, a marker left expires unread
            await self.redis.delete(marker)
        return True

    async def _drop_marker(self, marker: str, source: Input, entry: Entry) -> None:
        """Remove the marker of a suspect left pending by a stop, waiting for Redis if it is unreachable (the stop
        waits too, up to shutdown_timeout): left behind, it would have a valid entry dead-lettered when read
        again. Cancelled first (the shutdown timed out), it is logged, to be deleted by hand."""
        delay = _FIRST_BACKOFF
        try:
            while True:
                try:
                    await self.redis.delete(marker)
                    return
                except Exception as exc:  # noqa: BLE001 - an outage is waited out; anything else, logged below
                    if infrastructure_failure(exc) is None:
                        raise
                await asyncio.sleep(delay)
                delay = min(self.outage.cap, delay * 2)
        except (Exception, asyncio.CancelledError):
            log.error("stopped with Redis unreachable: the marker of the entry handled on its own is left; delete it,"
                      " or the entry is dead-lettered when read again", stream=source.stream, entry_id=entry[0],
                      marker=marker)
            raise

    async def _finish_stored(
        self, source: Input, crashers: Sequence[Entry], deliveries: dict[str, int]
    ) -> set[str] | None:
        """The ids of `crashers` the store holds already, finished (see Input.finish_stored) and acknowledged;
        None if stopping first. The store down is an outage (retried), not a reason to dead-letter."""
        if source.finish_stored is None or not crashers:
            return set()
        while True:
            try:
                stored = set(await source.finish_stored(crashers))
            except Exception as exc:  # noqa: BLE001 - classified below: outage (retry) or a failure to finish
                service = infrastructure_failure(exc)
                if service is None:
                    # A delivery that keeps failing (an inbox key of the wrong type): dead-lettered as before.
                    log.warning("could not finish stored entries; dead-lettering them", stream=source.stream,
                                error=repr(exc)[:300])
                    return set()
                await self._touch(source, [entry_id for entry_id, _ in crashers])
                if not await self.outage.wait(service, exc):
                    return None
                continue
            self.outage.ok()
            break
        if not stored:
            return stored
        for entry_id in stored:
            log.warning("entry redelivered after its worker stopped was stored already; finished, not dead-lettered",
                        stream=source.stream, entry_id=entry_id, deliveries=deliveries.get(entry_id))
        ids = [entry_id.encode() for entry_id in stored]
        if not await self.retrying(lambda: self.redis.xack(source.stream, self.group, *ids)):
            return None
        return stored

    async def keep_alive(self) -> None:
        """Reset the idle time of every entry in hand for a while (a slow batch, a retry, an outage
        waited out), every claim_idle / 4 (RouterService). Otherwise a reclaim, another worker's or
        this one's own, takes it over and Redis counts a delivery: enough of them on a live worker
        and _sort_out_crashers takes a valid entry for one that killed its worker each time."""
        for source in self.inputs.values():
            await self._touch(source, list(self.in_hand[source.stream]))

    async def _touch(self, source: Input, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of the entries in hand since claim_idle / 3 or more, so that no
        reclaim takes them over (JUSTID: no delivery counted)."""
        in_hand = self.in_hand[source.stream]
        now = time.monotonic()
        due = [e for e in entry_ids if now - in_hand.get(e, now) > self.settings.claim_idle.total_seconds() / 3]
        if not due:
            return
        with contextlib.suppress(Exception):
            await self.redis.xclaim(source.stream, self.group, self.name, min_idle_time=0, message_ids=due, justid=True)
            in_hand.update((e, now) for e in due if e in in_hand)  # those finished meanwhile stay out

    async def _settle(self, source: Input, entries: Sequence[Entry]) -> bool:
        if not entries:
            return True
        while True:
            try:
                await source.process(entries)
            except Exception as exc:  # noqa: BLE001 - classified below: outage (retry) or this batch's fault
                service = infrastructure_failure(exc)
                if service is not None:
                    await self._touch(source, [entry_id for entry_id, _ in entries])
                    if not await self.outage.wait(service, exc):
                        log.info("stopping during an outage; batch left pending", stream=source.stream,
                                 size=len(entries))
                        return False
                    continue
                if len(entries) == 1:
                    return await self._poison(source, entries[0], exc)
                # Isolate the failing entries: the good ones in this batch go through.
                half = len(entries) // 2
                log.warning("batch failed; retrying it in halves", stream=source.stream, size=len(entries),
                            error=repr(exc)[:300])
                return await self._settle(source, entries[:half]) and await self._settle(source, entries[half:])
            self.outage.ok()
            # As bytes: redis-py's encoder passes bytes through, and an XACK has one id per entry.
            ids = [entry_id.encode() for entry_id, _ in entries]
            return await self.retrying(lambda: self.redis.xack(source.stream, self.group, *ids))  # noqa: B023

    async def _poison(self, source: Input, entry: Entry, first: Exception) -> bool:
        """One entry that fails on its own: retry up to max_attempts, then dead-letter it."""
        error: Exception = first
        for attempt in range(2, self.settings.max_attempts + 1):
            log.warning("entry failed; retrying", stream=source.stream, entry_id=entry[0], attempt=attempt - 1,
                        error=repr(error)[:300])
            delay = min(2.0, 0.05 * 2**attempt)
            await self._touch(source, [entry[0]])
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
                return False  # stopping: leave it pending
            except TimeoutError:
                pass
            try:
                await source.process([entry])
            except Exception as exc:  # noqa: BLE001 - any error but an outage counts against the entry
                if infrastructure_failure(exc) is not None:
                    return await self._settle(source, [entry])  # an outage, not this entry's fault
                error = exc
            else:
                self.outage.ok()
                return await self.retrying(lambda: self.redis.xack(source.stream, self.group, entry[0]))
        return await self._dead_letter(source, entry, error)

    async def _dead_letter(self, source: Input, entry: Entry, error: Exception, *, attempts: int = 0) -> bool:
        entry_id, fields = entry
        try:
            model = decode_entry(fields).get("model")
        except Exception:  # noqa: BLE001 - the entry is broken in some way the gate let through; the model is optional
            model = None
        rejection = Rejection(
            reason=RejectionReason.PROCESSING_FAILED,
            detail=(f"failed {self.settings.max_attempts} times: {error!r}" if not attempts else str(error))[:2000],
            model=model if isinstance(model, str) else None,
            source_stream=source.stream,
            source_id=entry_id,
            payload=original_payload(fields),
        )
        writes = dlq_writes([rejection], stream=source.dlq, keys=self.keys)
        written: list[int] = []

        async def write() -> None:
            written.append(await xadd_once(
                self.redis, writes, ttl=self.settings.dedupe_ttl, wait=self.settings.replica_wait))

        if not await self.retrying(write):
            return False
        log.error("entry dead-lettered after repeated failures", stream=source.stream, entry_id=entry_id,
                  attempts=attempts or self.settings.max_attempts, error=repr(error)[:300])
        recorded = await asyncio.to_thread(self._record, rejection)
        # Counted once, as the pipeline counts a rejection read again: not if the store had the entry rejected
        # already (its first pass's reason, or this very dead-lettering, its worker gone before the ack).
        new = written[-1] > 0 if recorded is None else recorded
        metrics.observe_batch(source.label, size=1, seconds=0.0, rejected={rejection.reason.value: 1} if new else {})
        return await self.retrying(lambda: self.redis.xack(source.stream, self.group, entry_id))

    def _record(self, rejection: Rejection) -> bool | None:
        """Count it with the other rejections in the store, if the store takes it (it may be the
        very thing refusing this entry: the DLQ entry is what counts). Whether it was recorded now (False:
        the store had it already); None if the store refused it."""
        try:
            with Session(self.engine) as session:
                recorded = tracker.record_rejections(session, [rejection], now=self.clock())
                session.commit()
        except Exception as exc:  # noqa: BLE001 - the DLQ entry is the record that counts
            log.warning(
                "dead-lettered entry not counted in the store", entry_id=rejection.source_id, error=repr(exc)[:300]
            )
            return None
        return bool(recorded)

    async def reclaim_once(self) -> int:
        """Take over entries idle on any consumer longer than claim_idle; returns how many."""
        total = 0
        for source in self.inputs.values():
            total += await self._reclaim(source)
        return total

    async def _reclaim(self, source: Input) -> int:
        idle_ms = int(self.settings.claim_idle.total_seconds() * 1000)
        start, total = "0-0", 0
        while not self.stopping.is_set():
            next_id, messages, *_ = await self.redis.xautoclaim(
                source.stream, self.group, self.name, min_idle_time=idle_ms, start_id=start,
                count=self.settings.batch_size,
            )
            # Our own entries still being retried come back too (they idle while we back off).
            messages = [m for m in messages if as_text(m[0]) not in self.in_hand[source.stream]]
            if messages:
                log.info("reclaimed pending entries", stream=source.stream, count=len(messages))
                if not await self.handle(source, messages, redelivered=True):
                    return total
                total += len(messages)
            if as_text(next_id) == "0-0":
                break
            start = as_text(next_id)
        return total

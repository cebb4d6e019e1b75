"""Following rule changes: the file poll, SIGHUP, and reload requests on `<prefix>rules:reload`.

`serve` (service.RouterService) and `decision-router api` alone (api/server.run_api) keep their rules
current the same three ways, through one RulesFollower each: it swaps a valid new set into its
target's `ruleset` (one assignment), logs it, and runs the owner's follow-up (the service rebuilds
its channel receivers). Reloads are serialised; a broken edit keeps the old rules (watch.py logs why).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis.asyncio import Redis

from decision_router.consumer import infrastructure_failure
from decision_router.keys import Keys
from decision_router.rules import RuleSet
from decision_router.rules.watch import RulesWatcher

RELOAD_POLL_S = 0.1  # how often the reload subscriber looks at the stop flag
SUBSCRIBE_WAIT_S = 5.0  # at most this long, start waits for the reload subscriber to listen

Job = Callable[[], Awaitable[object]]


class HasRules(Protocol):
    ruleset: RuleSet


async def request_reload(redis: Redis, keys: Keys, *, rules_version: str, by: str, origin: str | None) -> int:
    """Ask every process on this prefix that follows reloads to re-read its rules now; returns how many
    subscribed processes received the request (PUBLISH's count). `by` names the asker in logs;
    `origin` is the RulesFollower.instance that has reloaded already (its API's), if any."""
    request = {"rules_version": rules_version, "by": by, "origin": origin}
    return int(await redis.publish(keys.rules_reload, json.dumps(request)))


def reload_request(data: bytes | str) -> dict[str, Any]:
    """The request's fields; anything else published on the channel still means "reload"."""
    try:
        request = json.loads(data)
    except ValueError:
        return {}
    return request if isinstance(request, dict) else {}


async def run_every(
    name: str, interval: float, job: Job, stopping: asyncio.Event, log: Any, *, wait_first: bool = False
) -> None:
    """Run `job` every `interval` seconds until `stopping`; a failure is logged and the job runs again."""
    if wait_first:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), max(0.05, interval))
    while not stopping.is_set():
        try:
            await job()
        except Exception as exc:
            # An outage is logged once by the read loop (or the health checks); a bug in a job is logged in full.
            if infrastructure_failure(exc) is not None:
                log.debug(f"{name} skipped: a service is unreachable", error=str(exc)[:300])
            else:
                log.exception(f"{name} failed; will retry")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), max(0.05, interval))


async def finish_tasks(tasks: list[asyncio.Task[None]], timeout: float, log: Any) -> None:
    """Wait for `tasks` (jobs told to stop) up to `timeout`; those still running then are cancelled.
    A task that ended with an error is logged."""
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    if pending:
        log.warning("shutdown timeout; unfinished work left pending", tasks=sorted(t.get_name() for t in pending))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.error("task ended with an error", task=task.get_name(), exc_info=task.exception())


class RulesFollower:
    """Keeps `target.ruleset` current with the rule files; see the module docstring. `log`: the owner's
    logger, so its lines read as before. `on_reload`: run after a swap, still serialised with it."""

    def __init__(
        self,
        watcher: RulesWatcher,
        target: HasRules,
        *,
        redis: Redis,
        keys: Keys,
        stopping: asyncio.Event,
        log: Any,
        on_reload: Callable[[RuleSet], Awaitable[None]] | None = None,
    ) -> None:
        self.watcher, self.target, self.redis, self.keys = watcher, target, redis, keys
        self.stopping, self.log, self.on_reload = stopping, log, on_reload
        # Tells this process's own reload broadcasts from the others: consumer names can repeat
        # (a standalone API sharing the environment of a `serve`), this cannot.
        self.instance = uuid.uuid4().hex
        # The poll, SIGHUP, the API and the broadcast each start reloads: one at a time, so one
        # that read older files cannot finish last and put back its rules or receivers.
        self.reloading = asyncio.Lock()
        # Set once the reload subscriber listens: start() waits for it, so that a reload requested
        # as soon as the process says it started reaches it.
        self.subscribed = asyncio.Event()

    async def start(self, every: Callable[[str, float, Job], None], poll_interval: float) -> None:
        """Start the poll (unless `poll_interval` is 0) and the subscriber through the owner's `every`
        (which runs a job periodically until stopping), and wait until the subscriber listens."""
        if poll_interval > 0:
            every("rules", poll_interval, self.check)
        # Resubscribes a second after a Redis error; a request missed meanwhile is caught by the poll.
        every("rules-reload", 1.0, self.follow_reload_requests)
        # Bounded: with Redis down the subscriber retries every second, and the process still starts.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.subscribed.wait(), SUBSCRIBE_WAIT_S)

    async def check(self, *, force: bool = False) -> None:
        """Swap in changed rule files if they are valid; a bad file keeps the old rules."""
        async with self.reloading:
            fresh = await asyncio.to_thread(self.watcher.reload if force else self.watcher.check)
            if fresh is None:
                return
            old = self.target.ruleset.version
            self.target.ruleset = fresh  # one assignment: each batch (or request) sees one rule set
            self.log.info("rules reloaded", rules_version=fresh.version, previous=old, rules=len(fresh.rules))
            if self.on_reload is not None:
                await self.on_reload(fresh)

    def reload_now(self) -> asyncio.Task[None]:
        """SIGHUP: re-read the rules now rather than at the next poll. The caller keeps the task (the
        loop holds only a weak reference, so it could be collected mid-reload) and waits for it at
        stop; a failure is logged, not left to asyncio's "exception was never retrieved"."""

        # Said even when nothing changed (then no "rules reloaded" follows): whoever sent it sees it arrived.
        self.log.info("SIGHUP: re-reading the rules")

        async def reload() -> None:
            try:
                await self.check(force=True)
            except Exception as exc:
                if infrastructure_failure(exc) is not None:
                    self.log.warning("rules reload failed: a service is unreachable", error=str(exc)[:300])
                else:
                    self.log.error("rules reload failed", exc_info=exc)

        return asyncio.create_task(reload(), name="rules-sighup")

    async def follow_reload_requests(self) -> None:
        """Re-read the rules when any process on this stream prefix asks (POST /v1/rules/reload,
        published on keys.rules_reload), until stopping; a Redis error ends it (the caller resubscribes)."""
        # A cluster client routes SUBSCRIBE by the slots it learned on its first command (KeyError before
        # any): the owner has used it by then (the service created its consumer groups, `api` pinged).
        pubsub = self.redis.pubsub()
        try:
            # subscribe() only sends the command: listening starts when Redis confirms it.
            await pubsub.subscribe(self.keys.rules_reload)
            while not self.stopping.is_set():
                message = await pubsub.get_message(timeout=RELOAD_POLL_S)
                if message is None:
                    continue
                if message["type"] != "message":
                    if message["type"] == "subscribe":
                        self.subscribed.set()
                    continue
                request = reload_request(message["data"])
                if request.get("origin") != self.instance:  # else this process's API has reloaded it already
                    self.log.info("rules reload requested", by=request.get("by"),
                                  rules_version=request.get("rules_version"))
                    await self.check(force=True)
        finally:
            await pubsub.aclose()

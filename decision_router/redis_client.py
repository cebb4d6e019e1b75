"""Every Redis client of the router, the CLI and the API is made here: a plain one, or the cluster
client when DECISION_ROUTER_REDIS_CLUSTER is on (README, "Redis Cluster")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import AskError, ClusterCrossSlotError, RedisClusterException, RedisError

if TYPE_CHECKING:
    from decision_router.settings import Settings

# What a failed command raises: the cluster client's own errors (no node reachable, slots not covered) are
# no RedisError, and would otherwise escape as tracebacks where a plain client's are reported.
REDIS_ERRORS = (RedisError, RedisClusterException)


def cluster_hint(exc: BaseException) -> str:
    """What to add to the message of `exc`: a redirection means a plain client is talking to a cluster node
    (redis-py's message then reads only "<slot> <host>:<port>")."""
    if isinstance(exc, (AskError, ClusterCrossSlotError)):  # MovedError is an AskError
        return (
            " (a redirection: this Redis is a cluster node; set DECISION_ROUTER_REDIS_CLUSTER=true and a "
            "hash-tagged DECISION_ROUTER_STREAM_PREFIX such as '{dr}:')"
        )
    return ""


def redis_from_url(url: str, *, cluster: bool = False, **options: Any) -> Redis:
    """A client for `url`: with `cluster`, a RedisCluster that learns the other nodes from this one.

    Typed as Redis: RedisCluster offers the same commands, pipelines (transaction=False), pub/sub and
    scripts, routing each to the node owning its keys' slot."""
    if cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(url, **options)  # type: ignore[return-value]
    return Redis.from_url(url, **options)


def redis_for(settings: Settings, **options: Any) -> Redis:
    """The client the settings describe (the embedded Redis when no URL is set)."""
    return redis_from_url(settings.effective_redis_url, cluster=settings.redis_cluster, **options)

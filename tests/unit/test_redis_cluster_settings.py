"""DECISION_ROUTER_REDIS_CLUSTER: refused at start (exit 2, one line) unless every key of the deployment
can be in one slot, and the client factory makes the cluster client when it is on."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from decision_router.redis_client import redis_for
from decision_router.settings import SettingsError, hash_tag, load_settings
from tests.unit.test_cli_input import invoke, one_error

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_URL = "redis://10.0.0.1:7000/0"
NO_TAG = "DECISION_ROUTER_REDIS_CLUSTER: needs DECISION_ROUTER_STREAM_PREFIX with a hash tag"


@pytest.mark.parametrize(
    ("prefix", "tag"),
    [
        ("{dr}:", "dr"),
        ("acme:{dr-0}:", "dr-0"),
        ("{a}{b}:", "a"),  # Redis hashes the first tag only
        ("", None),
        ("dr:", None),
        ("{}dr:", None),  # an empty tag: Redis hashes the whole key
        ("{}{dr}:", None),  # ...and does not look further
        ("dr{", None),  # left open: an owner id holding "}" would close it, each inbox in its own slot
        ("}dr{:", None),
    ],
)
def test_hash_tag_is_read_as_redis_reads_it(prefix: str, tag: str | None) -> None:
    assert hash_tag(prefix) == tag


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STREAM_PREFIX": "dr:"}, f"{NO_TAG}, e.g. '{{dr}}:', not 'dr:'"),
        ({}, f"{NO_TAG}, e.g. '{{dr}}:', not ''"),
        ({"STREAM_PREFIX": "{}dr:"}, NO_TAG),
        ({"STREAM_PREFIX": "{dr}:", "REDIS_URL": None},
         ("DECISION_ROUTER_REDIS_CLUSTER: needs DECISION_ROUTER_REDIS_URL (a node of the cluster): the embedded "
          "Redis is no cluster")),
        ({"STREAM_PREFIX": "{dr}:", "REDIS_URL": "redis://10.0.0.1:7000/3"},
         "DECISION_ROUTER_REDIS_CLUSTER: a cluster has database 0 only, not 3"),
        ({"STREAM_PREFIX": "{dr}:", "REDIS_URL": "unix:///run/redis.sock"},
         "DECISION_ROUTER_REDIS_CLUSTER: a cluster is reached over TCP"),
    ],
)
def test_cluster_mode_refuses_what_would_fail_later(monkeypatch, env: dict, message: str) -> None:
    monkeypatch.setenv("DECISION_ROUTER_REDIS_CLUSTER", "true")
    monkeypatch.setenv("DECISION_ROUTER_REDIS_URL", CLUSTER_URL)
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(f"DECISION_ROUTER_{name}")
        else:
            monkeypatch.setenv(f"DECISION_ROUTER_{name}", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_serve_with_an_untagged_prefix_on_a_cluster_exits_2_before_connecting(monkeypatch) -> None:
    # Without the check, the first batch's script fails with CROSSSLOT, after start-up looked fine.
    monkeypatch.setenv("DECISION_ROUTER_REDIS_CLUSTER", "true")
    monkeypatch.setenv("DECISION_ROUTER_REDIS_URL", CLUSTER_URL)
    monkeypatch.setenv("DECISION_ROUTER_STREAM_PREFIX", "dr:")
    assert one_error(invoke("serve"), 2).startswith(f"error: {NO_TAG}")


def test_the_factory_makes_the_client_the_settings_describe(monkeypatch) -> None:
    monkeypatch.setenv("DECISION_ROUTER_REDIS_URL", CLUSTER_URL)
    monkeypatch.setenv("DECISION_ROUTER_STREAM_PREFIX", "{dr}:")
    plain = redis_for(load_settings())
    assert type(plain) is Redis
    monkeypatch.setenv("DECISION_ROUTER_REDIS_CLUSTER", "true")
    cluster = redis_for(load_settings())  # no connection until the first command
    assert isinstance(cluster, RedisCluster)
    assert [n.name for n in cluster.nodes_manager.startup_nodes.values()] == ["10.0.0.1:7000"]


@pytest.mark.parametrize("value", ["false", "0", ""])
def test_cluster_mode_off_asks_nothing_of_the_prefix(monkeypatch, value: str) -> None:
    monkeypatch.setenv("DECISION_ROUTER_REDIS_CLUSTER", value)
    if value == "":
        monkeypatch.delenv("DECISION_ROUTER_REDIS_CLUSTER")
    monkeypatch.setenv("DECISION_ROUTER_STREAM_PREFIX", "dr:")
    assert load_settings().redis_cluster is False


@pytest.mark.parametrize("command", [["health"], ["serve", "--no-api"]])
def test_an_unreachable_cluster_is_one_error_line_not_a_traceback(monkeypatch, tmp_path, command: list[str]) -> None:
    # The cluster client's "cannot be connected" is no RedisError: it escaped the CLI's handlers.
    from tests.e2e.helpers import free_port

    monkeypatch.setenv("DECISION_ROUTER_REDIS_CLUSTER", "true")
    monkeypatch.setenv("DECISION_ROUTER_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("DECISION_ROUTER_STREAM_PREFIX", "{dr}:")
    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", f"sqlite:///{tmp_path / 'store.db'}")
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(ROOT / "rules"))
    result = invoke(*command)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.exception
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]  # serve logs a warning (no SMTP) first
    assert last.startswith("error: cannot reach Redis at redis://127.0.0.1:"), result.stderr
    assert "Redis Cluster cannot be connected" in last

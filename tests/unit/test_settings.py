from __future__ import annotations

from datetime import timedelta

import pytest

from decision_router.durations import format_duration, parse_duration
from decision_router.settings import ReplicaWait, SettingsError, load_settings


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("4h", 14400), ("2d", 172800), ("1w", 604800), ("1d12h", 129600), ("90", 90), (2.5, 2.5)],
)
def test_durations(text, seconds) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "4x", "h4", "4h 5", "-1h", "soon", None])
def test_bad_durations(text) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration_round_trips() -> None:
    assert format_duration(timedelta(hours=4)) == "4h"
    assert format_duration(timedelta(days=14)) == "2w"
    assert parse_duration(format_duration(timedelta(seconds=129600))) == timedelta(seconds=129600)


def test_defaults_are_the_embedded_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.embedded
    assert settings.effective_redis_url == "redis://127.0.0.1:6399/0"
    assert settings.database_url == "sqlite:///decision_router.db"
    assert str(settings.rules_dir) == "rules"


def test_settings_read_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECISION_ROUTER_REDIS_URL", "redis://cache:6380/2")
    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", "postgresql://u:p@db/x")
    monkeypatch.setenv("DECISION_ROUTER_MAX_PREDICTION_AGE", "2d")
    settings = load_settings()
    assert not settings.embedded
    assert settings.effective_redis_url == "redis://cache:6380/2"
    # bare postgresql:// means psycopg2 to SQLAlchemy; we ship psycopg 3
    assert settings.database_url == "postgresql+psycopg://u:p@db/x"
    assert settings.max_prediction_age == timedelta(days=2)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DECISION_ROUTER_REDIS_URL", "http://x", "DECISION_ROUTER_REDIS_URL: must start with redis://"),
        ("DECISION_ROUTER_DATABASE_URL", "mysql://x", "DECISION_ROUTER_DATABASE_URL: must be a sqlite:/// or postgresql"),
        ("DECISION_ROUTER_MAX_PREDICTION_AGE", "soon", "DECISION_ROUTER_MAX_PREDICTION_AGE: expected a duration"),
        ("DECISION_ROUTER_BATCH_SIZE", "0", "DECISION_ROUTER_BATCH_SIZE: Input should be greater than or equal to 1"),
        ("DECISION_ROUTER_LOG_FORMAT", "xml", "DECISION_ROUTER_LOG_FORMAT: Input should be 'auto', 'console' or 'json'"),
    ],
)
def test_bad_setting_is_one_line_naming_the_variable(monkeypatch, variable, value, message) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("postgresql+psycopg://app:pw@db:5432/x", "postgresql+psycopg://app:***@db:5432/x"),
        ("redis://127.0.0.1:6399/0", "redis://127.0.0.1:6399/0"),
        ("postgresql+psycopg://postgres@db/test", "postgresql+psycopg://postgres@db/test"),
    ],
)
def test_passwords_never_shown(url, shown) -> None:
    from decision_router.settings import redact_url

    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        # Each gave a traceback in the first command that opened the store or connected to Redis.
        ("DATABASE_URL", "postgresql://u:s3cret@127.0.0.1:abc/db",
         "cannot read the host and port of postgresql+psycopg://u:***@127.0.0.1:abc/db"),
        ("DATABASE_URL", "postgresql://u:s3cret@[::1:5432/db", "cannot read the host and port of"),
        ("DATABASE_URL", "postgresql+psycopg2://u:s3cret@db/x",
         "must be a sqlite:/// or postgresql+psycopg:// URL, not postgresql+psycopg2://"),
        ("DATABASE_URL", "sqlitex://x", "must be a sqlite:/// or postgresql+psycopg:// URL, not sqlitex://"),
        ("DATABASE_URL", "postgresqlfoo://x", "must be a sqlite:/// or postgresql+psycopg:// URL, not postgresqlfoo://"),
        ("DATABASE_URL", "postgresql://u:s3cret@db:99999/x", "port 99999 is outside 1..65535"),
        ("DATABASE_URL", "sqlite://host/x.db", "an SQLite URL names no host"),
        # SQLAlchemy printed a warning and ignored them (mode=ro opened the file for writing); SQLite would
        # ignore a name it does not know, or open a file named 'x.db?mode=ro' (uri=true without file:).
        ("DATABASE_URL", "sqlite:///x.db?mode=bogus", "the SQLite URL option mode must be ro, rw, rwc or memory, not 'bogus'"),
        ("DATABASE_URL", "sqlite:///x.db?mode=ro", "SQLite reads mode only with uri=true and a file: name, as "
                                                   "sqlite:///file:PATH?mode=ro&uri=true: sqlite:///x.db?mode=ro"),
        ("DATABASE_URL", "sqlite:///x.db?mode=ro&uri=true", "SQLite reads mode only with uri=true and a file: name"),
        ("DATABASE_URL", "sqlite:///file:x.db?mode=ro", "SQLite reads mode only with uri=true and a file: name"),
        ("DATABASE_URL", "sqlite:///file:x.db", "a file: name needs uri=true"),
        ("DATABASE_URL", "sqlite:///x.db?foo=1", "an SQLite URL takes no option 'foo' (its options: cache, "),
        ("DATABASE_URL", "sqlite:///file:x.db?mdoe=ro&uri=true", "an SQLite URL takes no option 'mdoe'"),
        ("DATABASE_URL", "sqlite:///file:x.db?mode=ro&mode=rw&uri=true", "the SQLite URL option mode is given 2 times"),
        ("DATABASE_URL", "sqlite:///file:x.db?cache=all&uri=true", "the SQLite URL option cache must be shared or private"),
        ("DATABASE_URL", "sqlite:///file:x.db?immutable=maybe&uri=true", "the SQLite URL option immutable must be true, "),
        # A ValueError traceback from SQLAlchemy or sqlite3 at the first connection.
        ("DATABASE_URL", "sqlite:///x.db?timeout=abc", "the SQLite URL option timeout must be a number of seconds, not 'abc'"),
        ("DATABASE_URL", "sqlite:///x.db?uri=maybe", "the SQLite URL option uri must be true or false, not 'maybe'"),
        ("DATABASE_URL", "sqlite:///x.db?cached_statements=1.5", "the SQLite URL option cached_statements must be a whole"),
        ("DATABASE_URL", "sqlite:///x.db?isolation_level=bogus",
         "the SQLite URL option isolation_level must be DEFERRED, IMMEDIATE or EXCLUSIVE, not 'bogus'"),
        ("REDIS_URL", "redis://127.0.0.1:abc/0", "Port could not be cast to integer value as 'abc'"),
        ("REDIS_URL", "redis://127.0.0.1:99999/0", "Port out of range"),
        ("REDIS_URL", "redis://:s3cret@127.0.0.1:6379/0?socket_timeout=abc",
         "Invalid value for 'socket_timeout' in connection URL: redis://:***@127.0.0.1:6379/0?socket_timeout=abc"),
        ("REDIS_URL", "redis://[::1:6379/0", "Invalid IPv6 URL"),
        ("REDIS_URL", "redis://127.0.0.1:0/0", "port 0 is outside 1..65535"),
        # redis-py silently used database 0.
        ("REDIS_URL", "redis://127.0.0.1:6379/abc", "the database in the path must be a number, not 'abc'"),
    ],
)
def test_malformed_urls_are_refused_at_start(monkeypatch, variable, value, message) -> None:
    monkeypatch.setenv(f"DECISION_ROUTER_{variable}", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    shown = str(caught.value)
    assert shown.startswith(f"DECISION_ROUTER_{variable}: {message}")
    assert "s3cret" not in shown and "\n" not in shown


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "sqlite:///decision_router.db"),
        ("DATABASE_URL", "sqlite+pysqlite:////tmp/x.db"),
        ("DATABASE_URL", "sqlite://"),
        ("DATABASE_URL", "sqlite:///file:x?mode=memory&uri=true"),
        ("DATABASE_URL", "sqlite:///file:x?mode=memory&cache=shared&uri=true"),
        ("DATABASE_URL", "sqlite:////tmp/x.db?timeout=5"),
        ("DATABASE_URL", "sqlite:///file:/tmp/x.db?mode=ro&uri=true"),
        ("DATABASE_URL", "sqlite:///file:x.db?immutable=1&uri=True"),
        ("DATABASE_URL", "sqlite:///x.db?uri=true"),  # no SQLite option: x.db, as without uri
        ("DATABASE_URL", "postgresql+psycopg://u:p@[::1]:5432/x?sslmode=require"),
        ("DATABASE_URL", "postgresql+psycopg:///x?host=/var/run/postgresql"),
        ("REDIS_URL", "redis://127.0.0.1:6379"),
        ("REDIS_URL", "rediss://u:p@[::1]:6380/15?socket_timeout=2.5"),
        ("REDIS_URL", "unix:///run/redis.sock?db=2"),
    ],
)
def test_well_formed_urls_are_accepted(monkeypatch, variable, value) -> None:
    monkeypatch.setenv(f"DECISION_ROUTER_{variable}", value)
    assert getattr(load_settings(), variable.lower()) == value


@pytest.mark.parametrize(
    ("value", "cluster", "message"),
    [
        ("redis://:s3cret@127.0.0.1:6379/0?foo=bar", False, "the Redis client takes no option 'foo'"),
        ("redis://127.0.0.1:6379/0?ssl_cert_reqs=required", False,
         "the Redis client takes no option 'ssl_cert_reqs' (the ssl_* options are for rediss:// URLs)"),
        ("unix:///run/redis.sock?foo=1", False, "the Redis client takes no option 'foo'"),
        ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=bogus", False, "Invalid SSL Certificate Requirements Flag: bogus"),
        ("redis://127.0.0.1:6379/0?protocol=9", False, "protocol must be either 2 or 3"),
        ("redis://127.0.0.1:7000/0?foo=bar", True, "the Redis client takes no option 'foo'"),
    ],
)
def test_a_redis_url_option_the_client_does_not_take_is_refused_at_start(monkeypatch, value, cluster, message) -> None:
    # redis-py hands them to the connection only when a command first connects: a TypeError traceback there.
    monkeypatch.setenv("DECISION_ROUTER_REDIS_URL", value)
    if cluster:
        monkeypatch.setenv("DECISION_ROUTER_REDIS_CLUSTER", "true")
        monkeypatch.setenv("DECISION_ROUTER_STREAM_PREFIX", "{dr}:")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    shown = str(caught.value)
    assert shown.startswith(f"DECISION_ROUTER_REDIS_URL: {message}: ")
    assert "s3cret" not in shown and "\n" not in shown


def test_a_cluster_url_may_hold_the_options_only_the_cluster_client_takes(monkeypatch) -> None:
    monkeypatch.setenv("DECISION_ROUTER_REDIS_URL", "redis://127.0.0.1:7000/0?require_full_coverage=false")
    monkeypatch.setenv("DECISION_ROUTER_REDIS_CLUSTER", "true")
    monkeypatch.setenv("DECISION_ROUTER_STREAM_PREFIX", "{dr}:")
    assert load_settings().redis_cluster


def test_embedded_redis_on_an_ipv6_host_is_a_valid_url(monkeypatch) -> None:
    from redis.connection import parse_url

    monkeypatch.setenv("DECISION_ROUTER_EMBEDDED_HOST", "::1")
    url = load_settings().effective_redis_url
    assert url == "redis://[::1]:6399/0"
    assert parse_url(url)["host"] == "::1"


# Durations that 0, or a value close to it, broke silently: each now exits at start with its allowed range.


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        # Any other consumer reclaimed entries a live worker had just read: every entry processed by every worker.
        ("CLAIM_IDLE", "0", "must be at least 0.1s, not 0s"),
        ("CLAIM_IDLE", "0.09s", "must be at least 0.1s, not 0.09s"),
        # A sweep every 0.05s (the loop's floor), querying the store each time; 0 never meant off.
        ("SWEEP_INTERVAL", "0", "must be at least 1s, not 0s: escalation cannot be turned off"),
        ("SWEEP_INTERVAL", "0.5s", "must be at least 1s, not 0.5s"),
        # Clamped to 0.2s without a word.
        ("RETRY_BACKOFF_MAX", "0", "must be at least 0.2s, not 0s"),
        # 0 cancelled the batch in hand at once ("0 = no timeout" to some readers).
        ("SHUTDOWN_TIMEOUT", "0", "must be at least 1s, not 0s"),
        # Clamped to 1s by xadd_once: a redelivery later than that wrote a second alert.
        ("DEDUPE_TTL", "0", "must be at least 1m, not 0s"),
        ("DEDUPE_TTL", "59s", "must be at least 1m, not 59s"),
        # An entity's outcome matched no prediction; every prediction stale.
        ("OUTCOME_WINDOW", "0", "must be at least 1s, not 0s"),
        ("MAX_PREDICTION_AGE", "0", "must be at least 1s, not 0s"),
        # 0 is off; a fraction of a second ran the check every 0.05s.
        ("DRIFT_INTERVAL", "0.5s", "must be 0 (off) or at least 1s, not 0.5s"),
        ("RULES_POLL_INTERVAL", "0.5s", "must be 0 (off) or at least 1s, not 0.5s"),
        # WAIT 0 blocks until a replica answers, however long it is gone.
        ("REDIS_WAIT_TIMEOUT", "0", "must be at least 0.1s, not 0s"),
    ],
)
def test_a_duration_too_short_to_work_is_refused_naming_its_range(monkeypatch, variable, value, message) -> None:
    monkeypatch.setenv(f"DECISION_ROUTER_{variable}", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith(f"DECISION_ROUTER_{variable}: {message}")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CLAIM_IDLE", "0.1s"),
        ("CLAIM_IDLE", 0.2),  # what the integration tests use, to reclaim quickly
        ("RETRY_BACKOFF_MAX", "0.2s"),
        ("SWEEP_INTERVAL", "1s"),
        ("SHUTDOWN_TIMEOUT", "1s"),
        ("DRIFT_INTERVAL", "0"),  # off
        ("RULES_POLL_INTERVAL", "0"),  # only on SIGHUP
        ("DRIFT_INTERVAL", "1s"),
        ("MAX_CLOCK_SKEW", "0"),  # no timestamp ahead of the router's clock tolerated
        ("OUTCOME_WINDOW", "1s"),
        ("MAX_PREDICTION_AGE", "1s"),
        ("DEDUPE_TTL", "2h"),  # twice the longest retry interval by default, the drift check's 1h
        ("REDIS_WAIT_TIMEOUT", "0.1s"),
    ],
)
def test_the_shortest_working_durations_are_taken(variable, value) -> None:
    settings = load_settings(**{variable.lower(): value})
    assert getattr(settings, variable.lower()) == parse_duration(value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dedupe_ttl": "1h"},  # the drift check's default interval
         "DECISION_ROUTER_DEDUPE_TTL (1h) must be at least twice DECISION_ROUTER_DRIFT_INTERVAL (1h)"),
        ({"dedupe_ttl": "10m", "drift_interval": "0", "sweep_interval": "1h"},
         "DECISION_ROUTER_DEDUPE_TTL (10m) must be at least twice DECISION_ROUTER_SWEEP_INTERVAL (1h)"),
        ({"dedupe_ttl": "15m", "drift_interval": "0", "claim_idle": "10m"},
         "DECISION_ROUTER_DEDUPE_TTL (15m) must be at least twice DECISION_ROUTER_CLAIM_IDLE (10m)"),
        ({"dedupe_ttl": "3m", "drift_interval": "0", "retry_backoff_max": "2m"},
         "DECISION_ROUTER_DEDUPE_TTL (3m) must be at least twice DECISION_ROUTER_RETRY_BACKOFF_MAX (2m)"),
    ],
)
def test_dedupe_markers_must_outlive_the_next_retry_of_a_write(values, message) -> None:
    """A write whose delivery the store did not record is made again after one of these intervals: its dedupe
    marker must still be there, or the alert (or the dead letter) is written twice."""
    with pytest.raises(SettingsError) as caught:
        load_settings(**values)
    assert str(caught.value).startswith(message)
    assert "dedupe marker" in str(caught.value) and "\n" not in str(caught.value)


def test_dedupe_markers_as_long_as_every_retry_allows_are_taken() -> None:
    settings = load_settings(dedupe_ttl="20m", drift_interval="0", sweep_interval="10m", claim_idle="10m",
                             retry_backoff_max="10m")
    assert settings.dedupe_ttl == timedelta(minutes=20)


def test_no_replica_wait_by_default() -> None:
    assert load_settings().replica_wait is None


def test_the_replica_wait_is_the_replicas_and_the_timeout_in_milliseconds(monkeypatch) -> None:
    monkeypatch.setenv("DECISION_ROUTER_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("DECISION_ROUTER_REDIS_WAIT_REPLICAS", "2")
    monkeypatch.setenv("DECISION_ROUTER_REDIS_WAIT_TIMEOUT", "1.5s")
    assert load_settings().replica_wait == ReplicaWait(replicas=2, timeout_ms=1500)


def test_the_embedded_redis_has_no_replicas_to_wait_for(monkeypatch) -> None:
    monkeypatch.setenv("DECISION_ROUTER_REDIS_WAIT_REPLICAS", "1")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value) == (
        "DECISION_ROUTER_REDIS_WAIT_REPLICAS: needs DECISION_ROUTER_REDIS_URL: the embedded Redis has no replicas "
        "to wait for"
    )

"""Settings from the environment (prefix DECISION_ROUTER_), validated once at start."""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from decision_router.durations import format_span, parse_duration

ENV_PREFIX = "DECISION_ROUTER_"


@dataclass(frozen=True)
class PayloadLimits:
    """Bounds on one stream entry (DECISION_ROUTER_MAX_PAYLOAD_BYTES / _DEPTH), applied by the quality gate.

    Defined here, not in quality.py: settings would otherwise import the gate and with it redis."""

    max_bytes: int = 64 * 1024  # keys + values, as UTF-8 bytes
    max_depth: int = 10  # nesting of objects and lists; the message itself is level 1


@dataclass(frozen=True)
class ReplicaWait:
    """WAIT after the router's inbox and DLQ writes (DECISION_ROUTER_REDIS_WAIT_REPLICAS / _TIMEOUT): how many
    replicas must acknowledge them, and how long to wait for that. Here, not in streams.py, for the reason above."""

    replicas: int
    timeout_ms: int


class SettingsError(Exception):
    """A bad setting: the message is one line naming the variable."""


@dataclass(frozen=True)
class DurationFloor:
    """The shortest value a duration setting works with; `off`: 0 is also taken, and means off."""

    least: timedelta
    why: str
    off: bool = False


# Each duration that 0 (or a value close to it) would break silently. README's Configuration table shows the
# floors as `>= 1s` (tests/unit/test_readme_reference.py checks them against this table).
DURATION_FLOORS: dict[str, DurationFloor] = {
    "max_prediction_age": DurationFloor(timedelta(seconds=1), "a shorter one rejects predictions as stale in transit"),
    "outcome_window": DurationFloor(
        timedelta(seconds=1), "a shorter one matches an entity's outcome to almost no prediction"),
    # Tests reclaim after 0.2s; below 0.1s the reclaim would also run more often than every 0.05s.
    "claim_idle": DurationFloor(
        timedelta(seconds=0.1), "a shorter one has other workers take over entries a live worker is processing"),
    "retry_backoff_max": DurationFloor(timedelta(seconds=0.2), "the first retry already waits 0.2s"),
    "shutdown_timeout": DurationFloor(
        timedelta(seconds=1), "a shorter one cuts off the batch in hand instead of finishing it"),
    "sweep_interval": DurationFloor(timedelta(seconds=1), "escalation cannot be turned off; to sweep rarely, set 1d"),
    "rules_poll_interval": DurationFloor(
        timedelta(seconds=1), "a shorter poll re-reads the rule files many times a second", off=True),
    "drift_interval": DurationFloor(
        timedelta(seconds=1), "a shorter one queries the store for every model many times a second", off=True),
    # WAIT's timeout 0 would block the writing worker until a replica answers, however long it is gone.
    "redis_wait_timeout": DurationFloor(
        timedelta(seconds=0.1), "a shorter one fails writes a healthy replica acknowledges a moment later"),
    "dedupe_ttl": DurationFloor(
        timedelta(minutes=1), "a restarted worker, or the outbox drained at start, must still find the markers"),
}


# The settings after which an inbox or DLQ write may be made again, and when: DECISION_ROUTER_DEDUPE_TTL covers each.
DEDUPE_RETRIES = {
    "claim_idle": "a crashed worker's write is made again when its entry is reclaimed, up to 1.5 x that after it "
                  "was read",
    "sweep_interval": "an escalation copy whose delivery was not recorded is written again at the next sweep",
    "drift_interval": "a data-quality alert whose delivery was not recorded is written again at the next check",
    "retry_backoff_max": "a batch's write is made again when the batch is retried, up to that long after a failure",
}


def shown_span(value: timedelta) -> str:
    """A duration as a message shows it: "1d6h", or "0.1s" under a whole second."""
    return format_span(value) if value % timedelta(seconds=1) == timedelta(0) else f"{value.total_seconds():g}s"


# A From address, bare or as 'Name <address>': its domain may be a host name without a dot (the default
# decision-router@localhost, a local relay), unlike an owner's email; never a line break (header injection).
_ADDRESS_CHARS = r"[^@\s<>,\"\x00-\x1f\x7f]+"
SENDER_ADDRESS = re.compile(rf"{_ADDRESS_CHARS}@{_ADDRESS_CHARS}")


def check_sender(value: str) -> str:
    """The From address if the email channel can send with it, else ValueError."""
    from email.utils import parseaddr

    if any(c in value for c in "\r\n") or not SENDER_ADDRESS.fullmatch(parseaddr(value)[1]):
        raise ValueError(
            f"expected a From address like alerts@example.com or 'Name <alerts@example.com>', got {value!r}"
        )
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Unset: the embedded default (in-process fakeredis served on loopback).
    redis_url: str | None = None
    database_url: str = "sqlite:///decision_router.db"
    rules_dir: Path = Path("rules")

    # Quality gate.
    max_prediction_age: timedelta = timedelta(days=1)
    max_clock_skew: timedelta = timedelta(minutes=5)
    # Hostile-input bounds: an entry's size is checked before anything is parsed.
    max_payload_bytes: int = Field(default=64 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_payload_depth: int = Field(default=10, ge=2, le=100)

    # An outcome addressed by entity applies to predictions made this long before it.
    outcome_window: timedelta = timedelta(days=30)

    # Stream names are prefixed so several deployments (or tests) can share one Redis.
    stream_prefix: str = ""
    # redis_url is a node of a Redis Cluster: connect with the cluster client. Declared after redis_url and
    # stream_prefix, which its check reads (pydantic validates fields in this order).
    redis_cluster: bool = False
    # Replicas that must acknowledge the router's inbox and DLQ writes (WAIT) before the batch counts as
    # delivered and its input is acknowledged, so a failover to one of them cannot lose them (0 = off: no WAIT).
    redis_wait_replicas: int = Field(default=0, ge=0, le=100)
    # How long one WAIT waits for them; past it, the writes are retried like a Redis outage.
    redis_wait_timeout: timedelta = timedelta(seconds=1)
    consumer_group: str = "decision-router"
    consumer_name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    batch_size: int = Field(default=500, ge=1, le=10_000)
    # A message pending this long on another consumer is presumed orphaned and reclaimed.
    claim_idle: timedelta = timedelta(seconds=60)
    # Blocking read: how long an idle worker waits for entries (SIGTERM cuts the wait short). At most 4 s:
    # redis-py gives up on a reply after its 5 s socket timeout, and a longer block failed every idle read.
    read_block_ms: int = Field(default=1000, ge=1, le=4_000)
    # An entry failing on its own this many times goes to its DLQ (reason processing_failed).
    max_attempts: int = Field(default=5, ge=1, le=100)
    # Longest wait between retries while Redis or the store is unreachable (backoff doubles up to it).
    retry_backoff_max: timedelta = timedelta(seconds=5)
    # SIGTERM: how long to finish and acknowledge the batch in hand before exiting anyway.
    shutdown_timeout: timedelta = timedelta(seconds=10)
    # How often each worker looks for missed SLA deadlines to escalate.
    sweep_interval: timedelta = timedelta(seconds=30)
    # How often `serve` and `api` check the rule files for changes (0 = only on SIGHUP or a reload request).
    rules_poll_interval: timedelta = timedelta(seconds=5)
    # How often each worker checks models for drift and data-quality jumps (0 = never).
    drift_interval: timedelta = timedelta(hours=1)
    # How long the Redis dedupe markers for written alerts and DLQ entries live.
    dedupe_ttl: timedelta = timedelta(days=7)

    # SMTP for the email channel; unset host = email deliveries are skipped (warned at start).
    smtp_host: str | None = None
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_starttls: bool = False
    smtp_use_tls: bool = False
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_password_file: Path | None = None
    smtp_sender: str = "decision-router@localhost"

    # The HTTP API (served by `serve` unless --no-api, or by `decision-router api`); port 0 = any free port.
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    # The largest request body the API reads; unset: max_payload_bytes x the most items per request.
    api_max_body_bytes: int | None = Field(default=None, ge=1024)

    embedded_host: str = "127.0.0.1"
    embedded_port: int = Field(default=6399, ge=1, le=65535)

    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator(
        "max_prediction_age", "max_clock_skew", "claim_idle", "dedupe_ttl", "sweep_interval", "rules_poll_interval",
        "outcome_window", "drift_interval", "retry_backoff_max", "shutdown_timeout",
        "redis_wait_timeout", mode="before",
    )
    @classmethod
    def _duration(cls, value: object) -> timedelta:
        return parse_duration(value)  # type: ignore[arg-type]

    @field_validator(*DURATION_FLOORS)
    @classmethod
    def _duration_floor(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        floor = DURATION_FLOORS[info.field_name]  # type: ignore[index]
        if value >= floor.least or (floor.off and not value):
            return value
        allowed = f"{'0 (off) or ' if floor.off else ''}at least {shown_span(floor.least)}"
        raise ValueError(f"must be {allowed}, not {shown_span(value)}: {floor.why}")

    @model_validator(mode="after")
    def _dedupe_outlives_retries(self) -> Settings:
        # A write whose delivery the store did not record (a crash, a failed commit) is made again later. Its
        # dedupe marker must still be there, or the owner gets the alert twice. Twice the interval: a margin.
        for name, when in DEDUPE_RETRIES.items():
            interval: timedelta = getattr(self, name)
            if self.dedupe_ttl < 2 * interval:
                raise ValueError(
                    f"{ENV_PREFIX}DEDUPE_TTL ({shown_span(self.dedupe_ttl)}) must be at least twice "
                    f"{ENV_PREFIX}{name.upper()} ({shown_span(interval)}): {when}, and must then still find "
                    "its dedupe marker, or it is written twice"
                )
        return self

    @field_validator("stream_prefix", "consumer_group", "consumer_name")
    @classmethod
    def _utf8(cls, value: str) -> str:
        # Bytes in the environment that are not UTF-8 arrive as lone surrogates, which no Redis name can take.
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("not valid UTF-8") from None
        return value

    @field_validator("smtp_sender")
    @classmethod
    def _smtp_sender(cls, value: str) -> str:
        return check_sender(value)

    @model_validator(mode="after")
    def _smtp_consistent(self) -> Settings:
        # What the email channel refuses, said at start with the variables' names, not as its traceback.
        # (An unreadable password file is found where the channel reads it: notify.smtp_settings.)
        smtp = f"{ENV_PREFIX}SMTP_"
        if self.smtp_starttls and self.smtp_use_tls:
            raise ValueError(f"{smtp}STARTTLS and {smtp}USE_TLS are exclusive: STARTTLS upgrades a plain "
                             "connection, implicit TLS starts with TLS; set one")
        if self.smtp_password is not None and self.smtp_password_file is not None:
            raise ValueError(f"{smtp}PASSWORD and {smtp}PASSWORD_FILE: set one, not both")
        if (self.smtp_password is not None or self.smtp_password_file is not None) and not self.smtp_username:
            raise ValueError(f"{smtp}PASSWORD{'_FILE' if self.smtp_password is None else ''} needs {smtp}USERNAME")
        return self

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return check_redis_url(value)

    @field_validator("redis_cluster")
    @classmethod
    def _cluster_needs(cls, value: bool, info: ValidationInfo) -> bool:
        if not value:
            return value
        if "redis_url" not in info.data or "stream_prefix" not in info.data:
            return value  # one of them is bad already, and is reported
        url, prefix = info.data["redis_url"], info.data["stream_prefix"]
        if url is None:
            raise ValueError(f"needs {ENV_PREFIX}REDIS_URL (a node of the cluster): the embedded Redis is no cluster")
        if url.startswith("unix://"):
            raise ValueError("a cluster is reached over TCP: a redis:// or rediss:// URL, not unix://")
        if (database := _url_database(url)) != 0:
            raise ValueError(f"a cluster has database 0 only, not {database} ({ENV_PREFIX}REDIS_URL)")
        if hash_tag(prefix) is None:
            raise ValueError(
                f"needs {ENV_PREFIX}STREAM_PREFIX with a hash tag, e.g. '{{dr}}:', not {prefix!r}: every key of a "
                "deployment must be in one slot (a batch's dedupe markers and streams are written by one script)"
            )
        return value

    @model_validator(mode="after")
    def _redis_options(self) -> Settings:
        # After the fields: which options a URL may hold depends on DECISION_ROUTER_REDIS_CLUSTER.
        if self.redis_url is not None:
            check_redis_options(self.redis_url, cluster=self.redis_cluster)
        return self

    @field_validator("redis_wait_replicas")
    @classmethod
    def _replicas_need_a_server(cls, value: int, info: ValidationInfo) -> int:
        if value and info.data.get("redis_url", "") is None:
            raise ValueError(f"needs {ENV_PREFIX}REDIS_URL: the embedded Redis has no replicas to wait for")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str) -> str:
        if value.startswith(("postgresql://", "postgres://")):
            # SQLAlchemy's bare postgresql:// means psycopg2, which we do not ship.
            value = "postgresql+psycopg://" + value.split("://", 1)[1]
        return check_database_url(value)

    @cached_property  # read per message by the gate
    def payload_limits(self) -> PayloadLimits:
        return PayloadLimits(max_bytes=self.max_payload_bytes, max_depth=self.max_payload_depth)

    @cached_property  # read per inbox or DLQ write
    def replica_wait(self) -> ReplicaWait | None:
        """What the writes wait for, or None: no WAIT is sent (the default)."""
        if not self.redis_wait_replicas:
            return None
        return ReplicaWait(self.redis_wait_replicas, int(self.redis_wait_timeout.total_seconds() * 1000))

    @property
    def embedded(self) -> bool:
        return self.redis_url is None

    @property
    def effective_redis_url(self) -> str:
        """Where clients connect: the configured server or the embedded one on loopback."""
        host = f"[{self.embedded_host}]" if ":" in self.embedded_host else self.embedded_host  # IPv6, e.g. ::1
        return self.redis_url or f"redis://{host}:{self.embedded_port}/0"


def hash_tag(prefix: str) -> str | None:
    """The hash tag that every key under `prefix` is hashed by in a Redis Cluster, or None if the
    prefix has none. Redis hashes only the text between the first "{" and the first "}" after it
    when that text is not empty; the tag must close inside the prefix, or a key's own text (an
    owner id holding "}", say) would decide its slot."""
    start = prefix.find("{")
    end = prefix.find("}", start + 1) if start >= 0 else -1
    return prefix[start + 1:end] if end > start + 1 else None


def _url_database(url: str) -> int:
    """The database number a (checked) Redis URL selects, by its path or its ?db= option."""
    from redis.connection import parse_url

    return int(parse_url(url).get("db") or 0)


# Query parameters and keys whose values are secrets (redis-py accepts ?password=...).
SECRET_NAMES = re.compile(
    r"(?:^|[_.-])(?:pass(?:word|wd|phrase)?|pwd|secrets?|token|authori[sz]ation|api[_-]?key|apikey|cookie|credentials?)"
    r"(?:$|[_.-])",
    re.IGNORECASE,
)
_QUERY_SECRET = re.compile(r"([?&;](?:[\w.-]*(?:pass(?:word|wd)?|pwd|secret|token|api[_-]?key)[\w.-]*)=)[^&;#\s'\"]*", re.IGNORECASE)
# scheme://user:password@host: the password never contains "@" unescaped, but may contain ":".
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*:)[^\s'\"]*(@[^\s@'\"]+)")
_AUTH_HEADER = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE)
MASK = "***"


def redact_url(url: str) -> str:
    """The URL with its password masked, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if "@" in rest.split("?", 1)[0]:
        credentials, _, host = rest.rpartition("@")
        if ":" in credentials:
            user = credentials.split(":", 1)[0]
            url = f"{scheme}://{user}:{MASK}@{host}"
    return _QUERY_SECRET.sub(rf"\1{MASK}", url)


def redact_text(text: str) -> str:
    """Any text (an error message, a traceback) with URL passwords, secret query parameters
    and bearer tokens masked."""
    if "://" in text:
        text = _URL_PASSWORD.sub(rf"\1{MASK}\2", text)
    if "=" in text:
        text = _QUERY_SECRET.sub(rf"\1{MASK}", text)
    return _AUTH_HEADER.sub(rf"\1 {MASK}", text)


# The SQLAlchemy backends and drivers the project ships: SQLite's built-in one ("" is its default) and psycopg 3.
DATABASE_DRIVERS = {"sqlite": ("", "pysqlite"), "postgresql": ("psycopg",)}
DATABASE_URL_FORMS = "must be a sqlite:/// or postgresql+psycopg:// URL"


def check_database_url(value: str) -> str:
    """The URL if SQLAlchemy can open it with a shipped driver, else ValueError saying what is wrong
    (password masked): at start, not as a traceback from the first command that opens the store."""
    # Imported here: every command loads the settings, not every one needs SQLAlchemy.
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    shown = redact_url(value)
    try:
        url = make_url(value)
    except ArgumentError:
        raise ValueError(f"{DATABASE_URL_FORMS}, not {shown}") from None
    except ValueError:
        # SQLAlchemy reads the port with int(): "host:abc", or an unclosed "[::1" of an IPv6 address.
        raise ValueError(f"cannot read the host and port of {shown}") from None
    backend, _, driver = url.drivername.partition("+")
    if driver not in DATABASE_DRIVERS.get(backend, ()):
        raise ValueError(f"{DATABASE_URL_FORMS}, not {url.drivername}://")
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ValueError(f"port {url.port} is outside 1..65535 in {shown}")
    if backend == "sqlite" and (url.host or url.port or url.username or url.password):
        raise ValueError(f"an SQLite URL names no host: sqlite:///relative.db or sqlite:////absolute.db, not {shown}")
    if backend == "sqlite":
        _check_sqlite_options(url, shown)
    return value


# An SQLite URL's query options. SQLAlchemy hands these to Python's sqlite3.connect (its pysqlite dialect's
# list), each read as its type: a value it cannot read was a ValueError traceback at the first connection.
SQLITE_TRUE = ("true", "yes", "on", "y", "t", "1")  # as SQLAlchemy reads a boolean option (util.asbool)
_FALSE = ("false", "no", "off", "n", "f", "0")


def _is_number(value: str, kind: type[int] | type[float]) -> bool:
    try:
        number = kind(value)
    except ValueError:
        return False
    return math.isfinite(number) and number >= 0


SQLITE_DRIVER_OPTIONS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "uri": ("true or false", lambda v: v.strip().lower() in SQLITE_TRUE + _FALSE),
    "check_same_thread": ("true or false", lambda v: v.strip().lower() in SQLITE_TRUE + _FALSE),
    "timeout": ("a number of seconds", lambda v: _is_number(v, float)),
    "detect_types": ("a whole number", lambda v: _is_number(v, int)),
    "cached_statements": ("a whole number", lambda v: _is_number(v, int)),
    "isolation_level": ("DEFERRED, IMMEDIATE or EXCLUSIVE", lambda v: v.upper() in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE")),
}
# SQLite's own (https://www.sqlite.org/uri.html): read only with uri=true and a file: name. Without them
# SQLAlchemy dropped them with a warning, so mode=ro opened the file for writing; and SQLite ignores a
# name it does not know (a typo). None: any value (a VFS's name, a file's path).
_ON_OFF = ("true", "false", "yes", "no", "on", "off", "1", "0")
SQLITE_URI_OPTIONS: dict[str, tuple[str, ...] | None] = {
    "mode": ("ro", "rw", "rwc", "memory"), "cache": ("shared", "private"), "immutable": _ON_OFF,
    "nolock": _ON_OFF, "psow": _ON_OFF, "vfs": None, "modeof": None,
}
_SQLITE_URI_EXAMPLE = "sqlite:///file:PATH?mode=ro&uri=true"


def _check_sqlite_options(url: Any, shown: str) -> None:
    """ValueError naming the first query option of an SQLite URL that would be ignored or refused later."""
    for name, value in url.query.items():
        if not isinstance(value, str):  # ?mode=ro&mode=rw: a tuple
            raise ValueError(f"the SQLite URL option {name} is given {len(value)} times: {shown}")
        if name in SQLITE_DRIVER_OPTIONS:
            expected, valid = SQLITE_DRIVER_OPTIONS[name]
            if not valid(value):
                raise ValueError(f"the SQLite URL option {name} must be {expected}, not {value!r}: {shown}")
        elif name in SQLITE_URI_OPTIONS:
            allowed = SQLITE_URI_OPTIONS[name]
            # SQLite reads its booleans in any case, the names of modes as written.
            if allowed is not None and (value.lower() if allowed is _ON_OFF else value) not in allowed:
                choices = f"{', '.join(allowed[:-1])} or {allowed[-1]}"
                raise ValueError(f"the SQLite URL option {name} must be {choices}, not {value!r}: {shown}")
        else:
            known = ", ".join(sorted([*SQLITE_DRIVER_OPTIONS, *SQLITE_URI_OPTIONS]))
            raise ValueError(f"an SQLite URL takes no option {name!r} (its options: {known}): {shown}")
    uri = url.query.get("uri", "false").strip().lower() in SQLITE_TRUE
    named = (url.database or "").startswith("file:")
    sqlite_own = sorted(name for name in url.query if name in SQLITE_URI_OPTIONS)
    if sqlite_own and not (uri and named):
        # SQLAlchemy drops them without uri=true; with it, a name without file: is opened as a plain file
        # whose name is the whole text, query included ("x.db?mode=ro").
        raise ValueError(f"SQLite reads {', '.join(sqlite_own)} only with uri=true and a file: name, as "
                         f"{_SQLITE_URI_EXAMPLE}: {shown}")
    if named and not uri:  # a file of that name, "file:x.db", would be created in the working directory
        raise ValueError(f"a file: name needs uri=true, as {_SQLITE_URI_EXAMPLE}: {shown}")


def check_redis_url(value: str) -> str:
    """The URL if redis-py can build a client from it, else ValueError saying what is wrong (password
    masked): redis-py parses it only when a command connects, and ignores a database number it cannot read."""
    from urllib.parse import unquote, urlsplit

    # Imported here: only when a Redis URL is set, and not every command uses Redis.
    from redis.connection import parse_url

    shown = redact_url(value)
    try:
        parse_url(value)  # what Redis.from_url does first; it opens no connection
    except ValueError as exc:
        raise ValueError(f"{str(exc).rstrip('.')}: {shown}") from None
    if value.startswith("unix://"):
        return value
    parts = urlsplit(value)
    if parts.port == 0:  # redis-py would quietly use 6379
        raise ValueError(f"port 0 is outside 1..65535 in {shown}")
    database = unquote(parts.path).strip("/")
    if database and not re.fullmatch(r"[0-9]+", database):  # redis-py would quietly use database 0
        raise ValueError(f"the database in the path must be a number, not {database!r}: {shown}")
    return value


def check_redis_options(url: str, *, cluster: bool) -> None:
    """ValueError (naming the variable) when no client can be built from the (parsed) URL `url`. redis-py
    hands each query option (?foo=1) to the connection as a keyword only when the first command connects:
    one it does not take (a typo, ssl_* on redis://) was a TypeError traceback there. Builds, never connects."""
    import warnings

    from redis.exceptions import RedisError

    shown = redact_url(url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the cluster's read_from_replicas: still taken
            if cluster:
                from redis.asyncio.cluster import RedisCluster

                RedisCluster.from_url(url)
            else:
                from redis.asyncio import ConnectionPool

                ConnectionPool.from_url(url).make_connection()
    except TypeError as exc:
        name = re.search(r"argument '(\w+)'", str(exc))
        option = name.group(1) if name else str(exc)
        hint = " (the ssl_* options are for rediss:// URLs)" if option.startswith("ssl") and url.startswith("redis:") else ""
        raise ValueError(f"{ENV_PREFIX}REDIS_URL: the Redis client takes no option {option!r}{hint}: {shown}") from None
    except (RedisError, ValueError) as exc:
        raise ValueError(f"{ENV_PREFIX}REDIS_URL: {str(exc).rstrip('.')}: {shown}") from None


def load_settings(**overrides: object) -> Settings:
    """Build settings or raise SettingsError with one line naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # a check across settings: its message names the variables
            raise SettingsError(message) from None
        raise SettingsError(f"{ENV_PREFIX}{str(first['loc'][0]).upper()}: {message}") from None

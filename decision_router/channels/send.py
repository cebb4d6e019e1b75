"""Async senders: deliver one alert to one receiver, with retries, and report every attempt.

`send(alert)` never raises for a delivery problem: it returns a `DeliveryResult` whose
`attempt_log` holds one `Attempt` per try, for the caller to store. (Cancellation still
propagates.) `send_digest(alerts)` delivers several alerts for one recipient as one request
or email (a `Digest`), with the same retries, signing and result.

Retry policy (per receiver, see `ReceiverBase`):

* each attempt is bounded by `timeout_s` (connect + send + response together);
* retried: connection errors, timeouts, HTTP 5xx and 429, SMTP 4xx replies;
* not retried: other HTTP statuses (4xx, 3xx: redirects are not followed), SMTP 5xx
  replies, template errors;
* between tries: exponential backoff with full jitter,
  `uniform(0, min(backoff_max_s, backoff_initial_s * 2**(n-1)))` after try n; a
  `Retry-After` header (seconds or HTTP date) on a 429/5xx replaces it, capped at
  `backoff_max_s`;
* at most `max_attempts` tries; the result's `retryable` tells an exhausted transient
  failure (True) from a permanent one (False).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random as _random
import re
import ssl
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, parseaddr, parsedate_to_datetime
from importlib import metadata
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import aiosmtplib
import httpx
from pydantic import BaseModel, ConfigDict

from decision_router.channels.config import (
    EmailReceiver,
    ReceiverBase,
    SmtpSettings,
    WebhookReceiver,
)
from decision_router.channels.render import PRIORITY_ORDER, RenderedEmail, Renderer, TemplateError, digest_recipient
from decision_router.channels.signing import SIGNATURE_HEADER, VERSION, signature_headers
from decision_router.contracts import Alert, AnyAlert, DataQualityAlert, handoff_suffix

__all__ = [
    "Attempt",
    "DeliveryResult",
    "Digest",
    "EmailSender",
    "Sender",
    "WebhookSender",
    "backoff_delay",
    "backoff_schedule",
    "build_digest_email",
    "build_email",
    "parse_retry_after",
]

try:
    _VERSION = metadata.version("decision-router")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    _VERSION = "0"
USER_AGENT = f"decision-router/{_VERSION}"
ALERT_HEADER = "X-Decision-Router-Alert"
DELIVERY_HEADER = "X-Decision-Router-Delivery"
ATTEMPT_HEADER = "X-Decision-Router-Attempt"
DIGEST_HEADER = "X-Decision-Router-Digest"
ERROR_MAX = 500  # characters of an error text kept (a response body excerpt included)
BODY_EXCERPT = 300
# The shortest start of a credential, cut short by the end of a reply's excerpt, that is masked (fewer
# characters match too much ordinary text, and tell too little).
CUT_CREDENTIAL_MIN = 4


class Attempt(BaseModel):
    """One try. `latency_ms` is this try's duration; `at` is when it started (UTC)."""

    model_config = ConfigDict(frozen=True)

    n: int
    ok: bool
    status_code: int | None = None  # HTTP status, or SMTP reply code
    error: str | None = None
    latency_ms: float
    at: datetime
    retryable: bool = False  # whether this try's failure was worth another try


class DeliveryResult(BaseModel):
    """How a delivery ended. `latency_ms` is the whole delivery, backoff sleeps included;
    `status_code` and `error` are the last attempt's; `retryable` is False on success
    and on permanent failures, True when transient failures exhausted `max_attempts`.

    `alert_ids` lists every alert the delivery covered, in order. For a digest, `digest`
    is how many (0 for a single alert) and `alert_id` is the digest's id (`dg-...`)."""

    model_config = ConfigDict(frozen=True)

    receiver: str
    channel: str
    alert_id: str
    ok: bool
    attempts: int
    status_code: int | None = None
    error: str | None = None
    latency_ms: float
    retryable: bool = False
    attempt_log: tuple[Attempt, ...] = ()
    alert_ids: tuple[str, ...] = ()
    digest: int = 0


@dataclass(frozen=True)
class Digest:
    """Several alerts for one recipient, delivered as one message.

    `recipient` is the owner the message is for (default: the first alert's owner, or the
    manager of an escalated copy); `window_s` is the owner's digest window, shown in the
    message. `digest_id` is derived from the alerts, so every retry carries the same one."""

    alerts: tuple[Alert, ...]
    recipient: str
    window_s: float | None = None

    @classmethod
    def of(cls, alerts: Sequence[Alert] | Digest, *, recipient: str | None = None, window_s: float | None = None) -> Digest:
        if isinstance(alerts, Digest):
            return alerts
        group = tuple(alerts)
        if not group:
            raise ValueError("a digest needs at least one alert")
        return cls(group, recipient or digest_recipient(group[0]), window_s)

    @property
    def digest_id(self) -> str:
        copies = "\n".join(f"{a.alert_id}:{a.escalation.level if a.escalation else 0}{handoff_suffix(a)}" for a in self.alerts)
        return "dg-" + hashlib.sha256(f"{self.recipient}\n{copies}".encode()).hexdigest()[:24]

    @property
    def alert_ids(self) -> tuple[str, ...]:
        return tuple(a.alert_id for a in self.alerts)

    def __len__(self) -> int:
        return len(self.alerts)


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    status_code: int | None = None
    error: str | None = None
    retryable: bool = False
    retry_after: float | None = None


def backoff_delay(attempt: int, *, initial: float, maximum: float, random: Callable[[], float] = _random.random) -> float:
    """Full-jitter backoff after try `attempt` (1-based): uniform(0, min(maximum, initial * 2**(attempt-1)))."""
    ceiling = min(maximum, initial * 2.0 ** min(attempt - 1, 62))
    return random() * ceiling


def backoff_schedule(receiver: ReceiverBase, random: Callable[[], float] = _random.random) -> list[float]:
    """The sleeps between all tries of one delivery that keeps failing (max_attempts - 1)."""
    return [
        backoff_delay(n, initial=receiver.backoff_initial_s, maximum=receiver.backoff_max_s, random=random)
        for n in range(1, receiver.max_attempts)
    ]


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date; None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _clip(text: str, limit: int = ERROR_MAX) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# A webhook signature's HMAC as a receiver may quote it (`v1=<hex>`), whole or cut short by the excerpt's end.
_QUOTED_SIGNATURE = re.compile(rf"(?<![0-9A-Za-z]){VERSION}=[0-9a-fA-F]{{8,}}")


def _unsigned(text: str, signature: str | None) -> str:
    """`text` (a receiver's reply) without webhook signatures: a valid one lets whoever reads the error
    replay the request. Ours (the header value sent) wherever its HMAC appears, and any other `v1=`
    HMAC quoted (the one the receiver expected is just as valid)."""
    for part in (signature or "").split(","):
        if digest := part.strip().removeprefix(f"{VERSION}="):
            text = text.replace(digest, "***")
    return _QUOTED_SIGNATURE.sub(f"{VERSION}=***", text)


def _describe(exc: BaseException) -> str:
    detail = str(exc).strip()
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


class Sender(ABC):
    """Delivers alerts to one receiver with the receiver's retry policy.

    `sleep`, `random`, `clock` (monotonic seconds) and `now` (wall-clock datetime) are
    injectable for tests.
    """

    channel: ClassVar[str]

    def __init__(
        self,
        name: str,
        receiver: ReceiverBase,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        random: Callable[[], float] = _random.random,
        clock: Callable[[], float] = time.perf_counter,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.name = name
        self.receiver = receiver
        self._sleep = sleep
        self._random = random
        self._clock = clock
        self._now = now

    @property
    def max_concurrency(self) -> int:
        return self.receiver.max_concurrency

    @property
    def max_queue(self) -> int:
        return self.receiver.max_queue

    @abstractmethod
    def _prepare(self, alert: AnyAlert) -> Any:
        """Render the message once per delivery; may raise TemplateError."""

    @abstractmethod
    async def _attempt(self, alert: AnyAlert, prepared: Any, n: int) -> _Outcome:
        """One try; raises on transport problems (classified by `_classify`)."""

    def _prepare_digest(self, digest: Digest) -> Any:
        """Render one message for all the digest's alerts; may raise TemplateError."""
        raise NotImplementedError(f"{type(self).__name__} cannot send digests")

    async def _attempt_digest(self, digest: Digest, prepared: Any, n: int) -> _Outcome:
        """One try of a digest; raises on transport problems (classified by `_classify`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot send digests")

    def _classify(self, exc: Exception) -> _Outcome:
        return _Outcome(ok=False, error=_clip(self.scrub(_describe(exc))), retryable=True)

    def scrub(self, text: str) -> str:
        """`text` (an error, a traceback) without this receiver's secrets, for logs and the store."""
        return text

    def _slot(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """Held around each try, outside its timeout (e.g. a shared SMTP connection limit)."""
        return contextlib.nullcontext()

    def retry_delay(self, attempt: int, outcome: _Outcome) -> float:
        cap = self.receiver.backoff_max_s
        if outcome.retry_after is not None:
            return min(outcome.retry_after, cap)
        return backoff_delay(attempt, initial=self.receiver.backoff_initial_s, maximum=cap, random=self._random)

    async def send(self, alert: AnyAlert) -> DeliveryResult:
        """Deliver one alert (a routed `Alert` or a `DataQualityAlert`); never raises for a
        delivery problem."""
        log = await self._deliver(lambda: self._prepare(alert), lambda prepared, n: self._attempt(alert, prepared, n))
        return self._result(alert.alert_id, (alert.alert_id,), 0, log)

    async def send_digest(
        self, alerts: Sequence[Alert] | Digest, *, recipient: str | None = None, window_s: float | None = None
    ) -> DeliveryResult:
        """Deliver several alerts for one recipient as one message (one request, one email),
        with the same retries and signing as `send`. The result's `alert_ids` lists them."""
        digest = Digest.of(alerts, recipient=recipient, window_s=window_s)
        log = await self._deliver(lambda: self._prepare_digest(digest), lambda prepared, n: self._attempt_digest(digest, prepared, n))
        return self._result(digest.digest_id, digest.alert_ids, len(digest), log)

    async def _deliver(
        self, prepare: Callable[[], Any], attempt: Callable[[Any, int], Awaitable[_Outcome]]
    ) -> tuple[list[Attempt], float]:
        started = self._clock()
        log: list[Attempt] = []
        try:
            prepared = prepare()
        except ValueError as exc:  # TemplateError, or a message the transport would refuse
            kind = "template" if isinstance(exc, TemplateError) else "message"
            log.append(Attempt(n=1, ok=False, error=_clip(f"{kind}: {exc}", 2 * ERROR_MAX), latency_ms=0.0, at=self._now()))
            return log, started
        for n in range(1, self.receiver.max_attempts + 1):
            async with self._slot():
                at = self._now()
                t0 = self._clock()
                try:
                    async with asyncio.timeout(self.receiver.timeout_s):
                        outcome = await attempt(prepared, n)
                except TimeoutError:
                    outcome = _Outcome(ok=False, error=f"timeout: no complete response within {self.receiver.timeout_s:g}s", retryable=True)
                except Exception as exc:  # noqa: BLE001 - every transport failure becomes a result
                    outcome = self._classify(exc)
                latency_ms = (self._clock() - t0) * 1000
            log.append(
                Attempt(
                    n=n,
                    ok=outcome.ok,
                    status_code=outcome.status_code,
                    error=outcome.error,
                    latency_ms=round(latency_ms, 3),
                    at=at,
                    retryable=outcome.retryable and not outcome.ok,
                )
            )
            if outcome.ok or not outcome.retryable or n == self.receiver.max_attempts:
                break
            await self._sleep(self.retry_delay(n, outcome))
        return log, started

    def _result(self, alert_id: str, alert_ids: tuple[str, ...], digest: int, run: tuple[list[Attempt], float]) -> DeliveryResult:
        log, started = run
        last = log[-1]
        return DeliveryResult(
            receiver=self.name,
            channel=self.channel,
            alert_id=alert_id,
            alert_ids=alert_ids,
            digest=digest,
            ok=last.ok,
            attempts=len(log),
            status_code=last.status_code,
            error=last.error,
            latency_ms=round((self._clock() - started) * 1000, 3),
            retryable=last.retryable,
            attempt_log=tuple(log),
        )

    async def aclose(self) -> None:
        """Release connections. The sender must not be used afterwards."""
        return None

    async def __aenter__(self) -> Sender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# --- webhook -------------------------------------------------------------------------


class WebhookSender(Sender):
    """POSTs the rendered body (alert JSON or Slack message) to the receiver's URL.

    Uses its own `httpx.AsyncClient` (pool of `max_concurrency` connections) unless
    `client` is given; a given client is not closed by `aclose()`.
    """

    channel = "webhook"
    receiver: WebhookReceiver

    def __init__(
        self,
        name: str,
        receiver: WebhookReceiver,
        renderer: Renderer | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        wall_clock: Callable[[], float] = time.time,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, receiver, **kwargs)
        self.renderer = renderer or Renderer()
        self._wall_clock = wall_clock
        self._owns_client = client is None
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(receiver.timeout_s),
            limits=httpx.Limits(max_connections=receiver.max_concurrency, max_keepalive_connections=receiver.max_concurrency),
            follow_redirects=False,  # never replay a signed body to another address
            trust_env=False,  # no proxy from the environment: receivers are configured explicitly
        )
        self._url = str(receiver.url)
        self._secret = receiver.secret.get_secret_value().encode() if receiver.secret is not None else None
        self._static_headers = {name: value.get_secret_value() for name, value in receiver.headers.items()}
        # Longest first, so a secret holding another is masked whole; very short ones would mask ordinary words.
        self._secrets = sorted(
            {v for v in (*self._static_headers.values(), self._secret.decode() if self._secret else "",
                         *_url_credentials(self._url)) if len(v) >= 6},
            key=len, reverse=True,
        )

    def _prepare(self, alert: AnyAlert) -> bytes:
        return self.renderer.webhook_body(alert, self.receiver.format).encode("utf-8")

    def _prepare_digest(self, digest: Digest) -> bytes:
        return self.renderer.webhook_digest_body(
            digest.alerts, self.receiver.format, recipient=digest.recipient, window_s=digest.window_s
        ).encode("utf-8")

    def headers(self, alert: AnyAlert, body: bytes, n: int) -> dict[str, str]:
        return self._headers({ALERT_HEADER: alert.alert_id, DELIVERY_HEADER: f"{alert.alert_id}:{alert.owner}{handoff_suffix(alert)}"}, body, n)

    def digest_headers(self, digest: Digest, body: bytes, n: int) -> dict[str, str]:
        """A digest has no single alert: `X-Decision-Router-Digest: <count>` instead of
        `X-Decision-Router-Alert`, and the delivery id is the digest's."""
        return self._headers({DIGEST_HEADER: str(len(digest)), DELIVERY_HEADER: f"{digest.digest_id}:{digest.recipient}"}, body, n)

    def _headers(self, identity: dict[str, str], body: bytes, n: int) -> dict[str, str]:
        headers = {
            **self._static_headers,
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": USER_AGENT,
            **identity,
            ATTEMPT_HEADER: str(n),
        }
        if self._secret is not None:
            # Signed per attempt: a retry after a long backoff is not stale on arrival.
            headers.update(signature_headers(self._secret, body, now=self._wall_clock()))
        return headers

    async def _attempt(self, alert: AnyAlert, prepared: bytes, n: int) -> _Outcome:
        return await self._post(prepared, self.headers(alert, prepared, n))

    async def _attempt_digest(self, digest: Digest, prepared: bytes, n: int) -> _Outcome:
        return await self._post(prepared, self.digest_headers(digest, prepared, n))

    async def _post(self, prepared: bytes, headers: dict[str, str]) -> _Outcome:
        async with self.client.stream("POST", self._url, content=prepared, headers=headers) as response:
            status = response.status_code
            try:
                # Read the (small) body so the connection can be reused; a large one is cut off.
                excerpt = await _read_excerpt(response)
            except (httpx.RemoteProtocolError, httpx.ReadError):
                # The connection closed mid-body: the status is the receiver's answer all the same (a 2xx
                # is delivered: sending it again would duplicate it; a 4xx is not worth a retry).
                excerpt = ""
        if 200 <= status < 300:
            return _Outcome(ok=True, status_code=status)
        # The receiver's words, which may echo what it was sent (the URL's token, an Authorization header,
        # the signature).
        error = f"HTTP {status}" + (f": {self.scrub_excerpt(_unsigned(excerpt, headers.get(SIGNATURE_HEADER)))}" if excerpt else "")
        if status == 429 or status >= 500:
            return _Outcome(
                ok=False, status_code=status, error=_clip(error), retryable=True, retry_after=parse_retry_after(response.headers.get("retry-after"), now=self._now())
            )
        if 300 <= status < 400:
            error += " (redirects are not followed; configure the final URL)"
        return _Outcome(ok=False, status_code=status, error=_clip(error), retryable=False)

    def scrub(self, text: str) -> str:
        """The URL as `rules check` shows it (its path and query may be the credential, as in a Slack
        webhook); the signing secret, header values (an API key, say) and the URL's path and query,
        wherever they appear on their own, as ***."""
        text = text.replace(self._url, self.receiver.redacted_url)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def scrub_excerpt(self, text: str) -> str:
        """`scrub` for the start of a reply: a credential the excerpt's end cuts short is no longer whole, so
        `scrub` would leave its first characters; a tail that begins one (4 characters or more) is masked too."""
        text = self.scrub(text)
        for secret in self._secrets:
            for size in range(min(len(secret), len(text) + 1) - 1, CUT_CREDENTIAL_MIN - 1, -1):
                if text.endswith(secret[:size]):
                    return text[:-size] + "***"
        return text

    def _classify(self, exc: Exception) -> _Outcome:
        text = self.scrub(_describe(exc))
        if isinstance(exc, httpx.TimeoutException):
            return _Outcome(ok=False, error=_clip(f"timeout: {text}"), retryable=True)
        if isinstance(exc, (httpx.UnsupportedProtocol, httpx.InvalidURL)):
            return _Outcome(ok=False, error=_clip(text), retryable=False)
        # Connection refused/reset, DNS, TLS handshake, protocol errors: transient as far as we can tell.
        return _Outcome(ok=False, error=_clip(text), retryable=True)

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()


async def _read_excerpt(response: httpx.Response, limit: int = BODY_EXCERPT, read_max: int = 65536) -> str:
    """The start of the response body, for an error text. Reads up to `read_max` bytes:
    a body read to its end lets the connection be reused; a larger one is not read on."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        if size < limit:
            chunks.append(chunk)
        size += len(chunk)
        if size >= read_max:
            break
    return b"".join(chunks)[:limit].decode("utf-8", errors="replace").strip()


# --- email ---------------------------------------------------------------------------


def _message(rendered: RenderedEmail, receiver: EmailReceiver, smtp: SmtpSettings, *, id_left: str, urgent: bool) -> EmailMessage:
    """multipart/alternative: text/plain then text/html (clients show the last they can)."""
    message = EmailMessage()
    message["From"] = smtp.sender
    message["To"] = ", ".join(receiver.to)
    message["Subject"] = rendered.subject
    message["Date"] = formatdate(localtime=False, usegmt=True)
    domain = parseaddr(smtp.sender)[1].rpartition("@")[2] or "decision-router"
    # Stable across retries, so a mailbox that got a retried message can tell.
    message["Message-ID"] = f"<{id_left}@{domain}>"
    message["X-Priority"] = "1" if urgent else "3"
    message.set_content(rendered.text)
    message.add_alternative(rendered.html, subtype="html")
    return message


def build_email(alert: AnyAlert, renderer: Renderer, receiver: EmailReceiver, smtp: SmtpSettings) -> EmailMessage:
    """One alert. A data-quality alert has no priority: it is sent as normal (X-Priority 3)."""
    urgent = not isinstance(alert, DataQualityAlert) and alert.priority in ("high", "critical")
    message = _message(
        renderer.email(alert), receiver, smtp,
        id_left=f"{alert.alert_id}.{_safe_id(alert.owner or 'unowned')}{handoff_suffix(alert, '.')}", urgent=urgent,
    )
    message[ALERT_HEADER] = alert.alert_id
    return message


def build_digest_email(digest: Digest, renderer: Renderer, receiver: EmailReceiver, smtp: SmtpSettings) -> EmailMessage:
    """One multipart email listing all the digest's alerts, as urgent as its most urgent one."""
    rendered = renderer.email_digest(digest.alerts, recipient=digest.recipient, window_s=digest.window_s)
    top = max((PRIORITY_ORDER.index(a.priority) for a in digest.alerts if a.priority in PRIORITY_ORDER), default=0)
    message = _message(
        rendered, receiver, smtp, id_left=f"{digest.digest_id}.{_safe_id(digest.recipient)}",
        urgent=PRIORITY_ORDER[top] in ("high", "critical"),
    )
    message[DIGEST_HEADER] = str(len(digest))
    return message


def _safe_id(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:64]


class EmailSender(Sender):
    """Sends one multipart email per alert over SMTP (aiosmtplib), one connection per try.

    `limiter` bounds connections to the SMTP server across senders (Dispatcher.from_config
    shares one per SmtpSettings); waiting for it does not count against `timeout_s`.
    """

    channel = "email"
    receiver: EmailReceiver

    def __init__(
        self,
        name: str,
        receiver: EmailReceiver,
        smtp: SmtpSettings,
        renderer: Renderer | None = None,
        *,
        limiter: asyncio.Semaphore | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, receiver, **kwargs)
        self.smtp = smtp
        self.renderer = renderer or Renderer()
        self._limiter = limiter

    def scrub(self, text: str) -> str:
        """Without the SMTP password (aiosmtplib's errors do not hold it; a bug's might)."""
        password = self.smtp.password.get_secret_value() if self.smtp.password is not None else ""
        return text.replace(password, "***") if len(password) >= 6 else text

    def _prepare(self, alert: AnyAlert) -> EmailMessage:
        return build_email(alert, self.renderer, self.receiver, self.smtp)

    def _prepare_digest(self, digest: Digest) -> EmailMessage:
        return build_digest_email(digest, self.renderer, self.receiver, self.smtp)

    def _slot(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self._limiter if self._limiter is not None else contextlib.nullcontext()

    async def _attempt(self, alert: AnyAlert, prepared: EmailMessage, n: int) -> _Outcome:
        return await self._send_message(prepared)

    async def _attempt_digest(self, digest: Digest, prepared: EmailMessage, n: int) -> _Outcome:
        return await self._send_message(prepared)

    async def _send_message(self, prepared: EmailMessage) -> _Outcome:
        smtp = self.smtp
        errors, _ = await aiosmtplib.send(
            prepared,
            hostname=smtp.host,
            port=smtp.port,
            username=smtp.username,
            password=smtp.password.get_secret_value() if smtp.password is not None else None,
            start_tls=smtp.starttls,  # False: no opportunistic upgrade; True: required
            use_tls=smtp.use_tls,
            validate_certs=smtp.validate_certs,
            cert_bundle=str(smtp.ca_file) if smtp.ca_file is not None else None,
            timeout=smtp.timeout_s,
        )
        code = 250  # the DATA reply; any other success code would not reach here
        if errors:
            # Accepted for some recipients: not retried (that would duplicate it for the others).
            refused = "; ".join(f"{rcpt}: {r.code} {r.message}" for rcpt, r in errors.items())
            return _Outcome(ok=True, status_code=code, error=_clip(f"refused for some recipients: {refused}"))
        return _Outcome(ok=True, status_code=code)

    def _classify(self, exc: Exception) -> _Outcome:
        text = _clip(_describe(exc))
        if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
            codes = [r.code for r in exc.recipients]
            return _Outcome(ok=False, status_code=codes[0] if codes else None, error=text, retryable=any(400 <= c < 500 for c in codes))
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            # 4xx: transient (greylisting, mailbox busy); 5xx: permanent (auth, policy, no such user).
            return _Outcome(ok=False, status_code=exc.code, error=text, retryable=400 <= exc.code < 500)
        # Connection refused/reset/closed, timeouts (aiosmtplib's are OSErrors too), TLS
        # handshake failures; but a certificate that does not verify will not fix itself.
        if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLCertVerificationError):
            return _Outcome(ok=False, error=text, retryable=True)
        # SMTPNotSupported (e.g. no STARTTLS offered), certificate errors, bad configuration.
        return _Outcome(ok=False, error=text, retryable=False)


def _url_credentials(url: str) -> tuple[str, ...]:
    """The parts of a webhook URL that may be its credential, as a receiver might quote them back:
    the path with its query, the path, the query (a Slack token sits in the path, a signature in the query)."""
    parts = urlsplit(url)
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    return tuple(p for p in (tail, parts.path, parts.query, unquote(tail)) if p.strip("/"))

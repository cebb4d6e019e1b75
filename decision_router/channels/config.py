"""Receiver configuration: where a channel delivers, how hard it tries, and its bounds.

Secrets (`secret`, `password`, header values) are `SecretStr`: they print as `**********`
in `repr()`, logs and `model_dump_json()`. Call `.get_secret_value()` only where the
secret is used (signing, SMTP login, the outgoing request).

`secret_file` / `password_file` are read once, when the model is validated (at load), and
a relative path is resolved against `base_dir` from the validation context when given:

    WebhookReceiver.model_validate(data, context={"base_dir": rules_dir})
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_validator,
)

# The owner directory's email pattern and secret-file reader: what `rules check` accepts, the channels accept.
from decision_router.rules.spec import EMAIL, masked_url, read_secret_file
from decision_router.settings import check_sender

__all__ = [
    "EmailReceiver",
    "Receiver",
    "ReceiverBase",
    "SmtpSettings",
    "WebhookReceiver",
    "parse_receiver",
    "read_secret_file",
]

class ReceiverBase(BaseModel):
    """Retry policy and bounds shared by every channel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Per attempt: connect + send + response, all together.
    timeout_s: float = Field(default=5.0, gt=0, le=300)
    # Total tries including the first; 1 means no retry.
    max_attempts: int = Field(default=5, ge=1, le=50)
    # Full-jitter exponential backoff: sleep uniform(0, min(max, initial * 2**(n-1))).
    backoff_initial_s: float = Field(default=0.5, ge=0, le=3600)
    backoff_max_s: float = Field(default=30.0, ge=0, le=3600)
    # Workers (parallel deliveries) for this receiver in the Dispatcher.
    max_concurrency: int = Field(default=4, ge=1, le=256)
    # Alerts waiting for a worker; when full, submit() returns False.
    max_queue: int = Field(default=1000, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _backoff_order(self) -> ReceiverBase:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        return self


class WebhookReceiver(ReceiverBase):
    """An HTTP(S) endpoint that receives a POST per alert.

    `format: json` posts the alert JSON; `format: slack` posts a Slack-compatible message
    (`blocks` + `text`), usable with a Slack incoming webhook. With a secret, every request
    is signed (see `decision_router.channels.signing`).
    """

    channel: Literal["webhook"] = "webhook"
    # repr=False: a Slack incoming-webhook URL is itself a credential.
    url: HttpUrl = Field(repr=False)
    format: Literal["json", "slack"] = "json"
    secret: SecretStr | None = None
    secret_file: Path | None = None
    headers: dict[str, SecretStr] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _http_only(cls, value: HttpUrl) -> HttpUrl:
        if value.username or value.password:
            raise ValueError("put credentials in headers (e.g. Authorization), not in the URL")
        return value

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        reserved = {"content-type", "content-length", "host", "user-agent"}
        for name, header_value in value.items():
            if not name or any(c in name for c in " :\r\n\t"):
                raise ValueError(f"invalid header name {name!r}")
            if name.lower() in reserved or name.lower().startswith("x-decision-router-"):
                raise ValueError(f"header {name!r} is set by the sender and cannot be configured")
            if any(c in header_value.get_secret_value() for c in "\r\n"):
                raise ValueError(f"header {name!r}: value must not contain a line break")
        return value

    @model_validator(mode="before")
    @classmethod
    def _load_secret_file(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and data.get("secret_file") is not None:
            if data.get("secret") is not None:
                raise ValueError("set either secret or secret_file, not both")
            data = {**data, "secret": read_secret_file(Path(data["secret_file"]), info)}
        return data

    @property
    def redacted_url(self) -> str:
        """scheme://host[:port]/… : safe for logs and errors (as `rules check` shows a webhook URL)."""
        return masked_url(str(self.url))


class EmailReceiver(ReceiverBase):
    """One or more mailbox addresses; the message goes out through `SmtpSettings`."""

    channel: Literal["email"] = "email"
    to: list[str] = Field(min_length=1, max_length=100)
    # One attempt is a whole SMTP session (connect, STARTTLS, AUTH, DATA); each command
    # is also bounded by SmtpSettings.timeout_s.
    timeout_s: float = Field(default=30.0, gt=0, le=300)
    # Emails are slower and share one SMTP server: fewer workers by default.
    max_concurrency: int = Field(default=2, ge=1, le=256)

    @field_validator("to")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            if not EMAIL.fullmatch(address):
                raise ValueError(f"expected an email address like name@example.com, got {address!r}")
        return value


class SmtpSettings(BaseModel):
    """The outgoing mail server, shared by every email receiver."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1)
    port: int = Field(default=25, ge=1, le=65535)
    # True: STARTTLS is required (fails if the server does not offer it).
    # False: plain SMTP, no opportunistic upgrade.
    starttls: bool = False
    # Implicit TLS from the first byte (port 465); exclusive with starttls.
    use_tls: bool = False
    # CA bundle (PEM) to verify the server's certificate; default: the system's CAs.
    ca_file: Path | None = None
    validate_certs: bool = True
    username: str | None = None
    password: SecretStr | None = Field(default=None)
    password_file: Path | None = None
    sender: str = Field(min_length=3)  # the From address
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    # Connections to this server at once, across all email receivers.
    max_connections: int = Field(default=4, ge=1, le=256)

    @model_validator(mode="before")
    @classmethod
    def _load_password_file(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and data.get("password_file") is not None:
            if data.get("password") is not None:
                raise ValueError("set either password or password_file, not both")
            data = {**data, "password": read_secret_file(Path(data["password_file"]), info)}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> SmtpSettings:
        if self.starttls and self.use_tls:
            raise ValueError("starttls and use_tls are exclusive: STARTTLS upgrades a plain connection, use_tls starts with TLS")
        if self.password is not None and not self.username:
            raise ValueError("password needs username")
        return self

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        # "alerts@example.com" or "Decision Router <alerts@example.com>"; the same check as DECISION_ROUTER_SMTP_SENDER's.
        return check_sender(value)


Receiver = Annotated[WebhookReceiver | EmailReceiver, Field(discriminator="channel")]
_RECEIVER = TypeAdapter(Receiver)


def parse_receiver(data: Any, *, base_dir: Path | None = None) -> WebhookReceiver | EmailReceiver:
    """Validate one receiver mapping (`channel: webhook|email`, ...); relative secret
    files are read from `base_dir` (e.g. the rules directory)."""
    return _RECEIVER.validate_python(data, context={"base_dir": base_dir})

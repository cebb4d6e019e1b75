"""Delivery channels beyond the inbox: signed webhooks (JSON or Slack) and email.

A self-contained sending layer: configuration models (`config`), message rendering with
overridable Jinja2 templates (`render`), webhook signatures (`signing`), retrying async
senders that report every attempt (`send`), and a dispatcher with one bounded queue and
worker pool per receiver (`dispatcher`). See docs/delivery.md.
"""

from decision_router.channels.config import (
    EmailReceiver,
    Receiver,
    SmtpSettings,
    WebhookReceiver,
    parse_receiver,
)
from decision_router.channels.dispatcher import (
    QUEUE_FULL,
    Dispatcher,
    LaneStats,
    OnResult,
)
from decision_router.channels.render import RenderedEmail, Renderer, TemplateError
from decision_router.channels.send import (
    Attempt,
    DeliveryResult,
    Digest,
    EmailSender,
    Sender,
    WebhookSender,
    backoff_delay,
    backoff_schedule,
)
from decision_router.channels.signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
    signature_headers,
    verify,
)

__all__ = [
    "QUEUE_FULL",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "Attempt",
    "DeliveryResult",
    "Digest",
    "Dispatcher",
    "EmailReceiver",
    "EmailSender",
    "LaneStats",
    "OnResult",
    "Receiver",
    "RenderedEmail",
    "Renderer",
    "Sender",
    "SmtpSettings",
    "TemplateError",
    "WebhookReceiver",
    "WebhookSender",
    "backoff_delay",
    "backoff_schedule",
    "parse_receiver",
    "sign",
    "signature_headers",
    "verify",
]

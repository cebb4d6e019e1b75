"""Delivery to owners. v1 has one channel: the owner's inbox stream `alerts:<owner_id>`."""

from __future__ import annotations

from collections.abc import Sequence

from decision_router.contracts import Alert, handoff_suffix
from decision_router.keys import Keys
from decision_router.streams import StreamWrite

INBOX = "inbox"


def inbox_writes(alerts: Sequence[Alert], keys: Keys) -> list[StreamWrite]:
    """One `data` field of alert JSON per entry, as producers write predictions."""
    return [
        StreamWrite(
            stream=keys.inbox(alert.owner),
            fields={"data": alert.model_dump_json()},
            # Per owner and hand-off: a reassigned alert reaches its new owner once too, and an owner it is
            # handed back to once more.
            dedupe_key=keys.dedupe(f"alert:{alert.alert_id}:{alert.owner}{handoff_suffix(alert)}"),
        )
        for alert in alerts
    ]

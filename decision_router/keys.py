"""Every Redis stream and key name, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Stream and key names under an optional prefix (tests and tenants share a server)."""

    prefix: str = ""

    @property
    def predictions(self) -> str:
        return f"{self.prefix}predictions"

    @property
    def predictions_dlq(self) -> str:
        return f"{self.prefix}predictions:dlq"

    @property
    def outcomes(self) -> str:
        return f"{self.prefix}outcomes"

    @property
    def outcomes_dlq(self) -> str:
        return f"{self.prefix}outcomes:dlq"

    @property
    def deliveries_dlq(self) -> str:
        return f"{self.prefix}deliveries:dlq"

    @property
    def rules_reload(self) -> str:
        """Pub/sub channel: every router process on this prefix re-reads its rule files now."""
        return f"{self.prefix}rules:reload"

    def inbox(self, owner_id: str) -> str:
        return f"{self.prefix}alerts:{owner_id}"

    def handled_alone(self, stream: str, entry_id: str) -> str:
        """Set while a worker handles a suspected crasher of `stream` on its own (consumer.py): left behind if the
        worker dies, it names the entry that killed it."""
        return f"{self.prefix}alone:{stream}:{entry_id}"

    @property
    def outbox_attempts(self) -> str:
        """Hash, alert id -> outbox-drain writes of it that never returned (their worker gone): outbox.py."""
        return f"{self.prefix}outbox:attempts"

    @property
    def outbox_parked(self) -> str:
        """Hash, alert id -> why: alerts the outbox drain no longer writes, their write having stopped the worker
        each time (outbox.py). HDEL one to have the next drain try it again."""
        return f"{self.prefix}outbox:parked"

    def dedupe(self, marker: str) -> str:
        """Marker that makes one stream write happen once (see delivery.inbox.xadd_once)."""
        return f"{self.prefix}dedupe:{marker}"

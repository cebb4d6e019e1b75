"""Hot reload: notice edited rule files, and swap in the new set only when it is valid.

The service calls `check()` every few seconds and `reload()` on SIGHUP, and swaps the
returned rule set into the pipeline. A broken edit never replaces a working set: the old
one stays current and every problem is logged, one line each, exactly as `rules check`
prints it.

`check()` is cheap when nothing changed: it compares each file's (mtime_ns, size) with
the last look and reads nothing if they match. A stat signature that changed is then
confirmed by content (the rules version), so `touch` or a save without edits loads
nothing. Files modified within the last `RACY_WINDOW_NS` are re-hashed on the next check
too: a second write in the same timestamp tick with the same size would otherwise be
missed (git's "racily clean" problem). `reload()` always reads the content.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import structlog

from decision_router.rules.compile import RuleSet
from decision_router.rules.load import OWNERS_FILE, ROUTING_FILE, attempt_load, version_of

log = structlog.get_logger("decision_router.rules")

# (mtime_ns, size) per file; None for a file that cannot be stat'ed (missing).
Signature = tuple[tuple[int, int] | None, ...]
RACY_WINDOW_NS = 2_000_000_000


class RulesWatcher:
    """Keeps the last valid rule set of a directory; see the module docstring."""

    def __init__(self, rules_dir: Path | str, current: RuleSet) -> None:
        self._dir = Path(rules_dir)
        self._current = current
        # Unknown until the first check: the files may have changed since `current` was
        # loaded, so the first check always compares content.
        self._signature: Signature | None = None
        self._rejected: str | None = None  # version of the last rejected content, logged once by check()
        self._lock = threading.Lock()

    @property
    def rules_dir(self) -> Path:
        return self._dir

    @property
    def current(self) -> RuleSet:
        return self._current

    def check(self) -> RuleSet | None:
        """Re-read if routing.yaml/owners.yaml changed; the new set if it is valid and new.

        None when nothing changed, and when the new content is invalid (the current set
        stays; each problem is logged once per distinct broken content).
        """
        with self._lock:
            signature = self._stat()
            if signature == self._signature:
                return None
            self._signature = signature if not _racy(signature) else None
            return self._reread(quiet_if_rejected=True)

    def reload(self) -> RuleSet | None:
        """Forced re-read (SIGHUP): like check() without the stat shortcut; a rejected
        set is logged again, so whoever sent the signal sees why."""
        with self._lock:
            signature = self._stat()
            self._signature = signature if not _racy(signature) else None
            return self._reread(quiet_if_rejected=False)

    def _stat(self) -> Signature:
        parts: list[tuple[int, int] | None] = []
        for name in (ROUTING_FILE, OWNERS_FILE):
            try:
                st = os.stat(self._dir / name)
            except OSError:
                parts.append(None)
            else:
                parts.append((st.st_mtime_ns, st.st_size))
        return tuple(parts)

    def _content_version(self) -> str:
        data = []
        for name in (ROUTING_FILE, OWNERS_FILE):
            try:
                data.append((self._dir / name).read_bytes())
            except OSError:
                data.append(b"")
        return version_of(data[0], data[1])

    def _reread(self, *, quiet_if_rejected: bool) -> RuleSet | None:
        version = self._content_version()
        if version == self._current.version:
            self._rejected = None  # back to the current content (a broken edit undone)
            return None
        if quiet_if_rejected and version == self._rejected:
            return None
        # attempt_load reads the files again: its own version is the one that counts.
        attempt = attempt_load(self._dir)
        if attempt.ruleset is None:
            self._rejected = attempt.version
            for problem in attempt.problems:
                log.warning(
                    "rules reload rejected",
                    problem=str(problem),
                    rules_dir=str(self._dir),
                    version=attempt.version,
                    kept_version=self._current.version,
                )
            return None
        if attempt.ruleset.version == self._current.version:
            self._rejected = None
            return None
        # Success is not logged here: the caller logs the swap when it installs the set.
        self._current, self._rejected = attempt.ruleset, None
        return attempt.ruleset


def _racy(signature: Signature) -> bool:
    """A file modified so recently that a same-size rewrite could share its mtime."""
    now = time.time_ns()
    return any(part is not None and now - part[0] < RACY_WINDOW_NS for part in signature)

"""Hot reload: a copy of the shipped rules, edited under a RulesWatcher."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from decision_router.rules import RulesWatcher, load_rules

SHIPPED = Path(__file__).resolve().parents[2] / "rules"
R = "rules/routing.yaml: "
O = "rules/owners.yaml: "  # noqa: E741 - R and O: the two files, short in the many messages below
OLD_NS = 1_600_000_000 * 10**9  # 2020: far outside the "racily clean" window


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(SHIPPED, target)
    return target


@pytest.fixture
def watcher(rules_dir: Path) -> RulesWatcher:
    return RulesWatcher(rules_dir, load_rules(rules_dir))


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) >= 1, old
    path.write_text(text.replace(old, new, 1))


def rejected(logs: list[dict]) -> list[str]:
    return [e["problem"] for e in logs if e["event"] == "rules reload rejected"]


def age(rules_dir: Path) -> None:
    """Give both files an old mtime, so the stat signature can be trusted."""
    for name in ("routing.yaml", "owners.yaml"):
        os.utime(rules_dir / name, ns=(OLD_NS, OLD_NS))


def test_unchanged_files_give_none(watcher: RulesWatcher) -> None:
    before = watcher.current
    with capture_logs() as logs:
        assert watcher.check() is None
        assert watcher.check() is None
        assert watcher.reload() is None
    assert watcher.current is before and logs == []


def test_touch_without_edit_loads_nothing(rules_dir: Path, watcher: RulesWatcher) -> None:
    before = watcher.current
    (rules_dir / "routing.yaml").touch()
    with capture_logs() as logs:
        assert watcher.check() is None
    assert watcher.current is before and logs == []


def test_valid_edit_becomes_current(rules_dir: Path, watcher: RulesWatcher) -> None:
    old = watcher.current
    edit(rules_dir / "routing.yaml", "holdout: 0.1", "holdout: 0.2")
    with capture_logs() as logs:
        new = watcher.check()
    assert new is not None and watcher.current is new
    assert new.version != old.version and new.version == load_rules(rules_dir).version
    assert next(r for r in new.rules if r.name == "enterprise-churn-watch").holdout == 0.2
    assert logs == []  # the caller logs the swap
    assert watcher.check() is None  # picked up once


def test_owners_edit_is_picked_up(rules_dir: Path, watcher: RulesWatcher) -> None:
    edit(rules_dir / "owners.yaml", "away_until: 2027-01-15", "away_until: 2027-02-01")
    new = watcher.check()
    assert new is not None and str(new.owners["hugo-lambert"].away_until) == "2027-02-02 00:00:00+00:00"


BROKEN = [
    ("unknown-owner", "routing.yaml", "owner: smb-desk", "owner: smb-dsk", [
        R + "rule smb-churn-risk: owner: 'smb-dsk' is not in the owner directory; did you mean 'smb-desk'?",
    ]),
    ("two-problems-in-one-rule", "routing.yaml", "    cooldown: 1d      #", "    cooldown: 1 day\n    holdout: 2\n    #", [
        R + "rule payment-fraud-block: cooldown: expected a duration like '30s', '15m', '4h', '2d' or '1w', got '1 day'",
        R + "rule payment-fraud-block: holdout: expected a fraction with 0 <= holdout < 1, like 0.1 for 10%, got 2",
    ]),
    ("holdout-on-record-rule", "routing.yaml", "    action: record\n    priority: low\n\n  # Invoices",
     "    action: record\n    holdout: 0.1\n    priority: low\n\n  # Invoices", [
        R + "rule smb-churn-watch: holdout: holdout only applies to action: alert; a record rule delivers nothing to hold out",
    ]),
    ("delegate-loop", "owners.yaml", "team: account-management, channels: [inbox, email]}\n  - {id: giulia-conti",
     "team: account-management, channels: [inbox, email], delegate: hugo-lambert}\n  - {id: giulia-conti", [
        O + "owner felix-wagner: delegate: delegate chain loops: felix-wagner -> hugo-lambert -> felix-wagner",
    ]),
    ("yaml-syntax", "owners.yaml", "owners:\n", "owners: [\n", [
        O + "line 12, column 3: invalid YAML: expected the node content, but found '-'",
    ]),
]


@pytest.mark.parametrize(("file", "old", "new", "problems"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_edit_keeps_the_current_set_and_logs_each_problem(
    rules_dir: Path, watcher: RulesWatcher, file: str, old: str, new: str, problems: list[str]
) -> None:
    before = watcher.current
    edit(rules_dir / file, old, new)
    with capture_logs() as logs:
        assert watcher.check() is None
    assert watcher.current is before
    assert rejected(logs) == problems
    assert all(e["log_level"] == "warning" and e["kept_version"] == before.version for e in logs)
    with capture_logs() as again:
        assert watcher.check() is None
    assert again == []  # the same broken content is reported once, not every few seconds


def test_fix_after_a_broken_edit_is_picked_up(rules_dir: Path, watcher: RulesWatcher) -> None:
    routing = rules_dir / "routing.yaml"
    before = watcher.current
    edit(routing, "owner: smb-desk", "owner: smb-dsk")
    assert watcher.check() is None
    edit(routing, "owner: smb-dsk", "owner: lead-smb")
    fixed = watcher.check()
    assert fixed is not None and watcher.current is fixed and fixed.version != before.version
    assert next(r for r in fixed.rules if r.name == "smb-churn-risk").owner_static == "lead-smb"


def test_undoing_a_broken_edit_keeps_the_current_set_quietly(rules_dir: Path, watcher: RulesWatcher) -> None:
    routing = rules_dir / "routing.yaml"
    before, original = watcher.current, routing.read_text()
    edit(routing, "owner: smb-desk", "owner: smb-dsk")
    assert watcher.check() is None
    routing.write_text(original)
    with capture_logs() as logs:
        assert watcher.check() is None
    assert watcher.current is before and logs == []


def test_missing_file_is_rejected(rules_dir: Path, watcher: RulesWatcher) -> None:
    before = watcher.current
    (rules_dir / "owners.yaml").unlink()
    with capture_logs() as logs:
        assert watcher.check() is None
    assert watcher.current is before
    assert rejected(logs) == [O + f"not found in {rules_dir}/ (a rules directory holds routing.yaml and owners.yaml)"]


def test_reload_ignores_the_stat_shortcut_and_reports_again(rules_dir: Path, watcher: RulesWatcher) -> None:
    routing = rules_dir / "routing.yaml"
    age(rules_dir)
    assert watcher.check() is None  # signature recorded
    # A same-size edit that keeps the old mtime (a restored backup, a coarse clock): the
    # cheap check cannot see it, a SIGHUP reload does.
    edit(routing, "holdout: 0.1", "holdout: 0.2")
    age(rules_dir)
    assert watcher.check() is None
    reloaded = watcher.reload()
    assert reloaded is not None and watcher.current is reloaded
    # A broken set is logged by every reload (someone asked), but by check() only once.
    edit(routing, "owner: smb-desk", "owner: smb-dsk")
    expected = [R + "rule smb-churn-risk: owner: 'smb-dsk' is not in the owner directory; did you mean 'smb-desk'?"]
    with capture_logs() as logs:
        assert watcher.check() is None
        assert watcher.check() is None
        assert watcher.reload() is None
        assert watcher.reload() is None
    assert rejected(logs) == expected * 3
    assert watcher.current is reloaded


def test_recently_modified_files_are_rehashed_even_with_the_same_signature(rules_dir: Path, watcher: RulesWatcher) -> None:
    # Two writes within one timestamp tick can leave (mtime_ns, size) unchanged: for files
    # modified in the last seconds the signature is not trusted, so the content decides.
    routing = rules_dir / "routing.yaml"
    routing.write_text(routing.read_text())  # modified just now (copytree kept the checkout's mtime)
    assert watcher.check() is None
    stat = routing.stat()
    edit(routing, "holdout: 0.1", "holdout: 0.2")
    os.utime(routing, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same (recent) mtime
    assert watcher.check() is not None


EDITS: list[tuple[str, Callable[[Path], None]]] = [
    ("routing", lambda d: edit(d / "routing.yaml", "cooldown: 7d", "cooldown: 14d")),
    ("owners", lambda d: edit(d / "owners.yaml", "delegate: felix-wagner", "delegate: giulia-conti")),
]


@pytest.mark.parametrize("change", [e[1] for e in EDITS], ids=[e[0] for e in EDITS])
def test_reload_picks_up_any_valid_edit(rules_dir: Path, watcher: RulesWatcher, change: Callable[[Path], None]) -> None:
    change(rules_dir)
    new = watcher.reload()
    assert new is not None and watcher.current is new and new.version == load_rules(rules_dir).version

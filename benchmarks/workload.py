"""The benchmark's inputs: a rules directory (the shipped rules plus generated ones) and
predictions whose mix is about half routed to an owner's inbox, 10% held out, the rest recorded.

Every prediction names its own entity, so no cooldown suppresses it: the mix stays the
same however many are published.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import redis
import yaml

SHIPPED_RULES = Path(__file__).resolve().parents[1] / "rules"
TOTAL_RULES = 200
# Account managers of the shipped directory (all have an inbox).
ACCOUNT_MANAGERS = ("alice-moreau", "benoit-garnier", "chloe-dubois", "elena-petrova", "giulia-conti",
                    "isabel-ortiz", "jack-sullivan", "kira-nakamura")
GENERATED_MODELS = tuple(f"model-{k:02d}" for k in range(19))
UPSELL_OWNER = "lead-mid-market"


def generated_rules(count: int) -> list[dict]:
    """`count` rules on other models, as a larger deployment has. The last ones route the
    `upsell` model (alert, holdout 0.5), so its predictions are tested against nearly all rules
    when rules are tried in file order."""
    rules = []
    for i in range(count - 2):
        model = GENERATED_MODELS[i % len(GENERATED_MODELS)]
        rules.append({
            "name": f"gen-{i:03d}",
            "when": {"model": model, "score": {"gte": round(0.5 + (i % 50) / 100, 2)},
                     "context.segment": {"in": [f"seg-{i % 7}", f"seg-{(i + 3) % 7}"]}},
            "owner": UPSELL_OWNER,
            "priority": "normal",
            "context": ["context.arr"],
        })
    rules.append({"name": "gen-upsell-expansion", "when": {"model": "upsell", "score": {"gte": 0.5}},
                  "owner": {"from": "context.account_manager", "fallback": UPSELL_OWNER},
                  "holdout": 0.5, "context": ["context.arr", "features.top_drivers"]})
    rules.append({"name": "gen-upsell-low", "when": {"model": "upsell"}, "owner": UPSELL_OWNER,
                  "action": "record", "priority": "low"})
    return rules


def write_rules(target: Path, total: int = TOTAL_RULES) -> Path:
    """The shipped rules with generated ones inserted before the catch-all, `total` in all."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(SHIPPED_RULES, target)
    routing = yaml.safe_load((target / "routing.yaml").read_text())
    shipped = routing["rules"]
    catch_all = shipped.pop()  # last: everything-else
    routing["rules"] = shipped + generated_rules(total - len(shipped) - 1) + [catch_all]
    (target / "routing.yaml").write_text(yaml.safe_dump(routing, sort_keys=False))
    return target


def prediction(n: int, run: str, *, now: datetime, sent: float | None = None) -> dict:
    """Prediction n of a run: 40% enterprise churn (alert to an account manager), 20% upsell
    (alert, half held out), 40% SMB churn watch (recorded)."""
    kind = n % 10
    doc: dict = {
        "prediction_id": f"{run}-{n}",
        "model_version": "2026.11",
        "entity_type": "account",
        "entity_id": f"{run}-acct-{n}",
        "predicted_at": now.isoformat(),
        "features": {"top_drivers": ["usage_drop", "support_tickets"], "tenure_months": n % 48},
    }
    if kind < 4:
        doc.update(model="churn", score=0.85, context={
            "segment": "enterprise", "arr": 120000 + n % 1000, "renewal_date": "2027-02-01", "region": "emea",
            "account_manager": ACCOUNT_MANAGERS[n % len(ACCOUNT_MANAGERS)]})
    elif kind < 6:
        doc.update(model="upsell", score=0.7, context={
            "segment": "mid-market", "arr": 40000, "account_manager": ACCOUNT_MANAGERS[n % len(ACCOUNT_MANAGERS)]})
    else:
        doc.update(model="churn", score=0.7, context={"segment": "smb", "arr": 9000, "renewal_date": "2027-03-01"})
    if sent is not None:
        doc["features"]["bench_sent"] = sent
    return doc


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


def publish_backlog(client: redis.Redis, stream: str, count: int, *, run: str, chunk: int = 5000) -> float:
    """XADD `count` predictions (one `data` field of JSON, as producers write them); returns seconds."""
    started = time.perf_counter()
    now = datetime.now(UTC)
    for first in range(0, count, chunk):
        pipe = client.pipeline(transaction=False)
        for n in range(first, min(count, first + chunk)):
            pipe.xadd(stream, {"data": json.dumps(prediction(n, run, now=now))})
        pipe.execute()
    return time.perf_counter() - started


def paced(rate: float, seconds: float) -> Iterator[int]:
    """Yield message numbers at a steady `rate` per second for `seconds` (catching up if late)."""
    started = time.perf_counter()
    total = int(rate * seconds)
    for n in range(total):
        due = started + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield n

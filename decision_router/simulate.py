"""A simulated world with a known truth, run through the real pipeline.

`decision-router simulate` and `decision-router demo` run it; the tests that prove the stats
right run it too (tests/integration/test_simulation.py). The world:

- **Accounts and a churn model.** Each account has a true churn risk R ~ Beta(score_a,
  score_b), and P(churn | R) = R. The model is calibrated: its score is R, until the optional
  drift from day `drift_from_day`, after which it reports min(1, R + drift_shift) while the
  accounts' real risk stays R (a quietly wrong model: same version, shifted scores). Churn is
  the bad outcome: the CRM reports it as result `failure`, a renewal as `success`.
- **A rule with a control group.** `churn-risk` alerts on score >= `threshold`, owned by the
  account's manager (`context.account_manager`; the fallback desk for accounts without one);
  the router holds out `holdout` of the accounts by its stable hash. Lower scores are recorded
  by `churn-watch`. Each account is scored once, on the day it enters the world: `entities`
  accounts spread evenly over `days` (a cohort a day).
- **Owners** (`OwnerProfile`) acknowledge an alert with probability `p_acknowledge`, after a
  delay (exponential with mean `ack_hours`, truncated at `max_ack_days`); once they have
  acknowledged it they intervene with probability `p_intervene`, after a further delay (mean
  `act_hours`, truncated at `max_act_days`). The SLAs are 1 day to acknowledge and 2 to act;
  the sweeper escalates what is late to the team lead, and a lead's miss is an SLA breach.
- **The intervention** changes the account's success (renewal) probability by `effect`:
  P(success | intervened) = clip(1 - R + effect, 0, 1), otherwise 1 - R. The CRM reports each
  account's result by entity `outcome_delay_days` (uniform) after its prediction, always after
  any intervention; with `report_rate` < 1 some results never come.
- **Bad input**: `bad_input_rate` extra predictions per account (out-of-range score, missing
  id, stale, duplicate) that the quality gate must dead-letter.
- **Controls acted on anyway** (`control_act_rate`, default 0): that share of the held-out
  accounts gets an `intervened` event by entity from its owner, unprompted, with the effect.

The truth the stats must find (`Truth`), in the stats' own definitions (treated = routed alerts
with an outcome, control = held-out records with an outcome, intention to treat):

    uplift = (q - c) * E[clip(1 - R + effect, 0, 1) - (1 - R) | the account matches the rule]
    q      = sum_o w_o * p_acknowledge_o * p_intervene_o / sum_o w_o

w_o being owner o's share of accounts, c the control_act_rate. q is the probability that an
alert is acted on; the expectation is over R's Beta distribution (numerical integration) and, with drift, over the
days before and after it, weighted by how many accounts of each day match the rule. Report
delays and report_rate are independent of everything else, so they do not change it. For
0 <= effect <= threshold nothing is clipped and uplift = (q - c) * effect exactly.

Model precision (`stats model`) is checked against the simulator's own record: per score band,
the held-out accounts nobody acted on, those with a result, and those that churned must be
the stats' counts exactly; and since P(churn | R) = R, the band's true precision is the mean R
of its accounts with a result, which each band's Wilson 95% interval must contain in all but a
few bands (`PrecisionCheck`).

How it runs: the real service (`running_service`) on the embedded fakeredis (or a given Redis
URL) and a SQLite store in a temporary directory (or a given database URL), with a clock that
the simulator moves one simulated day at a time. Each day at 08:00 the simulator publishes on
the streams that day's predictions and every owner and CRM event that has happened since the
previous day (each with its own `at`), waits until the consumer group has processed them,
reads the new alerts in the owners' inboxes and decides what each owner will do, then runs
the SLA sweeper, the data-quality monitor (an hour later: its first hourly check after the
batch) and reads the stats from the store. Alerts are
created at the tick and every SLA is a whole number of days, so a daily sweep escalates
exactly what a continuous one would. Nothing sleeps.

Several worlds can share one service (`run_simulations`): each has its own seed, accounts
and model name (`churn-s<seed>`), so its stats are read with `model=` and are the same as
when it runs alone; the rule (holdout, threshold) is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import math
import multiprocessing
import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router.audit import iso
from decision_router.contracts import Alert
from decision_router.embedded import EmbeddedRedis
from decision_router.keys import Keys
from decision_router.monitor import DataQualityMonitor, ModelHealth
from decision_router.redis_client import redis_from_url
from decision_router.router import in_holdout
from decision_router.rules import RuleSet, load_rules
from decision_router.service import RouterService, running_service
from decision_router.settings import Settings, hash_tag, redact_url
from decision_router.stats import BandRow, StatsRow, compute_model_precision, compute_stats
from decision_router.store import check_writable, create_schema, make_engine
from decision_router.streams import as_text
from decision_router.tables import RejectionRecord
from decision_router.uplift import DEFAULT_BAND_EDGES

RULE = "churn-risk"
WATCH_RULE = "churn-watch"
MODEL = "churn"
MODEL_VERSION = "2026.11"
ENTITY_TYPE = "account"
LEAD = "lead-retention"
MODEL_OWNER = "ml-platform"
CRM = "crm"
ACK_WITHIN_DAYS = 1
ACT_WITHIN_DAYS = 2
REFERENCE_DAYS = 3  # models.<model>.drift.reference_days in the simulation's rules
TICK_HOUR = 8  # the simulated day's batch runs at 08:00 UTC
MONITOR_DELAY = timedelta(hours=1)  # the data-quality check runs this long after the day's batch
ACTIONS = ("exec-call", "success-plan", "discount-offer", "training-session", "health-check")
DRIVERS = ("usage_drop", "support_tickets", "champion_left", "price_increase", "low_adoption", "late_payments")
SEGMENTS = (("enterprise", 0.2), ("mid-market", 0.45), ("smb", 0.35))
BAD_KINDS = ("score_out_of_range", "missing_id", "stale", "duplicate")


# --- parameters ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnerProfile:
    """How one owner behaves. `weight` is their share of accounts. The one `fallback` profile is
    the desk that takes accounts without an account manager (their predictions name nobody)."""

    id: str
    name: str
    weight: float
    p_acknowledge: float
    p_intervene: float  # once acknowledged
    ack_hours: float  # mean delay from the alert to the acknowledgement
    act_hours: float  # mean delay from the acknowledgement to the intervention
    fallback: bool = False

    @property
    def p_act(self) -> float:
        """Probability that an alert to this owner is acted on: the expected intervention rate."""
        return self.p_acknowledge * self.p_intervene


DEFAULT_OWNERS: tuple[OwnerProfile, ...] = (
    OwnerProfile("ana-silva", "Ana Silva", 0.25, 0.97, 0.85, 1.5, 5.0),
    OwnerProfile("ben-okafor", "Ben Okafor", 0.25, 0.90, 0.65, 6.0, 18.0),
    OwnerProfile("chen-wei", "Chen Wei", 0.20, 0.80, 0.50, 20.0, 36.0),
    OwnerProfile("dora-jensen", "Dora Jensen", 0.20, 0.60, 0.35, 30.0, 40.0),
    OwnerProfile("retention-desk", "Retention desk", 0.10, 0.85, 0.55, 4.0, 24.0, fallback=True),
)


@dataclass(frozen=True)
class SimulationParams:
    days: int = 14  # days on which predictions are published
    entities: int = 2000  # accounts, spread evenly over the days
    effect: float = 0.10  # change of an intervened account's success probability
    holdout: float = 0.3  # the rule's control-group fraction
    threshold: float = 0.5  # the rule alerts on score >= threshold
    drift_from_day: int | None = None  # the model's scores drift from this day (0-based); None: never
    drift_shift: float = 0.2  # drifted score = min(1, R + drift_shift)
    seed: int = 7
    model: str = MODEL
    score_a: float = 3.0  # R ~ Beta(score_a, score_b)
    score_b: float = 2.0
    report_rate: float = 1.0  # share of accounts whose result the CRM reports
    outcome_delay_days: tuple[float, float] = (6.0, 12.0)  # uniform, after the prediction
    max_ack_days: float = 2.0  # acknowledgement delays are truncated here
    max_act_days: float = 3.0  # intervention delays (after the acknowledgement) are truncated here
    bad_input_rate: float = 0.02  # extra malformed predictions per account
    follow_up_days: int | None = None  # days after the last predictions; None: until every result is in
    owners: tuple[OwnerProfile, ...] = DEFAULT_OWNERS
    drift_min_samples: int = 100  # models.<model>.drift.min_samples in the simulation's rules
    drift_alpha: float = 0.001  # models.<model>.drift.alpha: false-alarm rate per daily check
    # Share of held-out accounts whose owner acts anyway, unprompted (an `intervened` event by entity):
    # `stats model` must leave them out of precision, and the control group's success includes their effect.
    control_act_rate: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.days < 1:
            problems.append("days must be >= 1")
        if self.entities < 1:
            problems.append("entities must be >= 1")
        if not -1.0 <= self.effect <= 1.0:
            problems.append("effect must be in [-1, 1]")
        if not 0.0 <= self.holdout < 1.0:
            problems.append("holdout must be in [0, 1)")
        if not 0.0 <= self.threshold <= 1.0:
            problems.append("threshold must be in [0, 1]")
        if self.drift_from_day is not None and self.drift_from_day < 0:
            problems.append("drift_from_day must be >= 0")
        elif self.drift_from_day is not None and self.drift_from_day >= self.days:
            # Scores are published on days 0..days-1 only: a later drift would never happen, yet be reported.
            problems.append(
                f"drift_from_day must be below days ({self.days}): no prediction is published from day "
                f"{self.drift_from_day} on (days count from 0)"
            )
        if not 0.0 <= self.drift_shift <= 1.0:
            problems.append("drift_shift must be in [0, 1]")
        if self.score_a <= 0 or self.score_b <= 0:
            problems.append("score_a and score_b must be > 0")
        if not 0.0 < self.report_rate <= 1.0:
            problems.append("report_rate must be in (0, 1]")
        if self.max_ack_days <= 0 or self.max_act_days <= 0:
            problems.append("max_ack_days and max_act_days must be > 0")
        low, high = self.outcome_delay_days
        if not self.max_ack_days + self.max_act_days < low <= high < 30:
            problems.append(
                f"outcome_delay_days must satisfy {self.max_ack_days + self.max_act_days:g} (max_ack_days + "
                "max_act_days) < low <= high < 30: results come after any intervention, inside the outcome window"
            )
        if not 0.0 <= self.bad_input_rate <= 1.0:
            problems.append("bad_input_rate must be in [0, 1]")
        if self.follow_up_days is not None and self.follow_up_days < 0:
            problems.append("follow_up_days must be >= 0")
        if sum(o.weight for o in self.owners) <= 0:
            problems.append("owners need a positive total weight")
        if sum(1 for o in self.owners if o.fallback) != 1:
            problems.append("exactly one owner profile must be the fallback desk")
        if len({o.id for o in self.owners}) != len(self.owners):
            problems.append("owner ids must be unique")
        for o in self.owners:
            if not (0 <= o.p_acknowledge <= 1 and 0 <= o.p_intervene <= 1 and o.weight >= 0):
                problems.append(f"owner {o.id}: probabilities must be in [0, 1] and weight >= 0")
            if o.ack_hours <= 0 or o.act_hours <= 0:
                problems.append(f"owner {o.id}: ack_hours and act_hours must be > 0")
        if self.drift_min_samples < 50:
            problems.append("drift_min_samples must be >= 50")
        if not 0.0 < self.drift_alpha < 1.0:
            problems.append("drift_alpha must be in (0, 1)")
        if not 0.0 <= self.control_act_rate <= 1.0:
            problems.append("control_act_rate must be in [0, 1]")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def total_days(self) -> int:
        """Simulated days, including the follow-up in which the last results come in."""
        follow = self.follow_up_days if self.follow_up_days is not None else math.ceil(self.outcome_delay_days[1])
        return self.days + follow

    def per_day(self, day: int) -> int:
        """Accounts scored on `day` (the first days take the remainder)."""
        if not 0 <= day < self.days:
            return 0
        base, extra = divmod(self.entities, self.days)
        return base + (1 if day < extra else 0)

    def drifted(self, day: int) -> bool:
        return self.drift_from_day is not None and day >= self.drift_from_day

    @property
    def fallback_owner(self) -> str:
        return next(o.id for o in self.owners if o.fallback)


# --- the truth -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Truth:
    """What the stats should find, derived from the model of the world (module docstring)."""

    effect: float  # on the success probability of an account that is intervened on
    intervention_probability: float  # q: P(an alert is acted on), over the owner mix
    uplift: float  # treated success probability - control success probability (intention to treat)
    control_success_probability: float | None
    treated_success_probability: float | None
    match_probability: float  # share of scored accounts the rule alerts on or holds out


@lru_cache(maxsize=8)
def _beta_grid(a: float, b: float, points: int = 20_000) -> tuple[tuple[float, float], ...]:
    """(x, weight) at the midpoints of a fine grid under the Beta(a, b) density; weights sum to 1."""
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    grid = []
    for i in range(points):
        x = (i + 0.5) / points
        grid.append((x, math.exp(log_norm + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x))))
    total = math.fsum(w for _, w in grid)
    return tuple((x, w / total) for x, w in grid)


@lru_cache(maxsize=64)
def _regime(a: float, b: float, threshold: float, effect: float, shift: float) -> tuple[float, float, float]:
    """(P(match), E[gain; match], E[1 - R; match]) for R ~ Beta(a, b) scored as min(1, R + shift)."""
    matched = gain = control = 0.0
    for x, w in _beta_grid(a, b):
        if min(1.0, x + shift) >= threshold:
            matched += w
            gain += w * (min(1.0, max(0.0, 1 - x + effect)) - (1 - x))
            control += w * (1 - x)
    return matched, gain, control


def intervention_probability(owners: Sequence[OwnerProfile]) -> float:
    """q: the probability that an alert is acted on, over the owner mix."""
    total = sum(o.weight for o in owners)
    return sum(o.weight * o.p_act for o in owners) / total


def compute_truth(params: SimulationParams) -> Truth:
    """The true uplift and success probabilities, from the model of the world."""
    q = intervention_probability(params.owners)

    def regime(shift: float) -> tuple[float, float, float]:
        return _regime(params.score_a, params.score_b, params.threshold, params.effect, shift)

    before = regime(0.0)
    after = regime(params.drift_shift) if params.drift_from_day is not None else before
    matched = gain = control = 0.0
    scored = 0
    for day in range(params.days):
        n = params.per_day(day)
        m, g, c = after if params.drifted(day) else before
        matched, gain, control, scored = matched + n * m, gain + n * g, control + n * c, scored + n
    if matched == 0:
        return Truth(params.effect, q, 0.0, None, None, 0.0)
    # Control accounts acted on anyway stay in the control group (intention to treat) and carry the effect.
    acted_anyway = params.control_act_rate
    uplift = (q - acted_anyway) * gain / matched
    control_p = (control + acted_anyway * gain) / matched
    return Truth(params.effect, q, uplift, control_p, control_p + uplift, matched / scored)


# --- the world -------------------------------------------------------------------------------


@dataclass
class Account:
    """One account and every random draw its story needs, made up front in a fixed order: a
    seed gives the same world whatever order the service happens to process things in."""

    index: int
    entity_id: str
    day: int
    risk: float
    score: float
    owner: OwnerProfile
    document: dict[str, Any]
    u_ack: float
    ack_delay: timedelta
    u_act: float
    act_delay: timedelta
    reported: bool
    outcome_delay: timedelta
    u_outcome: float
    matched: bool  # the rule's threshold
    held_out: bool  # the router's hash: in the control group


def _truncated_exponential(rng: random.Random, mean_hours: float, cap_days: float) -> timedelta:
    """An exponential delay with this mean, conditioned on <= cap; whole seconds, at least a minute."""
    cap_h = cap_days * 24
    hours = -mean_hours * math.log1p(-rng.random() * (1 - math.exp(-cap_h / mean_hours)))
    return timedelta(seconds=max(60, min(round(hours * 3600), round(cap_h * 3600))))


def _pick(rng: random.Random, items: Sequence[Any], weights: Sequence[float]) -> Any:
    return rng.choices(list(items), weights=list(weights))[0]


def build_world(params: SimulationParams, start: datetime) -> tuple[list[Account], dict[int, list[dict[str, Any]]]]:
    """The accounts, and the bad inputs per day (raw documents, published as they are)."""
    rng = random.Random(params.seed)
    accounts: list[Account] = []
    low, high = params.outcome_delay_days
    for day in range(params.days):
        tick = start + timedelta(days=day)
        for _ in range(params.per_day(day)):
            index = len(accounts)
            risk = rng.betavariate(params.score_a, params.score_b)
            score = min(1.0, risk + params.drift_shift) if params.drifted(day) else risk
            owner = _pick(rng, params.owners, [o.weight for o in params.owners])
            entity_id = f"acct-{params.seed}-{index:06d}"
            context: dict[str, Any] = {
                "segment": _pick(rng, [s for s, _ in SEGMENTS], [w for _, w in SEGMENTS]),
                "arr": rng.choice([12_000, 48_000, 120_000, 350_000, 900_000]),
                "region": rng.choice(["emea", "amer", "apac"]),
            }
            renewal = (tick + timedelta(days=rng.randint(20, 200))).date().isoformat()
            if rng.random() < 0.95:  # the CRM lacks some renewal dates: missing context
                context["renewal_date"] = renewal
            if not owner.fallback:
                context["account_manager"] = owner.id
            usage = min(1.0, max(0.0, 1 - risk + rng.gauss(0, 0.15)))
            document = {
                "prediction_id": f"sim-{params.seed}-{index:06d}",
                "model": params.model,
                "model_version": MODEL_VERSION,
                "entity_type": ENTITY_TYPE,
                "entity_id": entity_id,
                "score": score,
                "predicted_at": (tick - timedelta(minutes=rng.randint(1, 120))).isoformat(),
                "features": {"top_drivers": rng.sample(DRIVERS, 2), "usage_index": round(usage, 3)},
                "context": context,
            }
            matched = score >= params.threshold
            accounts.append(
                Account(
                    index=index,
                    entity_id=entity_id,
                    day=day,
                    risk=risk,
                    score=score,
                    owner=owner,
                    document=document,
                    u_ack=rng.random(),
                    ack_delay=_truncated_exponential(rng, owner.ack_hours, params.max_ack_days),
                    u_act=rng.random(),
                    act_delay=_truncated_exponential(rng, owner.act_hours, params.max_act_days),
                    reported=rng.random() < params.report_rate,
                    outcome_delay=timedelta(seconds=round(rng.uniform(low, high) * 86400)),
                    u_outcome=rng.random(),
                    matched=matched,
                    held_out=matched and in_holdout(RULE, ENTITY_TYPE, entity_id, params.holdout),
                )
            )
    bad: dict[int, list[dict[str, Any]]] = {}
    count = round(params.entities * params.bad_input_rate)
    for n in range(count):
        day = n * params.days // count
        original = rng.choice([a for a in accounts if a.day == day])
        doc = json.loads(json.dumps(original.document))
        kind = BAD_KINDS[n % len(BAD_KINDS)]
        if kind == "score_out_of_range":
            doc["score"] = round(1.0 + rng.uniform(0.1, 2.0), 2)
        elif kind == "missing_id":
            doc["entity_id"] = ""
        elif kind == "stale":
            doc["predicted_at"] = (start + timedelta(days=day - 30)).isoformat()
        if kind != "duplicate":  # a duplicate resends the original prediction_id
            doc["prediction_id"] = f"sim-{params.seed}-bad-{n:05d}"
        bad.setdefault(day, []).append(doc)
    return accounts, bad


# --- the event log and the result ------------------------------------------------------------


@dataclass
class AlertLog:
    """One alert as the simulator saw it arrive, and what its owner did (the simulator decided)."""

    alert_id: str
    entity_id: str
    owner: str
    created_at: datetime
    acknowledged_at: datetime | None = None
    intervened_at: datetime | None = None

    @property
    def time_to_ack_s(self) -> float | None:
        return None if self.acknowledged_at is None else (self.acknowledged_at - self.created_at).total_seconds()

    @property
    def time_to_act_s(self) -> float | None:
        return None if self.intervened_at is None else (self.intervened_at - self.created_at).total_seconds()


@dataclass(frozen=True)
class OutcomeLog:
    """One result the CRM reported."""

    entity_id: str
    group: str  # treated (alert delivered) | control (held out) | recorded (below the threshold) | lost
    intervened: bool
    success: bool
    at: datetime


def nearest_rank(values: Sequence[float], q: float) -> float | None:
    """The smallest value that at least a share q of the values do not exceed."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered) - 1e-9)) - 1]


@dataclass(frozen=True)
class OwnerTruth:
    """One owner: the configured behaviour, and what the simulator's event log shows."""

    owner: str
    p_acknowledge: float
    p_intervene: float
    p_act: float  # p_acknowledge * p_intervene: the expected intervention rate
    alerts: int  # delivered to this owner (seen in the inbox)
    acknowledged: int
    intervened: int
    acknowledged_rate: float | None
    intervention_rate: float | None
    median_time_to_ack_s: float | None
    median_time_to_act_s: float | None
    p90_time_to_ack_s: float | None
    p90_time_to_act_s: float | None


def owner_truths(alerts: Sequence[AlertLog], owners: Sequence[OwnerProfile]) -> list[OwnerTruth]:
    """Per owner, from the event log: the same definitions as the stats (times from alert creation)."""
    profiles = {o.id: o for o in owners}
    rows = []
    for owner in sorted({a.owner for a in alerts} | set(profiles)):
        mine = [a for a in alerts if a.owner == owner]
        acks = [t for a in mine if (t := a.time_to_ack_s) is not None]
        acts = [t for a in mine if (t := a.time_to_act_s) is not None]
        profile = profiles.get(owner)
        rows.append(
            OwnerTruth(
                owner=owner,
                p_acknowledge=profile.p_acknowledge if profile else 0.0,
                p_intervene=profile.p_intervene if profile else 0.0,
                p_act=profile.p_act if profile else 0.0,
                alerts=len(mine),
                acknowledged=len(acks),
                intervened=len(acts),
                acknowledged_rate=len(acks) / len(mine) if mine else None,
                intervention_rate=len(acts) / len(mine) if mine else None,
                median_time_to_ack_s=statistics.median(acks) if acks else None,
                median_time_to_act_s=statistics.median(acts) if acts else None,
                p90_time_to_ack_s=nearest_rank(acks, 0.9),
                p90_time_to_act_s=nearest_rank(acts, 0.9),
            )
        )
    return rows


@dataclass(frozen=True)
class DayReading:
    """What the stats and the monitor said after one simulated day."""

    day: int
    at: datetime
    stats: StatsRow | None  # the rule's row for this world's model (None: not read, or nothing yet)
    flagged: tuple[str, ...]  # metrics the data-quality monitor flagged for the model that day
    health: tuple[ModelHealth, ...] = field(default=(), repr=False)  # the monitor's figures for the model


@dataclass(frozen=True)
class Tally:
    """Counts from the simulator's own log, in the stats' definitions."""

    accounts: int
    matched: int  # scored at or above the threshold
    treated: int  # alerts delivered (seen in an inbox)
    control: int  # held out by the router's hash, never delivered
    treated_successes: int  # results reported for treated accounts
    treated_failures: int
    control_successes: int
    control_failures: int
    lost: int  # matched, not held out, yet no alert arrived (must be 0)
    published_predictions: int  # accounts plus bad inputs
    bad_inputs: int
    events: int  # owner and CRM events published


@dataclass(frozen=True)
class BandTally:
    """One score band of `stats model`'s units as the simulator recorded them: held-out accounts
    nobody acted on, scored band_low <= score < band_high (the last band closed)."""

    band_low: float
    band_high: float
    held_out: int
    n: int  # of which the CRM reported a result
    positives: int  # of which churned (result: failure)
    true_precision: float | None  # the mean true risk R of the n: P(churn | R) = R; None when n == 0


def _band_of(score: float, edges: Sequence[float]) -> int | None:
    """The band a score falls in, or None outside the edges: a plain scan, on purpose not the
    stats' own bisect, so that a banding mistake there shows as a difference."""
    last = len(edges) - 2
    for i in range(last + 1):
        if edges[i] <= score < edges[i + 1] or (i == last and score == edges[-1]):
            return i
    return None


def band_tallies(
    units: Sequence[tuple[float, float, OutcomeLog | None]], edges: Sequence[float]
) -> list[BandTally]:
    """Per band, from (score, true risk, the reported result or None) of the units."""
    bands = len(edges) - 1
    held, positives = [0] * bands, [0] * bands
    risks: list[list[float]] = [[] for _ in range(bands)]
    for score, risk, result in units:
        band = _band_of(score, edges)
        if band is None:
            continue
        held[band] += 1
        if result is not None:
            risks[band].append(risk)
            positives[band] += not result.success
    return [
        BandTally(low, high, held[i], len(mine), positives[i], math.fsum(mine) / len(mine) if mine else None)
        for i, ((low, high), mine) in enumerate(zip(pairwise(edges), risks, strict=True))
    ]


INTERVAL_MISS_RATE = 0.05  # a Wilson 95% interval misses the true precision about this often
FALSE_ALARM = 0.01  # at most this chance that a correct pipeline fails the interval check


def allowed_misses(bands: int, miss_rate: float = INTERVAL_MISS_RATE, alarm: float = FALSE_ALARM) -> int:
    """The fewest misses m with P(Binomial(bands, miss_rate) > m) <= alarm: more than m misses
    among independent bands would be this unlikely if every interval were right. (Wilson
    intervals cover close to nominal, and a band's accounts have different risks, which
    narrows the spread of its churn count: it errs, if at all, on the side of passing.)"""
    tail = 1.0
    for m in range(bands + 1):
        tail -= math.comb(bands, m) * miss_rate**m * (1 - miss_rate) ** (bands - m)
        if tail <= alarm:
            return m
    return bands


@dataclass(frozen=True)
class BandCheck:
    """One band: the simulator's record beside the stats' row."""

    simulated: BandTally
    measured: BandRow | None
    # `stats model` listed no row at all: it shows a model's bands only once some prediction of it was
    # held out, so every band then counts zero (a world with holdout 0), not "missing".
    report_empty: bool = False

    @property
    def counts_equal(self) -> bool:
        s, m = self.simulated, self.measured
        if m is None:
            return self.report_empty and s.held_out == 0
        return (m.band_low, m.band_high, m.held_out, m.n, m.positives) == (
            s.band_low, s.band_high, s.held_out, s.n, s.positives
        )

    @property
    def covered(self) -> bool | None:
        """The stats' interval contains the band's true precision; None when there is nothing to judge."""
        truth, m = self.simulated.true_precision, self.measured
        if truth is None or m is None or m.ci_low is None or m.ci_high is None:
            return None
        return m.ci_low <= truth <= m.ci_high


@dataclass(frozen=True)
class PrecisionCheck:
    """`stats model` against the simulator: counts equal in every band, and the Wilson intervals
    contain the true precision in all but `allowed` of the bands that have a result."""

    bands: tuple[BandCheck, ...]
    extra_rows: int  # stats rows beyond the simulated bands (another model version, say): must be 0

    @property
    def counts_equal(self) -> bool:
        return self.extra_rows == 0 and all(b.counts_equal for b in self.bands)

    @property
    def judged(self) -> int:
        return sum(b.covered is not None for b in self.bands)

    @property
    def misses(self) -> int:
        return sum(b.covered is False for b in self.bands)

    @property
    def allowed(self) -> int:
        return allowed_misses(self.judged)

    @property
    def calibrated(self) -> bool:
        return self.misses <= self.allowed

    def as_dict(self) -> dict[str, Any]:
        def counts(fields: dict[str, Any]) -> dict[str, Any]:  # the band's edges are said once, above
            return {k: v for k, v in fields.items() if not k.startswith("band_")}

        return {
            "bands": [
                {
                    "band_low": b.simulated.band_low,
                    "band_high": b.simulated.band_high,
                    "simulated": counts(asdict(b.simulated)),
                    "measured": counts(b.measured.as_dict()) if b.measured else None,
                    "counts_equal": b.counts_equal,
                    "covered": b.covered,
                }
                for b in self.bands
            ],
            "extra_rows": self.extra_rows,
            "counts_equal": self.counts_equal,
            "bands_judged": self.judged,
            "misses": self.misses,
            "allowed_misses": self.allowed,
            "calibrated": self.calibrated,
        }


def precision_check(simulated: Sequence[BandTally], measured: Sequence[BandRow]) -> PrecisionCheck:
    by_band = {(row.band_low, row.band_high): row for row in measured}
    bands = tuple(BandCheck(s, by_band.get((s.band_low, s.band_high)), report_empty=not measured) for s in simulated)
    return PrecisionCheck(bands, extra_rows=len(measured) - sum(b.measured is not None for b in bands))


@dataclass(frozen=True)
class Check:
    """One pass/fail line of `simulate`: its exit code is 1 when any fails."""

    name: str
    passed: bool
    detail: str


def _log_check(tally: Tally, row: StatsRow | None) -> Check:
    """The rule's row equals the simulator's log: nothing lost, doubled or misfiled."""
    simulated = (
        tally.treated, tally.control, tally.treated_successes, tally.treated_failures,
        tally.control_successes, tally.control_failures,
    )
    reported = (
        (row.routed, row.held_out, row.successes, row.failures, row.control_successes, row.control_failures)
        if row is not None else (0,) * 6
    )
    passed = simulated == reported and tally.lost == 0
    names = "routed, held out, treated successes/failures, control successes/failures"
    detail = f"{names}: {'/'.join(map(str, reported))}"
    if simulated != reported:
        detail += f", simulated {'/'.join(map(str, simulated))}"
    if tally.lost:
        detail += f"; {tally.lost} alerts never reached an inbox"
    return Check("stats equal the simulated log", passed, detail)


def _precision_checks(check: PrecisionCheck) -> list[Check]:
    unequal = [f"{b.simulated.band_low:g}-{b.simulated.band_high:g}" for b in check.bands if not b.counts_equal]
    if check.counts_equal:
        detail = "held out, with a result and churned equal in every band"
    else:
        detail = f"differ in bands {', '.join(unequal) or '(none)'}"
        detail += f"; {check.extra_rows} rows more" if check.extra_rows else ""
    counts = Check("model precision counts equal the simulated log", check.counts_equal, detail)
    calibration = Check(
        "model precision intervals contain the true precision",
        check.calibrated,
        f"in {check.judged - check.misses} of {check.judged} bands with a result "
        f"(at most {check.allowed} may miss: with 95% intervals a correct pipeline fails this in under 1% of runs)",
    )
    return [counts, calibration]


@dataclass(frozen=True)
class SimulationResult:
    params: SimulationParams
    truth: Truth
    tally: Tally
    owners: list[OwnerTruth]
    alerts: list[AlertLog] = field(repr=False)
    outcomes: list[OutcomeLog] = field(repr=False)
    measured: StatsRow | None  # the rule's row after the last day (None: no decisions)
    measured_by_owner: list[StatsRow] = field(repr=False)  # per owner (the rule's decisions)
    days: list[DayReading] = field(repr=False)
    rejected: dict[str, int]  # quality-gate rejections of this world's predictions, by reason
    drift_detected_day: int | None  # first day the monitor flagged the model's score; None: never
    flagged_days: list[int]  # days on which the monitor flagged anything of the model
    drift_checked: bool  # the data-quality monitor ran after every day (check_drift)
    database_url: str | None  # the store, when kept
    stream_prefix: str
    elapsed_s: float
    precision_log: list[BandTally] = field(default_factory=list, repr=False)  # the simulator's record per band
    measured_precision: list[BandRow] = field(default_factory=list, repr=False)  # `stats model` for this model

    @property
    def precision(self) -> PrecisionCheck:
        return precision_check(self.precision_log, self.measured_precision)

    def checks(self) -> list[Check]:
        """What must hold in every run of a correct pipeline (the uplift's truth is a 95% matter, not here)."""
        return [_log_check(self.tally, self.measured), *_precision_checks(self.precision)]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks())

    def measured_owner(self, owner: str) -> StatsRow | None:
        return next((row for row in self.measured_by_owner if row.key == owner), None)

    def as_dict(self) -> dict[str, Any]:
        """JSON form: parameters, truth, the log's counts, and what the stats reported."""
        params = asdict(self.params)
        return {
            "params": params,
            "truth": asdict(self.truth),
            "simulated": asdict(self.tally),
            "measured": _row_dict(self.measured, rule=RULE, model=self.params.model),
            "owners": [
                {"truth": asdict(o), "measured": _row_dict(self.measured_owner(o.owner), owner=o.owner)}
                for o in self.owners
            ],
            "days": [
                {
                    "day": d.day,
                    "at": iso(d.at),
                    **{
                        k: getattr(d.stats, k, None)
                        for k in ("treated_n", "control_n", "uplift", "uplift_ci_low", "uplift_ci_high",
                                  "uplift_seq_low", "uplift_seq_high")
                    },
                    "drift_flagged": list(d.flagged),
                }
                for d in self.days
            ],
            "precision": self.precision.as_dict(),
            "checks": [asdict(check) for check in self.checks()],
            "passed": self.passed,
            "rejected": self.rejected,
            "drift_detected_day": self.drift_detected_day,
            "flagged_days": self.flagged_days,
            "drift_checked": self.drift_checked,
            "database_url": redact_url(self.database_url) if self.database_url else None,  # printed: no password
            "stream_prefix": self.stream_prefix,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def _row_dict(row: StatsRow | None, **keys: str) -> dict[str, Any] | None:
    """A StatsRow as JSON, under the given group keys (rows here are read per model and rule)."""
    if row is None:
        return None
    document = row.as_dict()
    for name, _ in getattr(row, "group", ()) or ():
        document.pop(name, None)
    return {**keys, **document}


# --- rules -----------------------------------------------------------------------------------


def _shared(worlds: Sequence[SimulationParams]) -> SimulationParams:
    """The first world, after checking that the worlds can share one rule set and timeline."""
    first = worlds[0]
    for w in worlds[1:]:
        if (w.holdout, w.threshold) != (first.holdout, first.threshold):
            raise ValueError("worlds in one run share the rule: holdout and threshold must be equal")
        if w.fallback_owner != first.fallback_owner:
            raise ValueError("worlds in one run share the rule: the fallback desk must be the same")
    if len({w.seed for w in worlds}) != len(worlds):
        raise ValueError("worlds in one run need different seeds (their account ids derive from it)")
    if len({w.model for w in worlds}) != len(worlds):
        raise ValueError("worlds in one run need different model names")
    return first


def routing_yaml(worlds: Sequence[SimulationParams]) -> str:
    first = _shared(worlds)
    models = [w.model for w in worlds]
    lines = [
        "# Generated by decision_router.simulate: the simulated world's rules.",
        f"defaults: {{ack_within: {ACK_WITHIN_DAYS}d, act_within: {ACT_WITHIN_DAYS}d, priority: normal}}",
        "",
        "models:",
    ]
    for w in worlds:
        lines += [
            f"  {json.dumps(w.model)}:",
            f"    owner: {MODEL_OWNER}",
            (
                f"    drift: {{reference_days: {REFERENCE_DAYS}, recent: 1d, alpha: {w.drift_alpha!r}, "
                f"min_samples: {w.drift_min_samples}}}"
            ),
        ]
    model_condition = json.dumps(models[0]) if len(models) == 1 else "{in: " + json.dumps(models) + "}"
    lines += [
        "",
        "rules:",
        f"  - name: {RULE}",
        "    when:",
        f"      model: {model_condition}",
        f"      score: {{gte: {first.threshold!r}}}",
        f"    owner: {{from: context.account_manager, fallback: {first.fallback_owner}}}",
        "    priority: high",
        f"    holdout: {first.holdout!r}",
        "    context: [context.arr, context.renewal_date, features.top_drivers]",
        "",
        f"  - name: {WATCH_RULE}",
        "    when: {}",
        "    owner: analytics-desk",
        "    action: record",
        "    priority: low",
    ]
    return "\n".join(lines) + "\n"


def owners_yaml(worlds: Sequence[SimulationParams]) -> str:
    lines = [
        "# Generated by decision_router.simulate: the simulated world's owner directory.",
        "# One step of escalation: what an owner misses goes to the team lead; a lead's miss is an SLA breach.",
        "owners:",
        f"  - {{id: {LEAD}, name: Julien Moreau}}",
        "  - {id: analytics-desk, name: Analytics desk}",
        f"  - {{id: {MODEL_OWNER}, name: ML platform team}}",
    ]
    seen: set[str] = set()
    for w in worlds:
        for o in w.owners:
            if o.id not in seen:
                seen.add(o.id)
                team = "retention" if o.fallback else "account-management"
                lines.append(f"  - {{id: {o.id}, name: {json.dumps(o.name)}, manager: {LEAD}, team: {team}}}")
    return "\n".join(lines) + "\n"


def write_rules(directory: Path, worlds: Sequence[SimulationParams]) -> RuleSet:
    """The simulation's routing.yaml and owners.yaml in `directory`, loaded."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "routing.yaml").write_text(routing_yaml(worlds))
    (directory / "owners.yaml").write_text(owners_yaml(worlds))
    return load_rules(directory)


# --- running it ------------------------------------------------------------------------------


class SimClock:
    """The service's clock: simulated time, moved by the simulator."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def default_start(total_days: int) -> datetime:
    """08:00 UTC so many days ago that the simulated period ends today."""
    today = datetime.now(UTC).replace(hour=TICK_HOUR, minute=0, second=0, microsecond=0)
    return today - timedelta(days=total_days - 1)


def _entry_id(value: bytes | str) -> tuple[int, int]:
    ms, _, seq = as_text(value).partition("-")
    return int(ms), int(seq or 0)


async def _processed(redis: Redis, stream: str, group: str, last_id: str, *, timeout: float) -> None:
    """Wait until the consumer group has read and acknowledged everything up to `last_id`."""
    deadline = time.monotonic() + timeout
    target = _entry_id(last_id)
    delay = 0.002
    while True:
        for info in await redis.xinfo_groups(stream):
            if as_text(info["name"]) == group:
                delivered = info.get("last-delivered-id") or "0-0"
                if info["pending"] == 0 and _entry_id(delivered) >= target:
                    return
        if time.monotonic() > deadline:
            raise TimeoutError(f"simulation: the service did not process {stream} up to {last_id} within {timeout:g}s")
        await asyncio.sleep(delay)
        delay = min(0.02, delay * 1.5)


async def _publish(redis: Redis, stream: str, documents: Sequence[dict[str, Any]]) -> str | None:
    if not documents:
        return None
    async with redis.pipeline(transaction=False) as pipe:
        for doc in documents:
            pipe.xadd(stream, {"data": json.dumps(doc)})
        ids = await pipe.execute()
    return as_text(ids[-1])


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


class _World:
    """One world's accounts and logs inside a run."""

    def __init__(self, params: SimulationParams, start: datetime) -> None:
        self.params = params
        self.accounts, self.bad = build_world(params, start)
        self.profiles = {o.id: o for o in params.owners}
        self.alerts: dict[str, AlertLog] = {}
        self.alert_by_entity: dict[str, AlertLog] = {}
        self.outcomes: list[OutcomeLog] = []
        # Held-out accounts an owner acts on anyway: when (scheduled), and those whose event was published.
        self.control_acts: dict[str, datetime] = {}
        self.touched_controls: set[str] = set()
        self.readings: list[DayReading] = []
        self.published = 0
        self.events = 0

    def predictions(self, day: int) -> list[dict[str, Any]]:
        return [a.document for a in self.accounts if a.day == day] + self.bad.get(day, [])

    def precision_log(self, edges: Sequence[float]) -> list[BandTally]:
        """The simulator's record of `stats model`'s units, per score band: held-out accounts no
        published event said anyone acted on, those with a reported result, and those that churned."""
        results = {o.entity_id: o for o in self.outcomes if o.group == "control"}
        return band_tallies(
            [
                (a.score, a.risk, results.get(a.entity_id))
                for a in self.accounts if a.held_out and a.entity_id not in self.touched_controls
            ],
            edges,
        )

    def tally(self) -> Tally:
        groups = {g: [o for o in self.outcomes if o.group == g] for g in ("treated", "control")}
        treated, control = groups["treated"], groups["control"]
        return Tally(
            accounts=len(self.accounts),
            matched=sum(a.matched for a in self.accounts),
            treated=len(self.alert_by_entity),
            control=sum(a.held_out for a in self.accounts),
            treated_successes=sum(o.success for o in treated),
            treated_failures=sum(not o.success for o in treated),
            control_successes=sum(o.success for o in control),
            control_failures=sum(not o.success for o in control),
            lost=sum(a.matched and not a.held_out and a.entity_id not in self.alert_by_entity for a in self.accounts),
            published_predictions=self.published,
            bad_inputs=sum(len(v) for v in self.bad.values()),
            events=self.events,
        )


class _Run:
    """Worlds going through one service, one simulated day at a time."""

    def __init__(
        self, worlds: Sequence[_World], service: RouterService, ruleset: RuleSet, clock: SimClock, start: datetime,
        *, read_every_day: bool, check_drift: bool, on_day: Callable[[int, datetime], None] | None,
    ) -> None:
        self.worlds = list(worlds)
        self.service = service
        self.pipeline = service.pipeline
        self.keys: Keys = self.pipeline.keys
        self.redis: Redis = self.pipeline.redis
        self.ruleset = ruleset
        self.clock = clock
        self.start = start
        self.read_every_day = read_every_day
        self.on_day = on_day
        self.total_days = max(w.params.total_days for w in self.worlds)
        self.by_entity = {a.entity_id: (w, a) for w in self.worlds for a in w.accounts}
        self.holdouts = {rule.name: rule.holdout for rule in ruleset.rules}
        self.queue: list[tuple[datetime, int, _World, dict[str, Any]]] = []
        self.sequence = 0
        self.inbox_last: dict[str, tuple[int, int]] = {}
        self.monitor = self._monitor() if check_drift else None

    def _monitor(self) -> DataQualityMonitor:
        return getattr(self.service, "monitor", None) or DataQualityMonitor(self.pipeline)

    def _schedule(self, world: _World, at: datetime, event: dict[str, Any]) -> None:
        event["at"] = _iso(at)
        heapq.heappush(self.queue, (at, self.sequence, world, event))
        self.sequence += 1

    def _schedule_results(self) -> None:
        """The CRM's report for every account whose result will come (its content is decided when it is due),
        and the interventions on held-out accounts that their owners make anyway."""
        for world in self.worlds:
            for account in world.accounts:
                if account.held_out and account.u_act < world.params.control_act_rate:
                    self._schedule_control_act(world, account)
                if account.reported:
                    at = datetime.fromisoformat(account.document["predicted_at"]) + account.outcome_delay
                    event = {"type": "outcome", "entity_type": ENTITY_TYPE, "entity_id": account.entity_id}
                    self._schedule(world, at, {**event, "actor": CRM})

    def _schedule_control_act(self, world: _World, account: Account) -> None:
        """Unprompted (no alert was delivered): by entity, which reaches the account's control record.
        u_act and the delays are the account's own draws, unused by a held-out account otherwise; they
        end before the result comes (SimulationParams checks it)."""
        at = self.start + timedelta(days=account.day) + account.ack_delay + account.act_delay
        world.control_acts[account.entity_id] = at
        self._schedule(
            world, at,
            {"type": "intervened", "entity_type": ENTITY_TYPE, "entity_id": account.entity_id,
             "actor": account.owner.id, "action": ACTIONS[account.index % len(ACTIONS)]},
        )

    def _result(self, event: dict[str, Any], at: datetime) -> dict[str, Any]:
        """Fill in a due CRM report: the account renews with its success probability."""
        world, account = self.by_entity[event["entity_id"]]
        log = world.alert_by_entity.get(account.entity_id)
        intervened = log is not None and log.intervened_at is not None and log.intervened_at <= at
        acted_anyway = world.control_acts.get(account.entity_id)
        intervened = intervened or (acted_anyway is not None and acted_anyway <= at)
        p_success = 1 - account.risk
        if intervened:
            p_success = min(1.0, max(0.0, p_success + world.params.effect))
        success = account.u_outcome < p_success
        if log is not None:
            group = "treated"
        elif account.held_out:
            group = "control"
        else:
            group = "recorded" if not account.matched else "lost"
        world.outcomes.append(OutcomeLog(account.entity_id, group, intervened, success, at))
        event = dict(event, result="success" if success else "failure")
        if success:
            event["value"] = account.document["context"]["arr"]
        return event

    def _owner_reacts(self, alert: Alert) -> None:
        found = self.by_entity.get(alert.entity_id)
        if found is None:
            return
        world, account = found
        created = alert.created_at.astimezone(UTC)
        log = AlertLog(alert.alert_id, alert.entity_id, alert.owner, created)
        world.alerts[alert.alert_id] = log
        world.alert_by_entity[alert.entity_id] = log
        profile = world.profiles.get(alert.owner)
        if profile is None or account.u_ack >= profile.p_acknowledge:
            return
        log.acknowledged_at = created + account.ack_delay
        self._schedule(
            world, log.acknowledged_at, {"type": "acknowledged", "alert_id": alert.alert_id, "actor": alert.owner}
        )
        if account.u_act >= profile.p_intervene:
            return
        log.intervened_at = log.acknowledged_at + account.act_delay
        self._schedule(
            world,
            log.intervened_at,
            {"type": "intervened", "alert_id": alert.alert_id, "actor": alert.owner,
             "action": ACTIONS[account.index % len(ACTIONS)]},
        )

    async def _read_inboxes(self) -> None:
        """New alerts in every owner's inbox; each owner decides what to do with theirs."""
        for owner in sorted(self.ruleset.owners):
            last = self.inbox_last.get(owner)
            start = "-" if last is None else f"{last[0]}-{last[1]}"
            for entry_id, fields in await self.redis.xrange(self.keys.inbox(owner), min=start, max="+"):
                position = _entry_id(entry_id)
                if last is not None and position <= last:
                    continue
                self.inbox_last[owner] = position
                if b"kind" in fields or b"data" not in fields:
                    continue  # a data-quality alert for the model's owner
                alert = Alert.model_validate_json(fields[b"data"])
                if alert.escalation is not None or alert.reassigned_from:
                    continue  # a copy for the lead: the owner already has it
                found = self.by_entity.get(alert.entity_id)
                if found is not None and alert.alert_id not in found[0].alerts:
                    self._owner_reacts(alert)

    async def _tick(self, day: int, timeout: float) -> None:
        now = self.start + timedelta(days=day)
        self.clock.now = now
        predictions: list[dict[str, Any]] = []
        for world in self.worlds:
            mine = world.predictions(day)
            world.published += len(mine)
            predictions += mine
        due: list[dict[str, Any]] = []
        while self.queue and self.queue[0][0] <= now:
            at, _, world, event = heapq.heappop(self.queue)
            world.events += 1
            if event["type"] == "intervened" and "entity_id" in event:
                world.touched_controls.add(event["entity_id"])
            due.append(self._result(event, at) if event["type"] == "outcome" else event)
        last_prediction = await _publish(self.redis, self.keys.predictions, predictions)
        last_event = await _publish(self.redis, self.keys.outcomes, due)
        group = self.pipeline.settings.consumer_group
        if last_prediction:
            await _processed(self.redis, self.keys.predictions, group, last_prediction, timeout=timeout)
        if last_event:
            await _processed(self.redis, self.keys.outcomes, group, last_event, timeout=timeout)
        await self._read_inboxes()
        await self.service.sweeper.sweep_once()
        health: list[ModelHealth] = []
        if self.monitor is not None:
            # The monitor's first hourly check after the day's batch: its recent window (the last
            # day, ends included) then holds this batch and not yesterday's, which came a day earlier.
            self.clock.now = now + MONITOR_DELAY
            health = list(await self.monitor.check_once())
            self.clock.now = now
        last = day == self.total_days - 1
        rows = await asyncio.to_thread(self.read_stats, "model") if (self.read_every_day or last) else []
        by_model = {row.key: row for row in rows}
        for world in self.worlds:
            model = world.params.model
            mine = tuple(h for h in health if h.model == model)
            flagged = tuple(sorted({h.metric for h in mine if h.flagged}))
            world.readings.append(DayReading(day, now, by_model.get(model), flagged, mine))
        if self.on_day is not None:
            self.on_day(day, now)

    def read_stats(self, by: str, model: str | None = None) -> list[StatsRow]:
        with Session(self.pipeline.engine) as session:
            return compute_stats(session, by=by, rule=RULE, model=model, holdouts=self.holdouts)

    def read_precision(self, model: str) -> list[BandRow]:
        """`stats model` for one world's model, at the default bands (its precision_log's)."""
        with Session(self.pipeline.engine) as session:
            return compute_model_precision(session, model=model, edges=DEFAULT_BAND_EDGES)

    async def run(self, timeout: float) -> None:
        self._schedule_results()
        for day in range(self.total_days):
            await self._tick(day, timeout)


def _rejections(engine: Engine, stream: str) -> dict[str, dict[str, int]]:
    """model -> reason -> count, of the predictions the gate rejected."""
    with Session(engine) as session:
        rows = session.execute(
            select(RejectionRecord.model, RejectionRecord.reason, func.count())
            .where(RejectionRecord.source_stream == stream)
            .group_by(RejectionRecord.model, RejectionRecord.reason)
            .order_by(RejectionRecord.reason)
        ).all()
    found: dict[str, dict[str, int]] = {}
    for model, reason, n in rows:
        found.setdefault(model or "", {})[reason] = n
    return found


async def _cleanup(url: str, prefix: str, *, cluster: bool) -> None:
    redis = redis_from_url(url, cluster=cluster)
    try:
        # On a cluster, SCAN runs on every primary, and DELETE goes per slot (all keys share the prefix's).
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 500):
            await redis.delete(*keys[i:i + 500])
    finally:
        await redis.aclose()


@contextlib.asynccontextmanager
async def embedded_or(redis_url: str | None, host: str = "127.0.0.1") -> AsyncIterator[tuple[str, bool]]:
    """(url, embedded): the given Redis, or an embedded fakeredis on a free loopback port for the duration."""
    if redis_url is not None:
        yield redis_url, False
        return
    embedded = EmbeddedRedis(host, 0).start()
    try:
        yield embedded.url, True
    finally:
        embedded.stop()


def _distinct_models(worlds: Sequence[SimulationParams]) -> list[SimulationParams]:
    """Several worlds in one run: model `churn` becomes `churn-s<seed>`, so each world's stats
    can be read apart (a single world keeps its name)."""
    if len(worlds) == 1 or len({w.model for w in worlds}) == len(worlds):
        return list(worlds)
    return [replace(w, model=f"{w.model}-s{w.seed}") for w in worlds]


async def run_simulations(
    worlds: Sequence[SimulationParams],
    *,
    settings: Settings | None = None,
    redis_url: str | None = None,
    database_url: str | None = None,
    stream_prefix: str | None = None,
    start: datetime | None = None,
    read_every_day: bool = True,
    check_drift: bool = True,
    on_day: Callable[[int, datetime], None] | None = None,
    on_start: Callable[[str, str], None] | None = None,
    timeout: float = 120.0,
    processes: int = 1,
) -> list[SimulationResult]:
    """Run worlds through the real service, side by side; per world, the truth beside what
    the stats report (in the order given).

    redis_url: the Redis to use (streams under a fresh prefix, removed afterwards); None: an
    embedded fakeredis for the run. database_url: the store, kept afterwards; None: SQLite in
    a temporary directory, removed afterwards. start: the first simulated day at 08:00 UTC
    (default: so that the last simulated day is today). read_every_day: read the stats after
    every day (`days[i].stats`), not only after the last. check_drift: run the data-quality
    monitor after every day. on_start(redis_url, prefix) and on_day(day, now): progress hooks.
    processes > 1 splits the worlds over that many processes, each with its own service and
    store (the pipeline is CPU-bound Python: this is how a run uses more than one core);
    each world's numbers are the same whichever way they are split.
    """
    if not worlds:
        return []
    worlds = _distinct_models(worlds)
    _shared(worlds)
    start = start or default_start(max(w.total_days for w in worlds))
    if processes > 1 and len(worlds) > 1:
        if on_day is not None or on_start is not None or database_url is not None:
            raise ValueError(
                "processes > 1 cannot take progress hooks or a database_url (each process has its own store)"
            )
        chunks = [list(range(i, len(worlds), processes)) for i in range(min(processes, len(worlds)))]
        options = {
            "settings": settings, "redis_url": redis_url, "start": start, "read_every_day": read_every_day,
            "check_drift": check_drift, "timeout": timeout,
        }
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(max_workers=len(chunks), mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        pool, _run_chunk, [worlds[i] for i in chunk],
                        {**options, "stream_prefix": f"{stream_prefix}p{n}:" if stream_prefix else None},
                    )
                    for n, chunk in enumerate(chunks)
                )
            )
        ordered: list[SimulationResult | None] = [None] * len(worlds)
        for chunk, part in zip(chunks, parts, strict=True):
            for i, result in zip(chunk, part, strict=True):
                ordered[i] = result
        return [r for r in ordered if r is not None]
    return await _run_together(
        worlds, settings=settings, redis_url=redis_url, database_url=database_url, stream_prefix=stream_prefix,
        start=start, read_every_day=read_every_day, check_drift=check_drift, on_day=on_day, on_start=on_start,
        timeout=timeout,
    )


def _fresh_prefix(cluster: bool) -> str:
    name = f"sim-{uuid.uuid4().hex[:10]}"
    return f"{{{name}}}:" if cluster else f"{name}:"


def _run_chunk(worlds: list[SimulationParams], options: dict[str, Any]) -> list[SimulationResult]:
    """In a worker process: one service for these worlds."""
    return asyncio.run(_run_together(worlds, **options))


async def _run_together(
    worlds: Sequence[SimulationParams],
    *,
    settings: Settings | None,
    redis_url: str | None,
    database_url: str | None = None,
    stream_prefix: str | None,
    start: datetime,
    read_every_day: bool,
    check_drift: bool,
    on_day: Callable[[int, datetime], None] | None = None,
    on_start: Callable[[str, str], None] | None = None,
    timeout: float,
) -> list[SimulationResult]:
    began = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="decision-router-sim-"))
    base = settings or Settings()
    # Only a configured Redis can be a cluster (the embedded one never is); its keys then share one slot.
    cluster = base.redis_cluster and redis_url is not None
    prefix = stream_prefix if stream_prefix is not None else _fresh_prefix(cluster)
    if cluster and hash_tag(prefix) is None:
        raise ValueError(f"on a Redis Cluster the stream prefix needs a hash tag, e.g. '{{sim}}:', not {prefix!r}")
    store_url = database_url or f"sqlite:///{scratch / 'store.db'}"
    try:
        ruleset = write_rules(scratch / "rules", worlds)
        engine = make_engine(store_url)
        try:
            create_schema(engine)
            check_writable(engine)
            async with embedded_or(redis_url, base.embedded_host) as (url, embedded):
                run_settings = base.model_copy(
                    update={
                        "redis_url": url,
                        "redis_cluster": cluster,
                        "database_url": store_url,
                        "rules_dir": scratch / "rules",
                        "stream_prefix": prefix,
                        "consumer_name": f"sim-worker-{uuid.uuid4().hex[:6]}",
                        "batch_size": 500,
                        "claim_idle": timedelta(hours=1),
                        # The simulator sweeps and checks drift itself, once per simulated day.
                        "sweep_interval": timedelta(days=365),
                        "drift_interval": timedelta(0),
                        "rules_poll_interval": timedelta(0),
                        "max_prediction_age": timedelta(days=1),
                        "outcome_window": timedelta(days=30),
                        # The simulated owners have an inbox only: the environment's mail server is not this
                        # run's (a password file it cannot read stopped `demo` with a traceback).
                        "smtp_host": None,
                    }
                )
                if on_start is not None:
                    on_start(url, prefix)
                clock = SimClock(start)
                states = [_World(w, start) for w in worlds]
                try:
                    async with running_service(run_settings, ruleset, engine, clock=clock) as service:
                        run = _Run(states, service, ruleset, clock, start, read_every_day=read_every_day,
                                   check_drift=check_drift, on_day=on_day)
                        await run.run(timeout)
                        by_owner = {
                            w.params.model: await asyncio.to_thread(run.read_stats, "owner", w.params.model)
                            for w in states
                        }
                        precision = {
                            w.params.model: await asyncio.to_thread(run.read_precision, w.params.model)
                            for w in states
                        }
                finally:
                    if not embedded:
                        await _cleanup(url, prefix, cluster=cluster)
            rejected = _rejections(engine, Keys(prefix).predictions)
        finally:
            engine.dispose()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.monotonic() - began
    results = []
    for world in states:
        params = world.params
        readings = world.readings
        results.append(
            SimulationResult(
                params=params,
                truth=compute_truth(params),
                tally=world.tally(),
                owners=owner_truths(list(world.alerts.values()), params.owners),
                alerts=list(world.alerts.values()),
                outcomes=world.outcomes,
                measured=readings[-1].stats if readings else None,
                measured_by_owner=by_owner[params.model],
                days=readings,
                rejected=rejected.get(params.model, {}),
                drift_detected_day=next((d.day for d in readings if "score" in d.flagged), None),
                flagged_days=[d.day for d in readings if d.flagged],
                drift_checked=run.monitor is not None,
                database_url=database_url,
                stream_prefix=prefix,
                elapsed_s=elapsed,
                precision_log=world.precision_log(DEFAULT_BAND_EDGES),
                measured_precision=precision[params.model],
            )
        )
    return results


async def run_simulation(params: SimulationParams | None = None, **kwargs: Any) -> SimulationResult:
    """One world through the real service (see `run_simulations` for the options)."""
    (result,) = await run_simulations([params or SimulationParams()], **kwargs)
    return result


def simulate(params: SimulationParams | None = None, **kwargs: Any) -> SimulationResult:
    """Synchronous `run_simulation`, for scripts (not from inside a running event loop)."""
    return asyncio.run(run_simulation(params, **kwargs))


def seeded(params: SimulationParams, seeds: Sequence[int]) -> list[SimulationParams]:
    """The same world with different seeds."""
    return [replace(params, seed=s) for s in seeds]

"""Quietly wrong models: has what a model sees or says drifted, or has its data got worse?

Per model and model version, the score distribution and every numeric feature
(`features.<name>` values that are numbers) of a recent window (default: the last day) are
compared with a reference window (default: the first `reference_days` of that version's
stored predictions, or a pinned `baseline_version`'s) by population stability index,
against the sample-size aware threshold of `decision_router.drift`; a prediction without a
feature's number counts in a "missing" bin, so a feature that goes missing is drift. A
feature whose values are text (and never numbers) is compared the same way over its most
common categories plus "other" (`drift.category_drift_check`). The missing-context rate
(per version) and the rejection rate (per model: rejections carry no version) are tested for
a jump with Fisher's exact test. Nothing is judged on fewer than `min_samples` values per
window: such a figure is reported with `flagged=None`, "not enough data".

`assess_models` does the reading and the maths, nothing else. `DataQualityMonitor` runs it
periodically in every worker, stores a `DataQualityAlert` for each flagged figure (one per
model, version, metric and day, however many workers and checks find it) and delivers it to
the model's owner (`models:` in routing.yaml) with the figures: to their inbox stream, and
through the channel outbox (notify.py) to their webhook and email channels, like any alert.
Definitions and how to read them: docs/rules.md#models and docs/statistics.md#drift.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from decision_router import drift
from decision_router.audit import iso
from decision_router.contracts import DataQualityAlert, DataQualityWindow
from decision_router.keys import Keys
from decision_router.notify import queue_deliveries
from decision_router.router import present_owner
from decision_router.rules import DriftConfig, ModelConfig
from decision_router.streams import StreamWrite, xadd_once
from decision_router.tables import AlertRecord, DataQualityAlertRecord, PredictionRecord, RejectionRecord, as_utc

if TYPE_CHECKING:
    from decision_router.pipeline import Pipeline
    from decision_router.rules import RuleSet

log = structlog.get_logger("decision_router.monitor")

SCORE = "score"
FEATURE = "feature:"  # metric prefix: "feature:<name>"
REJECTION_RATE = "rejection_rate"
MISSING_CONTEXT_RATE = "missing_context_rate"
ALL_VERSIONS = "*"  # model_version of model-level figures (rejections carry no version)
BINS = 10
# Values read per window at most: the earliest of a reference, the latest of a recent window.
# The PSI threshold accounts for the sizes actually used, so a cap costs power, not validity.
MAX_SAMPLES = drift.PSI_MAX_N
DEFAULT_DRIFT = DriftConfig()


@dataclass(frozen=True)
class Window:
    """Reference [reference_from, reference_to) of `reference_version`, recent [recent_from, recent_to]."""

    reference_version: str
    reference_from: datetime | None
    reference_to: datetime | None
    recent_from: datetime
    recent_to: datetime


@dataclass(frozen=True)
class ModelHealth:
    """One figure of one model version. `flagged` is None when the data cannot tell ("not
    enough data"); `detail` says why, or gives the figures in words."""

    model: str
    model_version: str  # ALL_VERSIONS ("*") for rejection_rate
    metric: str  # score | feature:<name> | rejection_rate | missing_context_rate
    value: float | None  # PSI (score, features) or the recent rate (rates)
    threshold: float | None  # PSI above which it is flagged; for rates the lowest flagged recent rate
    n_reference: int
    n_recent: int
    flagged: bool | None
    detail: str
    window: Window
    reference_value: float | None = None  # rates: the reference rate
    p_value: float | None = None  # rates: one-sided Fisher p-value of a higher recent rate
    alpha: float | None = None  # false-alarm rate this figure was tested at
    note: str = ""  # the part of `detail` a table shows beside the numbers (means, counts, or why not judged)

    @property
    def status(self) -> str:
        return "not enough data" if self.flagged is None else ("flagged" if self.flagged else "ok")

    def as_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["window"] = {k: iso(v) if isinstance(v, datetime) else v for k, v in document["window"].items()}
        document["status"] = self.status
        return document


def _config(models: Mapping[str, ModelConfig], model: str) -> DriftConfig:
    return models[model].drift if model in models else DEFAULT_DRIFT


def assess_models(
    session: Session,
    *,
    now: datetime,
    ruleset_models: Mapping[str, ModelConfig] | None = None,
    only: Collection[str] | None = None,
    bins: int = BINS,
    max_samples: int = MAX_SAMPLES,
) -> list[ModelHealth]:
    """Every figure of every model (or those in `only`) with predictions or rejections in
    its recent window, at `now`. Read-only.

    `ruleset_models` is `RuleSet.models` (per-model drift settings); a model not in it gets
    the defaults of `DriftConfig`. Per model: its rejection rate first, then per version
    (sorted) score, features (sorted by name) and missing-context rate.
    """
    models = ruleset_models or {}
    longest = max([DEFAULT_DRIFT.recent, *(m.drift.recent for m in models.values())])
    since = now - longest
    pairs = session.execute(
        select(PredictionRecord.model, PredictionRecord.model_version)
        .where(PredictionRecord.received_at >= since, PredictionRecord.received_at <= now)
        .distinct()
    ).all()
    rejecting = session.scalars(
        select(RejectionRecord.model)
        .where(RejectionRecord.model.is_not(None), RejectionRecord.at >= since, RejectionRecord.at <= now)
        .distinct()
    ).all()
    names = sorted({m for m, _ in pairs} | {m for m in rejecting if m is not None})
    results: list[ModelHealth] = []
    for model in names:
        if only is not None and model not in only:
            continue
        config = _config(models, model)
        results.extend(_rejection_rate(session, model, config, now))
        for version in sorted(v for m, v in pairs if m == model):
            results.extend(_version_health(session, model, version, config, now, bins, max_samples))
    return results


# --- per model version: distributions and the missing-context rate ------------------------


def _rows(
    session: Session, model: str, version: str, *, after: datetime, until: datetime, recent: bool, limit: int
) -> list[tuple[float, dict[str, Any]]]:
    """(score, document) of a window: recent is [after, until], a reference [after, until)."""
    received = PredictionRecord.received_at
    where = [PredictionRecord.model == model, PredictionRecord.model_version == version]
    where += _span(received, after, until, recent=recent)
    order = received.desc() if recent else received.asc()
    query = select(PredictionRecord.score, PredictionRecord.document).where(*where).order_by(order).limit(limit)
    return [(score, document) for score, document in session.execute(query)]


def _is_value(value: Any) -> bool:
    """A number a PSI can use: not a bool, not NaN or infinite (JSON from Python may hold NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


Sample = Sequence[tuple[float, dict[str, Any]]]


def _features(document: Mapping[str, Any]) -> Mapping[str, Any]:
    features = document.get("features")
    return features if isinstance(features, Mapping) else {}


def _numeric_features(*samples: Sample) -> list[str]:
    names = {name for sample in samples for _, doc in sample for name, v in _features(doc).items() if _is_value(v)}
    return sorted(names)


def _categorical_features(numeric: Collection[str], *samples: Sample) -> list[str]:
    """Features with text values and no number in either window: a feature that was numeric
    and turns to text stays numeric, where the text counts as missing (a feature gone wrong)."""
    names = {name for sample in samples for _, doc in sample for name, v in _features(doc).items() if isinstance(v, str)}
    return sorted(names - set(numeric))


def _values(sample: Sample, name: str) -> list[float]:
    return [float(v) for _, doc in sample if _is_value(v := _features(doc).get(name))]


def _categories(sample: Sample, name: str) -> list[str]:
    return [v for _, doc in sample if isinstance(v := _features(doc).get(name), str)]


def _largest_change(reference: Sequence[str], recent: Sequence[str]) -> str:
    """The category whose share of values moved most, in words (text from the producer, cut short)."""
    if not reference or not recent:
        return f"{len(set(recent))} categories recent, {len(set(reference))} reference"
    ref, rec = Counter(reference), Counter(recent)
    category = max(ref.keys() | rec.keys(), key=lambda c: (abs(rec[c] / len(recent) - ref[c] / len(reference)), c))
    shown = category if len(category) <= 40 else category[:39] + "…"
    return f"{shown!r} {rec[category] / len(recent):.1%} of recent values, {ref[category] / len(reference):.1%} of reference"


def _mean(values: Sequence[float]) -> str:
    # Each value divided first: a sum of values near the float maximum would overflow to inf.
    return f"{sum(v / len(values) for v in values):.3g}" if values else "n/a"


def _missing_share(missing: int, n: int) -> str:
    return f"{missing / n:.1%}" if n else "-"


@dataclass(frozen=True)
class _Judge:
    """What every figure of one model version (or of one model) is judged with."""

    model: str
    version: str
    config: DriftConfig
    alpha: float  # per figure
    window: Window
    no_reference: str | None = None  # why there is no reference at all, if there is none

    def not_enough(self, n_reference: int, n_recent: int, what: str) -> str:
        """Why a figure is not judged, without the "not enough data: " that precedes it in `detail`."""
        if self.no_reference:
            return self.no_reference
        return (
            f"{n_reference} reference and {n_recent} recent {what}; "
            f"at least {self.config.min_samples} in each are needed (drift.min_samples)"
        )

    def psi(
        self, metric: str, reference: Sequence[Any], recent: Sequence[Any], bins: int,
        missing: tuple[int, int] = (0, 0), *, categories: bool = False,
    ) -> ModelHealth:
        """`missing`: predictions of each window without the value (a feature absent or not a
        number, or not text for `categories`: values that are strings, not numbers)."""
        min_n = self.config.min_samples
        check = drift.category_drift_check if categories else drift.drift_check
        result = check(
            reference, recent, bins, self.alpha, min_n=min_n, reference_missing=missing[0], recent_missing=missing[1]
        )
        n_ref, n_rec = result.n_reference, result.n_recent
        if result.drifted is None:  # a window below min_samples (drift_check judges any other)
            note = self.not_enough(n_ref, n_rec, "predictions" if any(missing) else "values")
            detail = f"not enough data: {note}"
        else:
            note = _largest_change(reference, recent) if categories else f"mean {_mean(recent)} recent, {_mean(reference)} reference"
            if any(missing):
                note += (
                    f"; missing from {_missing_share(missing[1], n_rec)} of recent predictions, "
                    f"{_missing_share(missing[0], n_ref)} of reference"
                )
            detail = (
                f"PSI {result.psi:.4f} {'above' if result.drifted else 'within'} its threshold {result.threshold:.4f} "
                f"(n = {n_ref} reference, {n_rec} recent; {result.bins} bins; false-alarm rate {self.alpha:.2g}); "
                + note
            )
        return ModelHealth(
            self.model, self.version, metric, result.psi, result.threshold, n_ref, n_rec, result.drifted, detail,
            self.window, alpha=self.alpha, note=note,
        )

    def rate(self, metric: str, counts: tuple[int, int, int, int], units: str, extra: str = "") -> ModelHealth:
        """counts: (reference events, reference units, recent events, recent units)."""
        ref_events, ref_n, rec_events, rec_n = counts
        min_n, alpha = self.config.min_samples, self.alpha
        p_value = drift.rate_jump_p_value(ref_events, ref_n, rec_events, rec_n, min_n=min_n)
        flagged = drift.rate_jump(ref_events, ref_n, rec_events, rec_n, alpha, min_n=min_n)
        value = rec_events / rec_n if rec_n else None
        reference_value = ref_events / ref_n if ref_n else None
        threshold = _critical_rate(ref_events, ref_n, rec_n, alpha, min_n) if p_value is not None else None
        rates = f"{rec_events} of {rec_n} recent {units}" + (f" ({value:.2%})" if value is not None else "")
        rates += f", {ref_events} of {ref_n} in the reference"
        rates += f" ({reference_value:.2%})" if reference_value is not None else ""
        if flagged is None:
            note = self.not_enough(ref_n, rec_n, units) + (f"; {rates}" if ref_n or rec_n else "")
            detail = f"not enough data: {note}"
        else:
            note = rates
            limit = f"flagged from {threshold:.2%}" if threshold is not None else "no rate is flagged at this size"
            detail = (
                f"{'jumped' if flagged else 'no jump'}: {rates}; {limit} "
                f"(one-sided Fisher p = {p_value:.2g}, false-alarm rate {alpha:.2g})"
            )
        return ModelHealth(
            self.model, self.version, metric, value, threshold, ref_n, rec_n, flagged, detail + extra, self.window,
            reference_value=reference_value, p_value=p_value, alpha=alpha, note=note + extra,
        )


def _critical_rate(reference_events: int, reference_n: int, recent_n: int, alpha: float, min_n: int) -> float | None:
    """The lowest recent rate that `drift.rate_jump` flags (None: not even 100% is)."""

    def p(k: int) -> float:
        value = drift.rate_jump_p_value(reference_events, reference_n, k, recent_n, min_n=min_n)
        assert value is not None
        return value

    if p(recent_n) >= alpha:
        return None
    low, high = 0, recent_n  # p(k) falls as k grows: find the first k with p(k) < alpha
    while low < high:
        mid = (low + high) // 2
        if p(mid) < alpha:
            high = mid
        else:
            low = mid + 1
    return low / recent_n


def _missing_context(
    session: Session, model: str, version: str, *, after: datetime, until: datetime, recent: bool
) -> tuple[int, int]:
    """(predictions with a decision missing some context field, predictions with decisions)."""
    where = [AlertRecord.model == model, AlertRecord.model_version == version]
    where += _span(AlertRecord.created_at, after, until, recent=recent)
    missing: dict[str, bool] = {}
    rows = session.execute(select(AlertRecord.prediction_id, AlertRecord.missing_context).where(*where))
    for prediction_id, fields in rows:
        missing[prediction_id] = missing.get(prediction_id, False) or bool(fields)
    return sum(missing.values()), len(missing)


def _version_health(
    session: Session, model: str, version: str, config: DriftConfig, now: datetime, bins: int, max_samples: int
) -> list[ModelHealth]:
    recent_from = now - config.recent
    recent = _rows(session, model, version, after=recent_from, until=now, recent=True, limit=max_samples)
    if not recent:
        return []  # seen within another model's longer window, not in this one's
    reference_version = config.baseline_version or version
    first = as_utc(
        session.scalar(
            select(func.min(PredictionRecord.received_at)).where(
                PredictionRecord.model == model, PredictionRecord.model_version == reference_version
            )
        )
    )
    reference: Sample = []
    no_reference: str | None = None
    reference_to: datetime | None = None
    if first is None:
        no_reference = f"baseline version {reference_version} has no stored predictions"
    else:
        reference_to = first + timedelta(days=config.reference_days)
        if reference_version == version:
            reference_to = min(reference_to, recent_from)  # the reference never overlaps the recent window
        if reference_to <= first:
            no_reference = (
                f"version {version} was first seen {first.isoformat(timespec='seconds').replace('+00:00', 'Z')}, "
                "within the recent window, "
                "so it has no reference period yet"
            )
            reference_to = None
        else:
            reference = _rows(
                session, model, reference_version, after=first, until=reference_to, recent=False, limit=max_samples
            )
    features = _numeric_features(reference, recent)
    categorical = _categorical_features(features, reference, recent)
    judge = _Judge(
        model, version, config,
        # Bonferroni: `alpha` is the false-alarm rate of the whole version per check, not of each figure.
        alpha=config.alpha / (2 + len(features) + len(categorical)),
        window=Window(reference_version, first if reference_to else None, reference_to, recent_from, now),
        no_reference=no_reference,
    )
    results = [judge.psi(SCORE, [score for score, _ in reference], [score for score, _ in recent], bins)]
    for name in sorted([*features, *categorical]):
        text = name in categorical
        read = _categories if text else _values
        ref_values, rec_values = read(reference, name), read(recent, name)
        missing = (len(reference) - len(ref_values), len(recent) - len(rec_values))
        results.append(judge.psi(FEATURE + name, ref_values, rec_values, bins, missing, categories=text))
    ref_counts = (0, 0)
    if first is not None and reference_to is not None:
        ref_counts = _missing_context(session, model, reference_version, after=first, until=reference_to, recent=False)
    rec_counts = _missing_context(session, model, version, after=recent_from, until=now, recent=True)
    # Counted over predictions with a decision (those whose context was read), not all of them:
    # "0 recent predictions" beside a score figure of 300 would read as a contradiction.
    results.append(judge.rate(MISSING_CONTEXT_RATE, (*ref_counts, *rec_counts), "predictions with a decision"))
    return results


# --- per model: the rejection rate --------------------------------------------------------


def _span(column: Any, after: datetime, until: datetime, *, recent: bool) -> list[Any]:
    """[after, until] for a recent window, [after, until) for a reference."""
    return [column >= after, column <= until] if recent else [column >= after, column < until]


def _count_accepted(session: Session, model: str, after: datetime, until: datetime, *, recent: bool) -> int:
    where = [PredictionRecord.model == model, *_span(PredictionRecord.received_at, after, until, recent=recent)]
    return session.scalar(select(func.count()).select_from(PredictionRecord).where(*where)) or 0


def _rejections(session: Session, model: str, after: datetime, until: datetime, *, recent: bool) -> Counter[str]:
    where = [RejectionRecord.model == model, *_span(RejectionRecord.at, after, until, recent=recent)]
    rows = session.execute(select(RejectionRecord.reason, func.count()).where(*where).group_by(RejectionRecord.reason))
    return Counter({reason: n for reason, n in rows})


def _rejection_rate(session: Session, model: str, config: DriftConfig, now: datetime) -> list[ModelHealth]:
    """Rejected / (rejected + accepted), recent window against the `reference_days` before it.

    A trailing reference rather than a version's first days: rejections carry no version,
    and what they measure (the producer's data) is not tied to one.
    """
    recent_from = now - config.recent
    reference_from = recent_from - timedelta(days=config.reference_days)
    recent = _rejections(session, model, recent_from, now, recent=True)
    rec_n = sum(recent.values()) + _count_accepted(session, model, recent_from, now, recent=True)
    if rec_n == 0:
        return []
    reference = _rejections(session, model, reference_from, recent_from, recent=False)
    ref_n = sum(reference.values()) + _count_accepted(session, model, reference_from, recent_from, recent=False)
    window = Window(ALL_VERSIONS, reference_from, recent_from, recent_from, now)
    judge = _Judge(model, ALL_VERSIONS, config, config.alpha, window)
    reasons = ", ".join(f"{reason} {n}" for reason, n in recent.most_common())
    counts = (sum(reference.values()), ref_n, sum(recent.values()), rec_n)
    extra = f"; recent rejections by reason: {reasons}" if reasons else ""
    return [judge.rate(REJECTION_RATE, counts, "inputs", extra)]


# --- alerts to the model's owner ----------------------------------------------------------


def data_quality_alert_id(model: str, model_version: str, metric: str, day: str) -> str:
    """Deterministic: every worker and every check of the same day finds the same alert."""
    digest = hashlib.sha256(f"{model}\0{model_version}\0{metric}\0{day}".encode()).hexdigest()
    return f"dq-{digest[:24]}"


def to_alert(record: DataQualityAlertRecord) -> DataQualityAlert:
    return DataQualityAlert(
        alert_id=record.alert_id,
        model=record.model,
        model_version=record.model_version,
        metric=record.metric,
        value=record.value,
        threshold=record.threshold,
        reference_value=record.reference_value,
        p_value=record.p_value,
        alpha=record.alpha,
        n_reference=record.n_reference,
        n_recent=record.n_recent,
        window=DataQualityWindow.model_validate(record.window),
        owner=record.owner,
        created_at=as_utc(record.created_at),
        detail=record.detail,
    )


def inbox_write(alert: DataQualityAlert, keys: Keys) -> StreamWrite:
    assert alert.owner is not None
    return StreamWrite(
        stream=keys.inbox(alert.owner),
        fields={"kind": alert.kind, "data": alert.model_dump_json()},
        dedupe_key=keys.dedupe(f"data-quality:{alert.alert_id}:{alert.owner}"),
    )


class DataQualityMonitor:
    """Runs in every worker (`RouterService`, every DECISION_ROUTER_DRIFT_INTERVAL); safe to
    run concurrently: alerts are stored once by their deterministic id (with their webhook
    and email outbox rows) and written to the inbox once by their dedupe marker."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self._warned_unowned: set[str] = set()

    async def check_once(self) -> list[ModelHealth]:
        """Assess every model now; store and deliver an alert per newly flagged figure."""
        health = await asyncio.to_thread(self._check)
        await self.deliver()
        if self.pipeline.channels is not None:
            await self.pipeline.channels.pump()  # the webhook and email rows queued with the alerts
        return health

    def _check(self) -> list[ModelHealth]:
        now = self.pipeline.clock()
        ruleset = self.pipeline.ruleset  # one rule set per check, even across a hot reload
        with Session(self.pipeline.engine) as session:
            health = assess_models(session, now=now, ruleset_models=ruleset.models)
        flagged = [h for h in health if h.flagged]
        if flagged:
            try:
                new = self._store(flagged, ruleset, now)
            except IntegrityError:
                # Another worker stored one of these first; the second pass sees its row.
                new = self._store(flagged, ruleset, now)
            for record in new:
                log.warning(
                    "data-quality alert", model=record.model, model_version=record.model_version, metric=record.metric,
                    value=record.value, threshold=record.threshold, owner=record.owner, alert_id=record.alert_id,
                )
        log.info(
            "data quality checked", figures=len(health), flagged=len(flagged),
            not_enough_data=sum(1 for h in health if h.flagged is None),
        )
        return health

    def _owner(self, model: str, ruleset: RuleSet, now: datetime) -> str | None:
        owner = ruleset.model_owners.get(model)
        if owner is None:
            if model not in self._warned_unowned:
                self._warned_unowned.add(model)
                log.warning(
                    "model has no owner in routing.yaml models:; its data-quality alerts are stored, not delivered",
                    model=model,
                )
            return None
        return present_owner(owner, ruleset.owners, now)

    def _store(self, flagged: Sequence[ModelHealth], ruleset: RuleSet, now: datetime) -> list[DataQualityAlertRecord]:
        """Insert the alerts not stored yet (by alert_id), and in the same transaction the
        channel outbox rows of each one that has an owner; returns the new ones, and those
        stored today without an owner that this call gave one (the model's owner was added
        since): the figure is still flagged, so it is delivered today, once."""
        day = now.date().isoformat()
        records: dict[str, DataQualityAlertRecord] = {}
        for h in flagged:
            alert_id = data_quality_alert_id(h.model, h.model_version, h.metric, day)
            records[alert_id] = DataQualityAlertRecord(
                alert_id=alert_id,
                day=day,
                model=h.model,
                model_version=h.model_version,
                metric=h.metric,
                value=h.value,
                threshold=h.threshold,
                reference_value=h.reference_value,
                p_value=h.p_value,
                alpha=h.alpha,
                n_reference=h.n_reference,
                n_recent=h.n_recent,
                window=DataQualityWindow(**asdict(h.window)).model_dump(mode="json"),
                owner=self._owner(h.model, ruleset, now),
                detail=h.detail,
                created_at=now,
            )
        with Session(self.pipeline.engine, expire_on_commit=False) as session:
            known = set(
                session.scalars(
                    select(DataQualityAlertRecord.alert_id).where(DataQualityAlertRecord.alert_id.in_(list(records)))
                )
            )
            new = [record for alert_id, record in records.items() if alert_id not in known]
            session.add_all(new)
            # In `records` order (the figures'), the same in every worker: two never lock rows in opposite orders.
            owned = [self._adopt(session, r) for alert_id, r in records.items() if alert_id in known and r.owner is not None]
            new += [record for record in owned if record is not None]
            channels = self.pipeline.channels
            if channels is not None:
                for record in new:
                    if record.owner is not None:
                        queue_deliveries(
                            session, alert=to_alert(record), recipient=record.owner,
                            channels=channels.channels_for(record.owner), now=now,
                        )
            session.commit()
        return new

    @staticmethod
    def _adopt(session: Session, record: DataQualityAlertRecord) -> DataQualityAlertRecord | None:
        """Give a stored alert without an owner `record`'s owner; the stored alert (with its
        first figures) if this call did. Only one of several workers' updates changes the row
        (PostgreSQL re-reads it after the other's commit; SQLite runs one writer at a time), so
        only that one queues its deliveries."""
        changed = session.execute(
            update(DataQualityAlertRecord)
            .where(DataQualityAlertRecord.alert_id == record.alert_id, DataQualityAlertRecord.owner.is_(None))
            .values(owner=record.owner)
            .execution_options(synchronize_session=False)
        ).rowcount
        return session.get(DataQualityAlertRecord, record.alert_id) if changed else None

    async def deliver(self) -> int:
        """The outbox: stored alerts with an owner, not yet written to the owner's inbox."""
        delivered = 0
        while True:
            pending = await asyncio.to_thread(self._pending)
            if not pending:
                return delivered
            writes = [inbox_write(alert, self.pipeline.keys) for alert in pending]
            settings = self.pipeline.settings
            await xadd_once(self.pipeline.redis, writes, ttl=settings.dedupe_ttl, wait=settings.replica_wait)
            await asyncio.to_thread(self._mark_delivered, [a.alert_id for a in pending])
            delivered += len(pending)

    def _pending(self, limit: int = 500) -> list[DataQualityAlert]:
        with Session(self.pipeline.engine) as session:
            rows = session.scalars(
                select(DataQualityAlertRecord)
                .where(DataQualityAlertRecord.delivered_at.is_(None), DataQualityAlertRecord.owner.is_not(None))
                .order_by(DataQualityAlertRecord.created_at, DataQualityAlertRecord.alert_id)
                .limit(limit)
            )
            return [to_alert(row) for row in rows]

    def _mark_delivered(self, alert_ids: list[str]) -> None:
        with Session(self.pipeline.engine) as session:
            session.execute(
                update(DataQualityAlertRecord)
                .where(DataQualityAlertRecord.alert_id.in_(alert_ids), DataQualityAlertRecord.delivered_at.is_(None))
                .values(delivered_at=self.pipeline.clock())
                .execution_options(synchronize_session=False)
            )
            session.commit()

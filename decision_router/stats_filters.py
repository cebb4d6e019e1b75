"""Whether a stats filter that selected nothing is a typo: the check `decision-router stats` (--rule, --owner,
--model, and `stats quality/model/drift --model`) and the API's `/v1/stats` and `/v1/stats/quality` make of
an empty result. One place, so the CLI and the API cannot drift apart on what is an error and what it says.

A name is a typo when neither the rules nor the store know it: a rule since removed that still has alerts,
or a model the store has seen with nothing in the window, is no error. Asked only of an empty result.

An owner token's stats are its own decisions, so its filters are checked against those alone (unknown_to_owner):
a name on no alert of its own is the error, whether or not the rules or other owners' alerts know it, and the
close match is one of its own: the 422 tells it nothing an unfiltered `/v1/stats?by=rule` (`by=model`) does not.

Each check returns an `Unknown`: the parameter's bare name (`rule`) and the message, which starts with it as
the CLI names it (`prefix`: `--` for `--rule: ...`; None for the API, whose error names it in its `loc`). `rules_dir`
is said in the message where the CLI reads the rules; the API passes None: a client is not told the server's
paths. Light at import (the CLI imports it before any command runs): SQLAlchemy and stats.py are imported
inside the checks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from decision_router.echo import did_you_mean

if TYPE_CHECKING:
    from decision_router.rules import RuleSet


class Unknown(NamedTuple):
    """A filter no one knows: `parameter` is its bare name (rule, owner, model), `message` the whole error."""

    parameter: str
    message: str


def _head(prefix: str | None, name: str) -> str:
    """`--rule: ` for the CLI; nothing for the API, whose error names the parameter in its `loc`."""
    return f"{prefix}{name}: " if prefix is not None else ""


def _at(rules_dir: Path | None) -> str:
    return f" ({rules_dir})" if rules_dir is not None else ""


def unknown_rule_or_owner(
    session: Any,
    rules: Callable[[], RuleSet | None],
    *,
    rule: str | None,
    owner: str | None,
    rules_dir: Path | None,
    prefix: str | None,
) -> Unknown | None:
    """Why an empty result is a typo: `rule` or `owner` names no rule (owner) of the rules and no alert in the
    store (a rule since removed still has its alerts). None when both are known, or when the rules do not
    load (the CLI has warned). `rules`: called once, only when there is a name to check."""
    if rule is None and owner is None:
        return None
    from sqlalchemy import select

    from decision_router.tables import AlertRecord

    ruleset = rules()
    if ruleset is None:
        return None
    checks = (
        ("rule", rule, "the rules", [r.name for r in ruleset.rules], AlertRecord.rule),
        ("owner", owner, "the owner directory", list(ruleset.owners), AlertRecord.owner),
    )
    for name, value, where, known, column in checks:
        if value is None or value in known:
            continue
        if session.execute(select(column).where(column == value).limit(1)).first() is None:
            return Unknown(name, f"{_head(prefix, name)}{name} '{value}' is not in {where}{_at(rules_dir)}, and the "
                                 f"store has no alerts for it{did_you_mean(value, known)}")
    return None


def unknown_model(
    session: Any,
    model: str | None,
    rules: Callable[[], RuleSet | None],
    *,
    rules_dir: Path | None,
    prefix: str | None,
) -> Unknown | None:
    """Why an empty result is a typo: no prediction, decision or rejection in the store names `model`, nor do
    the rules (a model the store or the rules know, with nothing in the window, is no error: a new model
    before its first prediction, say). A lookup in each table's model index, then the rules, and the walk of
    the store's names for the hint. `rules`: called only for a model the store has not seen."""
    if model is None:
        return None
    from decision_router.stats import model_seen, models_seen

    if model_seen(session, model):
        return None
    return unseen_model(model, models_seen(session), rules(), rules_dir=rules_dir, prefix=prefix)


def unseen_model(
    model: str, stored: list[str], ruleset: RuleSet | None, *, rules_dir: Path | None, prefix: str | None
) -> Unknown | None:
    """The error for a `model` the store has never seen (`stored`: the models it has seen), or None when the
    rules (None: they do not load) name it: their `models:` section or a rule's model condition."""
    named: set[str] = set()
    if ruleset is not None:
        named = {*ruleset.models, *ruleset.model_owners, *(m for r in ruleset.rules if r.models for m in r.models)}
    if model in named:
        return None
    known = sorted({*stored, *named})
    # Rules that did not load were not asked: not "do not name it".
    if ruleset is not None:
        rules = f"the rules{_at(rules_dir)} do not name it"
    else:
        rules = f"the rules in {rules_dir} do not load" if rules_dir is not None else "the rules do not load"
    return Unknown("model", f"{_head(prefix, 'model')}the store has no prediction, decision or rejection of model '{model}', "
                            f"and {rules}{did_you_mean(model, known)}")


def unknown_to_api(
    session: Any, ruleset: RuleSet, *, rule: str | None, owner: str | None, model: str | None
) -> Unknown | None:
    """The API's check of an empty result for ops and admin tokens (`/v1/stats`, the dashboard's ops view): rule
    and owner, then model, as the CLI's; the messages name no server path."""
    return unknown_rule_or_owner(
        session, lambda: ruleset, rule=rule, owner=owner, rules_dir=None, prefix=None
    ) or unknown_model(session, model, lambda: ruleset, rules_dir=None, prefix=None)


def unknown_to_owner(session: Any, owner: str | None, *, rule: str | None, model: str | None) -> Unknown | None:
    """The check of an owner token's empty result: a `rule` or `model` that none of `owner`'s decisions (any
    action, any time: what its stats count) has, with the close match among theirs. A name only the rules or
    other owners' alerts know gets the answer of a name no one knows, so neither is revealed."""
    from sqlalchemy import select

    from decision_router.tables import AlertRecord

    for name, value, column in (("rule", rule, AlertRecord.rule), ("model", model, AlertRecord.model)):
        if value is None:
            continue
        mine = select(column).where(AlertRecord.owner == owner)
        if session.execute(mine.where(column == value).limit(1)).first() is None:
            theirs = session.scalars(mine.distinct())
            return Unknown(name, f"the store has no alerts of owner '{owner}' with {name} '{value}'"
                                 f"{did_you_mean(value, theirs)}")
    return None

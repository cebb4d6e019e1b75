"""Broken rule files -> the exact problems `rules check` prints, all of them at once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from decision_router.rules import RuleProblem, RulesInvalid, check_rules, load_rules

OWNERS = """
owners:
  - {id: alice, name: Alice, manager: carol}
  - {id: carol, name: Carol}
  - {id: desk, name: Desk}
"""

CATCH_ALL = """
  - name: rest
    when: {}
    owner: desk
"""


def write(tmp_path: Path, routing: str | None, owners: str | None = OWNERS) -> Path:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    if routing is not None:
        (rules_dir / "routing.yaml").write_text(routing)
    if owners is not None:
        (rules_dir / "owners.yaml").write_text(owners)
    return rules_dir


R = "rules/routing.yaml: "
O = "rules/owners.yaml: "  # noqa: E741 - R and O: the two files, short in the many messages below

BIG = "1" + "0" * 400  # an int beyond any float
SHOWN_BIG = "10000000000000000000… (401 digits)"  # how a problem quotes it: by its start and length

ROUTING_CASES = [
    ("yaml-syntax", "rules:\n  - name: a\n    when: {model: churn\n", [
        R + "line 4, column 1: invalid YAML: expected ',' or '}', but got '<stream end>'",
    ]),
    ("empty-file", "", [R + "expected a mapping with 'rules:' at the top, got an empty file"]),
    ("top-level-list", "- name: a\n", [R + "expected a mapping with 'rules:' at the top, got a list"]),
    ("duplicate-yaml-key", "rules:\n  - name: a\n    when: {score: {gte: 0.5}, score: {lt: 0.9}}\n    owner: desk\n" + CATCH_ALL, [
        R + "line 3: duplicate key 'score' (YAML would silently keep only the last one)",
    ]),
    ("rules-missing-and-unknown-top-key", "defaults: {ack_within: 4h}\nholdout: 0.1\n", [
        R + "rules: required",
        R + "holdout: unknown key 'holdout'; expected one of defaults, rules, models, context_sources",
        R + "rules: no catch-all rule: some predictions could match no rule and go unowned; "
        "add a last rule with when: {} (for example owner: analytics-desk, action: record)",
    ]),
    ("no-catch-all", "rules:\n  - name: a\n    when: {model: churn}\n    owner: desk\n", [
        R + "rules: no catch-all rule: some predictions could match no rule and go unowned; "
        "add a last rule with when: {} (for example owner: analytics-desk, action: record)",
    ]),
    ("unreachable-after-catch-all", "rules:" + CATCH_ALL + "  - name: late\n    when: {model: churn}\n    owner: desk\n", [
        R + "rule late: unreachable: rule rest (#1) above has when: {} and no continue: true, "
        "so it takes every prediction first",
    ]),
    ("continue-catch-all-does-not-hide", "rules:\n  - {name: all, when: {}, owner: desk, continue: true}" + CATCH_ALL, []),
    ("unknown-rule-key", "rules:\n  - name: a\n    when: {}\n    owner: desk\n    prority: high\n", [
        R + "rule a: prority: unknown key 'prority' (did you mean 'priority'?); expected one of name, when, owner, "
        "priority, action, continue, ack_within, act_within, context, cooldown, holdout",
    ]),
    # A typo of a key gets its close match; a key like no other (holdout, above) only the list.
    ("misspelt-keys-and-operator", "rules:\n  - name: a\n    when: {score: {gtee: 0.5}}\n    onwer: desk\n"
     "  - {name: b, when: {}, owner: {form: context.am, fallback: desk}}\n", [
        R + "rule a: when.score.gtee: unknown operator 'gtee' (did you mean 'gte'?); expected one of eq, ne, in, "
        "not_in, gt, gte, lt, lte, between, regex, exists",
        R + "rule a: owner: required",
        R + "rule a: onwer: unknown key 'onwer' (did you mean 'owner'?); expected one of name, when, owner, "
        "priority, action, continue, ack_within, act_within, context, cooldown, holdout",
        R + "rule b: owner.from: required",
        R + "rule b: owner.form: unknown key 'form' (did you mean 'from'?); expected one of from, fallback",
    ]),
    ("cooldown-and-holdout-values", """
rules:
  - {name: a, when: {model: churn}, owner: desk, cooldown: 7 days, holdout: 1}
  - {name: b, when: {model: churn}, owner: desk, cooldown: 0s, holdout: -0.1}
  - {name: c, when: {model: churn}, owner: desk, cooldown: null, holdout: "0.1"}
  - {name: d, when: {model: churn}, owner: desk, cooldown: 1w, holdout: true}
  - {name: e, when: {model: churn}, owner: desk, cooldown: 12h, holdout: 0}
""" + CATCH_ALL, [
        R + "rule a: cooldown: expected a duration like '30s', '15m', '4h', '2d' or '1w', got '7 days'",
        R + "rule a: holdout: expected a fraction with 0 <= holdout < 1, like 0.1 for 10%, got 1",
        R + "rule b: cooldown: expected a duration above zero, got '0s'",
        R + "rule b: holdout: expected a fraction with 0 <= holdout < 1, like 0.1 for 10%, got -0.1",
        R + "rule c: cooldown: expected a duration like '4h' or '2d', got None",
        R + "rule c: holdout: expected a fraction with 0 <= holdout < 1, like 0.1 for 10%, got '0.1'",
        R + "rule d: holdout: expected a fraction with 0 <= holdout < 1, like 0.1 for 10%, got True",
    ]),
    # Routing adds these to its time: past the calendar every prediction the rule matched failed (OverflowError).
    ("durations-past-the-calendar", """
defaults: {ack_within: 999999999d}
rules:
  - {name: a, when: {model: churn}, owner: desk, cooldown: 36501d}
  - {name: b, when: {model: churn}, owner: desk, act_within: 5300w, cooldown: 36500d}
""" + CATCH_ALL, [
        R + "defaults.ack_within: expected at most 36500d (100 years), got '999999999d'",
        R + "rule a: cooldown: expected at most 36500d (100 years), got '36501d'",
        R + "rule b: act_within: expected at most 36500d (100 years), got '5300w'",
    ]),
    # An int beyond any float (1e400 written out) made math.isfinite raise OverflowError: a traceback from rules check.
    ("numbers-beyond-any-float", f"""
rules:
  - {{name: a, when: {{score: {{gte: {BIG}}}, context.arr: {{between: [0, {BIG}]}}}}, owner: desk, holdout: {BIG}}}
""" + CATCH_ALL, [
        R + f"rule a: when.score.gte: expected a number, got {SHOWN_BIG}",
        R + f"rule a: when.context.arr.between: expected [low, high] with two numbers, got [0, {SHOWN_BIG}]",
        R + f"rule a: holdout: expected a fraction with 0 <= holdout < 1, like 0.1 for 10%, got {SHOWN_BIG}",
    ]),
    # YAML 1.1 (PyYAML) reads 1e-3 and 1.0e3 as text: the author wrote a number, so say why it is not one.
    ("exponent-without-dot-or-sign-is-text", """
rules:
  - {name: a, when: {score: {gte: 1e-3}, context.arr: {between: [1.0e3, 2E6]}}, owner: desk, holdout: 5e-2}
""" + CATCH_ALL + """context_sources:
  crm: {redis_hash: "context:{entity_id}", timeout_s: 5e0}
""", [
        R + "context_sources.crm.timeout_s: expected a number of seconds above 0 and at most 60, like 2, got '5e0' "
        "(YAML reads 5e0 as text: an exponent needs a dot and a sign, like 5.0e+0)",
        R + "rule a: when.score.gte: expected a number, got '1e-3' "
        "(YAML reads 1e-3 as text: an exponent needs a dot and a sign, like 1.0e-3)",
        R + "rule a: when.context.arr.between: expected [low, high] with two numbers, got ['1.0e3', '2E6'] "
        "(YAML reads 1.0e3 as text: an exponent needs a dot and a sign, like 1.0e+3)",
        R + "rule a: holdout: expected a fraction with 0 <= holdout < 1, like 0.1 for 10%, got '5e-2' "
        "(YAML reads 5e-2 as text: an exponent needs a dot and a sign, like 5.0e-2)",
    ]),
    # ...and an equality on a field that may hold numbers: `eq: 1e5` was the text '1e5', which silently never
    # equalled 100000. Quoted, it is text on purpose; on a text field (model_version) text is what it holds.
    ("exponent-without-dot-or-sign-never-equals-a-number", """
rules:
  - {name: a, when: {context.arr: {eq: 1e5}, score: {in: [1, 2E-3]}, context.code: '1e5', model_version: 1e5}, owner: desk}
  - {name: b, when: {context.arr: 1e5, context.y: {ne: "1e5"}, context.z: {not_in: [x, 5e3]}, label: {eq: 1.0e+5}}, owner: desk}
""" + CATCH_ALL, [
        R + "rule a: when.context.arr.eq: YAML reads 1e5 as text: an exponent needs a dot and a sign, like 1.0e+5, "
        "and the text '1e5' never equals a number: write the number so, or quote the text, '1e5'",
        R + "rule a: when.score.in: YAML reads 2E-3 as text: an exponent needs a dot and a sign, like 2.0e-3, "
        "and the text '2E-3' never equals a number: write the number so, or quote the text, '2E-3'",
        R + "rule b: when.context.arr: YAML reads 1e5 as text: an exponent needs a dot and a sign, like 1.0e+5, "
        "and the text '1e5' never equals a number: write the number so, or quote the text, '1e5'",
        R + "rule b: when.context.z.not_in: YAML reads 5e3 as text: an exponent needs a dot and a sign, like 5.0e+3, "
        "and the text '5e3' never equals a number: write the number so, or quote the text, '5e3'",
    ]),
    # Prediction ids, models, versions and entities are text: a value YAML reads as a number that prints
    # otherwise (2026.10 is 2026.1) never matched, silently. Numbers that print as written still load.
    ("unquoted-version-that-is-not-its-number", """
rules:
  - {name: a, when: {model_version: 2026.10, model: {in: [churn, 1.50]}, entity_id: {eq: 1.0}, score: {eq: 0.50}}, owner: desk}
""" + CATCH_ALL, [
        R + "rule a: when.model_version: YAML reads 2026.10 as the number 2026.1, which never equals the text "
        "'2026.10' that model_version holds: quote it, '2026.10'",
        R + "rule a: when.model.in: YAML reads 1.50 as the number 1.5, which never equals the text '1.50' that "
        "model holds: quote it, '1.50'",
    ]),
    # Written as the hint says, the same values load.
    ("exponent-with-dot-and-sign-is-a-number", """
rules:
  - {name: a, when: {score: {gte: 1.0e-3}, context.arr: {between: [1.0e+3, 2.0e+6]}}, owner: desk, holdout: 5.0e-2}
""" + CATCH_ALL, []),
    # A number of hundreds of digits is quoted by its start and length wherever a problem repeats it.
    ("long-numbers-are-not-echoed-whole", f"""
rules:
  - {{name: {BIG}, when: {{model: churn}}, owner: desk, cooldown: {"9" * 400}d}}""" + CATCH_ALL + f"""models:
  m: {{owner: desk, drift: {{reference_days: {"7" * 400}}}}}
  {BIG}: {{owner: desk}}
""", [
        R + f"rule #1: name: expected a name of letters, digits, '-', '_', '.' or '@' (no spaces), got {SHOWN_BIG}",
        R + "rule #1: cooldown: expected at most 36500d (100 years), got '99999999999999999999… (400 digits)d'",
        R + "model m: drift.reference_days: expected at most 36500 (100 years, like every duration in the rules "
        "files), got 77777777777777777777… (400 digits)",
        R + f"model #2: a model name must be a non-empty string, got {SHOWN_BIG}",
    ]),
    ("int-beyond-what-yaml-reads", f"rules:\n  - {{name: a, when: {{score: {{gte: {'1' * 5000}}}}}, owner: desk}}\n", [
        R + "line 2, column 35: invalid YAML: !!int cannot hold '11111111111111111111… (5000 digits)': "
            "more than 4300 digits",
    ]),
    # .nan and .inf: a NaN duration read "cannot convert float NaN to integer", an infinite one named timedelta's
    # maximum, not the rules files'; eq: .nan matched the text "nan" and no number.
    ("non-finite-values", """
rules:
  - {name: a, when: {context.arr: {eq: .nan}, context.tier: {in: [gold, .inf]}}, owner: desk, ack_within: .nan}
  - {name: b, when: {model: churn}, owner: desk, act_within: .inf, cooldown: 99999999999d}
""" + CATCH_ALL, [
        R + "rule a: when.context.arr.eq: expected a finite number, got nan",
        R + "rule a: when.context.tier.in: expected a finite number, got inf",
        R + "rule a: ack_within: expected a duration like '4h' or '2d', got nan",
        R + "rule b: act_within: expected at most 36500d (100 years), got inf",
        R + "rule b: cooldown: expected at most 36500d (100 years), got '99999999999d'",
    ]),
    # A path the store cannot hold failed every batch the rule matched: context and owner.from end up in the
    # decision (missing_context, fallback_reason), where SQLite refused the surrogate and PostgreSQL the NUL.
    ("paths-no-store-can-hold", r"""
rules:
  - {name: a, when: {model: churn}, owner: {from: "context.a\0b", fallback: desk}, context: ["context.\ud800"]}
  - {name: b, when: {model: {regex: "\ud800"}}, owner: desk}
""" + CATCH_ALL, [
        R + "rule a: owner.from: a field path cannot hold a NUL character or a lone surrogate, got 'context.a\\x00b'",
        R + "rule a: context: a field path cannot hold a NUL character or a lone surrogate, got 'context.\\ud800'",
        R + "rule b: when.model.regex: regular expression '\\ud800' holds a lone surrogate, which no text can hold",
    ]),
    ("cooldown-and-holdout-on-record-rules", """
rules:
  - {name: tracked, when: {model: churn}, owner: desk, action: record, cooldown: 7d, holdout: 0.1}
  - {name: alerted, when: {model: churn}, owner: desk, cooldown: 7d, holdout: 0.1}
  - {name: explicit, when: {model: fraud}, owner: desk, action: alert, cooldown: 1d, holdout: 0.5}
  - {name: rest, when: {}, owner: desk, action: record, holdout: 0}
""", [
        R + "rule tracked: cooldown: cooldown only applies to action: alert; a record rule delivers nothing to hold back",
        R + "rule tracked: holdout: holdout only applies to action: alert; a record rule delivers nothing to hold out",
        R + "rule rest: holdout: holdout only applies to action: alert; a record rule delivers nothing to hold out",
    ]),
    ("operators", """
rules:
  - name: ops
    when:
      score: {gte: high, above: 1, between: [0.9, 0.1]}
      context.arr: {between: [1, 2, 3]}
      context.name: {regex: "("}
      context.tier: [gold, silver]
      context.kind: {}
      context.flag: {exists: "yes"}
      context.x: {lt: true, in: gold}
      context.y: {exists: false, eq: 1}
      context.renewal_date: {in: [2024-06-01]}
      scroe: 1
    owner: desk
""" + CATCH_ALL, [
        R + "rule ops: when.score.gte: expected a number, got 'high'",
        R + "rule ops: when.score.between: expected [low, high] with low <= high, got [0.9, 0.1]",
        R + "rule ops: when.score.above: unknown operator 'above'; expected one of eq, ne, in, not_in, gt, gte, "
        "lt, lte, between, regex, exists",
        R + "rule ops: when.context.arr.between: expected [low, high] with two numbers, got [1, 2, 3]",
        R + "rule ops: when.context.name.regex: invalid regular expression '(': missing ), unterminated "
        "subpattern at position 0",
        R + "rule ops: when.context.tier: a list needs an operator, e.g. {in: ['gold', 'silver']}",
        R + "rule ops: when.context.kind: no operator given; use one of eq, ne, in, not_in, gt, gte, lt, lte, "
        "between, regex, exists",
        R + "rule ops: when.context.flag.exists: expected true or false, got 'yes'",
        R + "rule ops: when.context.x.in: expected a non-empty list like [a, b], got 'gold'",
        R + "rule ops: when.context.x.lt: expected a number, got True",
        R + "rule ops: when.context.y: exists: false cannot be combined with other operators (the rule could never match)",
        R + "rule ops: when.context.renewal_date.in: quote dates and times: write '2024-06-01', not 2024-06-01",
        R + "rule ops: when.scroe: unknown field 'scroe': a path starts with one of prediction_id, model, "
        "model_version, entity_type, entity_id, score, label, predicted_at, features, context, lookup",
    ]),
    ("types-and-durations", """
defaults: {ack_within: 4 hours, priority: urgent}
rules:
  - name: a b
    when: {model: churn}
    owner: desk
    action: alrt
    continue: "yes"
    ack_within: 0s
    context: [arr]
  - when: {model: churn}
    owner: 5
""" + CATCH_ALL, [
        R + "defaults.ack_within: expected a duration like '30s', '15m', '4h', '2d' or '1w', got '4 hours'",
        R + "defaults.priority: expected 'low', 'normal', 'high' or 'critical', got 'urgent'",
        R + "rule a b: name: expected a name of letters, digits, '-', '_', '.' or '@' (no spaces), got 'a b'",
        R + "rule a b: action: expected 'alert' or 'record', got 'alrt'",
        R + "rule a b: continue: expected true or false, got 'yes'",
        R + "rule a b: ack_within: expected a duration above zero, got '0s'",
        R + "rule a b: context: unknown field 'arr': a path starts with one of prediction_id, model, "
        "model_version, entity_type, entity_id, score, label, predicted_at, features, context, lookup",
        R + "rule #2: name: required",
        R + "rule #2: owner: expected an owner id or {from: FIELD, fallback: OWNER_ID}, got 5",
    ]),
    ("owners-and-names", """
rules:
  - name: a
    when: {model: churn}
    owner: alcie
  - name: a
    when: {model: churn}
    owner: {from: context.account_manager}
  - name: b
    when: {model: churn}
    owner: {from: context.account_manager, fallback: nobody, to: x}
""" + CATCH_ALL, [
        R + "rule a: owner: 'alcie' is not in the owner directory; did you mean 'alice'?",
        R + "rule a: name: duplicate name: rules #1 and #2 are both called 'a'",
        R + "rule a: owner.fallback: required with owner.from: the owner used when context.account_manager "
        "is missing or names no one in the directory",
        R + "rule b: owner.to: unknown key 'to'; expected one of from, fallback",
        R + "rule b: owner.fallback: 'nobody' is not in the owner directory",
    ]),
    # YAML 1.1 (PyYAML) reads yes/no/on/off as booleans: "got True" alone did not say to quote the name.
    ("boolean-where-a-name-is-expected", """
models:
  off: {owner: desk}
rules:
  - {name: yes, when: {model: churn}, owner: desk}
  - {name: b, when: {model: churn}, owner: no}
  - {name: c, when: {model: churn}, owner: [desk]}
  - {name: d, when: {model: churn}, owner: {from: on, fallback: desk}}
""" + CATCH_ALL, [
        R + "rule #1: name: expected a name of letters, digits, '-', '_', '.' or '@' (no spaces), got True "
        "(YAML reads an unquoted yes, on or true as a boolean: quote the text)",
        R + "rule b: owner: expected an owner id or {from: FIELD, fallback: OWNER_ID}, got False "
        "(YAML reads an unquoted no, off or false as a boolean: quote the text)",
        # A list read "expected an owner id or {from: FIELD, fallback: OWNER_ID}" without the value.
        R + "rule c: owner: expected an owner id or {from: FIELD, fallback: OWNER_ID}, got ['desk']",
        R + "rule d: owner.from: expected a dotted field path like 'context.segment', got True "
        "(YAML reads an unquoted yes, on or true as a boolean: quote the text)",
        R + "model #1: a model name must be a non-empty string, got False "
        "(YAML reads an unquoted no, off or false as a boolean: quote the text)",
    ]),
    # Escalation sweeps at most once a second: a 0.5s deadline cannot be kept (and `rules test` showed it as 0s).
    ("deadlines-under-a-second", """
defaults: {ack_within: 0.5s}
rules:
  - {name: a, when: {model: churn}, owner: desk, ack_within: 0.9, act_within: 0.5m}
  - {name: b, when: {model: churn}, owner: desk, ack_within: 1s, act_within: 1.5s, cooldown: 0.5s}
""" + CATCH_ALL, [
        R + "defaults.ack_within: expected a deadline of at least 1s (escalation checks deadlines at most once a "
        "second), got '0.5s'",
        R + "rule a: ack_within: expected a deadline of at least 1s (escalation checks deadlines at most once a "
        "second), got 0.9",
    ]),
    ("deadlines", """
defaults: {ack_within: 2d, act_within: 1d}
rules:
  - {name: a, when: {model: churn}, owner: desk, ack_within: 8h, act_within: 4h}
  - {name: b, when: {}, owner: desk, act_within: 1w}
""", [
        R + "defaults.ack_within: ack_within (2d) is longer than act_within (1d): the action would be due "
        "before the acknowledgement",
        R + "rule a: ack_within: ack_within (8h) is longer than act_within (4h): the action would be due "
        "before the acknowledgement",
    ]),
]


@pytest.mark.parametrize(("routing", "expected"), [c[1:] for c in ROUTING_CASES], ids=[c[0] for c in ROUTING_CASES])
def test_routing_problems(tmp_path: Path, routing: str, expected: list[str]) -> None:
    assert [str(p) for p in check_rules(write(tmp_path, routing))] == expected


GOOD_ROUTING = "rules:" + CATCH_ALL

OWNER_CASES = [
    ("owners-missing-key", "people: []\n", [
        O + "owners: required",
        O + "people: unknown key 'people'; expected one of owners",
    ]),
    ("owner-problems", """
owners:
  - {id: desk, name: Desk}
  - {id: alice, name: Alice, manager: carl, channels: [inbox, sms]}
  - {id: carol, name: Carol, manager: dave, channels: [email]}
  - {id: dave, name: Dave, manager: carol, email: dave@example}
  - {id: desk, name: Desk Two, phone: 123}
  - {name: Nobody}
  - {id: self, name: Self, manager: self, channels: []}
""", [
        O + "owner alice: channels: unknown channel 'sms'; expected one of inbox, webhook, email",
        O + "owner alice: manager: 'carl' is not in the owner directory; did you mean 'carol'?",
        O + "owner carol: channels: channel 'email' needs an email address, and email is not set",
        O + "owner carol: manager: manager chain loops: carol -> dave -> carol",
        O + "owner dave: email: expected an email address like name@example.com, got 'dave@example'",
        O + "owner desk: phone: unknown key 'phone'; expected one of id, name, email, manager, team, channels, "
        "away_until, delegate, webhook, digest",
        O + "owner desk: id: duplicate id 'desk': owners #1 and #5 both use it",
        O + "owner #6: id: required",
        O + "owner self: channels: expected a non-empty list of inbox, webhook, email, got []",
        O + "owner self: manager: manager chain loops: self -> self",
    ]),
    ("away-and-delegates", """
owners:
  - {id: desk, name: Desk}
  - {id: ann, name: Ann, away_until: 2027-01-15}
  - {id: ben, name: Ben, away_until: next week, delegate: dsk}
  - {id: cat, name: Cat, delegate: cat}
  - {id: dan, name: Dan, away_until: 2027-01-15T09:00:00Z, delegate: eve}
  - {id: eve, name: Eve, delegate: fay}
  - {id: fay, name: Fay, away_until: '2027-01-15', delegate: dan}
  - {id: gil, name: Gil, away_until: 2027-01-15 09:00:00, delegate: desk}
  - {id: hal, name: Hal, away_until: 2027-02-30, delegate: desk}
  - {id: ivy, name: Ivy, away_until: 20270115, delegate: 42}
  - {id: jo, name: Jo, delegate: ann, away_until: null}
  - {id: kim, name: Kim, away_until: 9999-12-31, delegate: desk}
  - {id: lee, name: Lee, away_until: '0001-01-01T00:00:00+01:00', delegate: desk}
  - {id: max, name: Max, away_until: 9999-12-31T23:59:59-23:59, delegate: desk}
  - {id: ned, name: Ned, away_until: 9999-12-30, delegate: desk}
""", [
        O + "owner ann: delegate: away owners need a delegate, or alerts would go unread",
        O + "owner ben: away_until: expected a date like 2027-01-15 or a date-time with a time zone like "
        "2027-01-15T09:00:00Z, got 'next week'",
        O + "owner ben: delegate: 'dsk' is not in the owner directory; did you mean 'desk'?",
        O + "owner cat: delegate: an owner cannot be their own delegate",
        O + "owner dan: delegate: delegate chain loops: dan -> eve -> fay -> dan",
        O + "owner gil: away_until: a date-time needs a time zone (Z or +01:00), got '2027-01-15T09:00:00'",
        O + "owner hal: away_until: expected a date like 2027-01-15 or a date-time with a time zone like "
        "2027-01-15T09:00:00Z, got '2027-02-30'",
        O + "owner ivy: away_until: expected a date like 2027-01-15 or a date-time with a time zone like "
        "2027-01-15T09:00:00Z, got 20270115",
        O + "owner ivy: delegate: expected a name of letters, digits, '-', '_', '.' or '@' (no spaces), got 42",
        O + "owner jo: away_until: expected a date like 2027-01-15 or a date-time with a time zone like "
        "2027-01-15T09:00:00Z, got None",
        # These were an OverflowError: a traceback from `rules check`, and a service that would not start.
        O + "owner kim: away_until: '9999-12-31' falls outside the calendar once in UTC (0001-01-01 to 9999-12-30)",
        O + "owner lee: away_until: '0001-01-01T00:00:00+01:00' falls outside the calendar once in UTC "
        "(0001-01-01 to 9999-12-30)",
        O + "owner max: away_until: '9999-12-31T23:59:59-23:59' falls outside the calendar once in UTC "
        "(0001-01-01 to 9999-12-30)",
    ]),
    ("boolean-where-a-name-or-text-is-expected", """
owners:
  - {id: desk, name: Desk}
  - {id: on, name: Desk 2}
  - {id: ann, name: no, manager: yes, team: off, email: yes}
""", [
        O + "owner #2: id: expected a name of letters, digits, '-', '_', '.' or '@' (no spaces), got True "
        "(YAML reads an unquoted yes, on or true as a boolean: quote the text)",
        O + "owner ann: name: expected a non-empty string, got False "
        "(YAML reads an unquoted no, off or false as a boolean: quote the text)",
        O + "owner ann: email: expected an email address like name@example.com, got True "
        "(YAML reads an unquoted yes, on or true as a boolean: quote the text)",
        O + "owner ann: manager: expected a name of letters, digits, '-', '_', '.' or '@' (no spaces), got True "
        "(YAML reads an unquoted yes, on or true as a boolean: quote the text)",
        O + "owner ann: team: expected a name of letters, digits, '-', '_', '.' or '@' (no spaces), got False "
        "(YAML reads an unquoted no, off or false as a boolean: quote the text)",
    ]),
    ("self-delegation-is-not-also-a-loop", """
owners:
  - {id: desk, name: Desk, delegate: desk}
  - {id: ann, name: Ann, away_until: 2027-01-15, delegate: desk}
""", [
        O + "owner desk: delegate: an owner cannot be their own delegate",
    ]),
]


@pytest.mark.parametrize(("owners", "expected"), [c[1:] for c in OWNER_CASES], ids=[c[0] for c in OWNER_CASES])
def test_owner_problems(tmp_path: Path, owners: str, expected: list[str]) -> None:
    assert [str(p) for p in check_rules(write(tmp_path, GOOD_ROUTING, owners))] == expected


def test_problems_in_both_files_are_reported_together(tmp_path: Path) -> None:
    routing = "rules:\n  - {name: a, when: {}, owner: zed, priority: hgih}\n"
    owners = "owners:\n  - {id: desk, name: Desk, manager: boss}\n"
    assert [str(p) for p in check_rules(write(tmp_path, routing, owners))] == [
        R + "rule a: priority: expected 'low', 'normal', 'high' or 'critical', got 'hgih'",
        R + "rule a: owner: 'zed' is not in the owner directory",
        O + "owner desk: manager: 'boss' is not in the owner directory",
    ]


def test_unreadable_owners_file_does_not_flag_every_owner(tmp_path: Path) -> None:
    # Without a directory every owner would be "unknown": report the cause only.
    assert [str(p) for p in check_rules(write(tmp_path, GOOD_ROUTING, "owners: [\n"))] == [
        O + "line 2, column 1: invalid YAML: expected the node content, but found '<stream end>'",
    ]


def test_missing_files_are_problems_not_tracebacks(tmp_path: Path) -> None:
    rules_dir = write(tmp_path, None, None)
    assert [str(p) for p in check_rules(rules_dir)] == [
        R + f"not found in {rules_dir}/ (a rules directory holds routing.yaml and owners.yaml)",
        O + f"not found in {rules_dir}/ (a rules directory holds routing.yaml and owners.yaml)",
    ]


def test_files_named_yml_are_pointed_at(tmp_path: Path) -> None:
    rules_dir = write(tmp_path, None, None)
    (rules_dir / "routing.yml").write_text(GOOD_ROUTING)
    (rules_dir / "owners.yml").write_text(OWNERS)
    assert [str(p) for p in check_rules(rules_dir)] == [
        R + f"not found in {rules_dir}/ (a rules directory holds routing.yaml and owners.yaml); "
        "routing.yml is there: rename it to routing.yaml",
        O + f"not found in {rules_dir}/ (a rules directory holds routing.yaml and owners.yaml); "
        "owners.yml is there: rename it to owners.yaml",
    ]


def test_a_rules_file_given_for_the_directory_is_one_problem_naming_the_directory(tmp_path: Path) -> None:
    routing_file = write(tmp_path, GOOD_ROUTING) / "routing.yaml"
    assert [str(p) for p in check_rules(routing_file)] == [
        f"{routing_file}: is a file: give the rules directory ({tmp_path / 'rules'})",
    ]


def test_problem_fields_name_file_rule_and_field(tmp_path: Path) -> None:
    routing = "rules:\n  - {name: a, when: {score: {gte: x}}, owner: desk}\n  - {when: {}, owner: desk}\n"
    assert check_rules(write(tmp_path, routing)) == [
        RuleProblem("rules/routing.yaml", "a", "when.score.gte", "expected a number, got 'x'"),
        RuleProblem("rules/routing.yaml", "#2", "name", "required"),
    ]


def test_load_rules_raises_with_every_problem_one_per_line(tmp_path: Path) -> None:
    routing = "rules:\n  - {name: a, when: {model: churn}, owner: zed}\n"
    with pytest.raises(RulesInvalid) as caught:
        load_rules(write(tmp_path, routing))
    assert len(caught.value.problems) == 2
    assert str(caught.value).splitlines() == [str(p) for p in caught.value.problems]


def test_valid_set_loads_and_version_hashes_both_files(tmp_path: Path) -> None:
    rules_dir = write(tmp_path, GOOD_ROUTING)
    first = load_rules(rules_dir)
    assert check_rules(rules_dir) == []
    assert len(first.version) == 12 and int(first.version, 16) >= 0
    assert first.source_dir == rules_dir
    assert load_rules(rules_dir).version == first.version
    (rules_dir / "owners.yaml").write_text(OWNERS + "  - {id: zoe, name: Zoe}\n")
    assert load_rules(rules_dir).version != first.version


def test_webhook_timeout_and_attempts_are_compiled(tmp_path: Path) -> None:
    owners = ("owners:\n  - {id: desk, name: Desk, channels: [webhook],"
              " webhook: {url: 'https://example.com/h', timeout_s: 3, max_attempts: 2}}\n"
              "  - {id: bo, name: Bo, channels: [webhook], webhook: {url: 'https://example.com/b', timeout_s: 2.5}}\n")
    owners_of = load_rules(write(tmp_path, GOOD_ROUTING, owners)).owners
    desk, bo = owners_of["desk"].webhook, owners_of["bo"].webhook
    assert (desk.timeout_s, desk.max_attempts) == (3.0, 2)
    assert (bo.timeout_s, bo.max_attempts) == (2.5, 5)  # the default


def test_owner_directory_is_compiled_with_defaults(tmp_path: Path) -> None:
    owners = (
        "owners:\n  - {id: desk, name: Desk, email: desk@example.com, team: ops, channels: [webhook, email, webhook],"
        " webhook: {url: 'http://127.0.0.1:9/hook', format: slack, secret_env: DESK_SECRET}}\n"
    )
    ruleset = load_rules(write(tmp_path, GOOD_ROUTING, owners + "  - {id: bo, name: Bo, manager: desk}\n"))
    desk, bo = ruleset.owners["desk"], ruleset.owners["bo"]
    assert desk.channels == ("webhook", "email")  # listed twice, delivered once
    assert (desk.webhook.url, desk.webhook.format, desk.webhook.secret_env) == ("http://127.0.0.1:9/hook", "slack", "DESK_SECRET")
    assert bo.webhook is None
    assert (desk.email, desk.team, desk.manager) == ("desk@example.com", "ops", None)
    assert (bo.channels, bo.manager, bo.email) == (("inbox",), "desk", None)


WEBHOOK_PROBLEMS = [
    ("channel-without-config", "channels: [inbox, webhook]",
     "owner desk: channels: channel 'webhook' needs webhook: {url: ...}, and webhook is not set"),
    ("config-without-channel", "webhook: {url: 'https://example.com/h'}",
     "owner desk: webhook: webhook is configured but 'webhook' is not in channels"),
    ("bad-url", "channels: [webhook], webhook: {url: 'ftp://x'}",
     "owner desk: webhook.url: expected an http:// or https:// URL, got 'ftp://x'"),
    ("missing-secret-file", "channels: [webhook], webhook: {url: 'https://example.com/h', secret_file: nope.key}",
     "owner desk: webhook.secret_file: file not found: nope.key (relative to "),
    # The webhook block's own keys are offered, not the owner's.
    ("webhook-unknown-key", "channels: [webhook], webhook: {url: 'https://example.com/h', retries: 3, timeout: 2}",
     "owner desk: webhook.retries: unknown key 'retries'; expected one of url, format, secret_file, secret_env, "
     "timeout_s, max_attempts"),
    ("webhook-key-typo", "channels: [webhook], webhook: {url: 'https://example.com/h', timeout: 2}",
     "owner desk: webhook.timeout: unknown key 'timeout' (did you mean 'timeout_s'?); expected one of url, format, "
     "secret_file, secret_env, timeout_s, max_attempts"),
    # Typed like every number in the rules files: pydantic's lax coercion took `true` as one attempt (no retry).
    ("webhook-attempts-true", "channels: [webhook], webhook: {url: 'https://example.com/h', max_attempts: true}",
     "owner desk: webhook.max_attempts: expected a whole number >= 1 (attempts), got True"),
    ("webhook-attempts-text", "channels: [webhook], webhook: {url: 'https://example.com/h', max_attempts: '3'}",
     "owner desk: webhook.max_attempts: expected a whole number >= 1 (attempts), got '3'"),
    ("webhook-attempts-too-many", "channels: [webhook], webhook: {url: 'https://example.com/h', max_attempts: 21}",
     "owner desk: webhook.max_attempts: expected at most 20 (attempts per delivery), got 21"),
    ("webhook-timeout-true", "channels: [webhook], webhook: {url: 'https://example.com/h', timeout_s: true}",
     "owner desk: webhook.timeout_s: expected a number of seconds above 0 and at most 120, like 5, got True"),
    ("webhook-timeout-text", "channels: [webhook], webhook: {url: 'https://example.com/h', timeout_s: '5'}",
     "owner desk: webhook.timeout_s: expected a number of seconds above 0 and at most 120, like 5, got '5'"),
    ("bad-digest", "digest: 15 minutes",
     "owner desk: digest: expected a duration like '30s', '15m', '4h', '2d' or '1w', got '15 minutes'"),
    ("zero-digest", "digest: 0s",
     "owner desk: digest: expected a duration above zero, got '0s'"),
    # The webhook channel parses the URL at start and disabled the channel of one it refused.
    ("url-with-credentials", "channels: [webhook], webhook: {url: 'https://user:secret@example.com/h'}",
     "owner desk: webhook.url: a webhook URL cannot carry a user or password; sign requests with secret_file or "
     "secret_env"),
    # A Slack or Teams webhook URL is itself a credential: a problem shows its scheme and host only.
    ("url-bad-port", "channels: [webhook], webhook: {url: 'https://example.com:99999/h'}",
     ("owner desk: webhook.url: expected an http:// or https:// URL, got 'https://example.com:99999/…': "
      "invalid port number")),
    ("url-bad-port-and-credentials", "channels: [webhook], webhook: {url: 'https://u:s3cret@example.com:99999/h'}",
     ("owner desk: webhook.url: expected an http:// or https:// URL, got 'https://***@example.com:99999/…': "
      "invalid port number")),
    ("url-with-a-space", "channels: [webhook], webhook: {url: 'https://hooks.slack.com/services/T0/B0/s3 cret'}",
     ("owner desk: webhook.url: a URL cannot hold spaces or line breaks (write a space as %20), "
      "got 'https://hooks.slack.com/…'")),
    ("url-other-scheme", "channels: [webhook], webhook: {url: 'ftp://files.example.com/s3cret?sig=1'}",
     "owner desk: webhook.url: expected an http:// or https:// URL, got 'ftp://files.example.com/…'"),
    ("url-without-scheme", "channels: [webhook], webhook: {url: 'hooks.slack.com/services/T0/B0/s3cret'}",
     "owner desk: webhook.url: expected an http:// or https:// URL, got 'hooks.slack.com/…'"),
    ("url-without-host", "channels: [webhook], webhook: {url: 'https:///services/T0/B0/s3cret'}",
     "owner desk: webhook.url: expected an http:// or https:// URL with a host, got 'https:///…'"),
    # The email channel refused these at start (with SMTP set, `serve` did not start); NUL never reaches a mailbox.
    ("email-breaking-headers", "email: 'a<b>@example.com'",
     "owner desk: email: expected an email address like name@example.com, got 'a<b>@example.com'"),
    ("email-with-nul", 'email: "a\\0b@example.com"',
     "owner desk: email: expected an email address like name@example.com, got 'a\\x00b@example.com'"),
]


@pytest.mark.parametrize(("extra", "expected"), [c[1:] for c in WEBHOOK_PROBLEMS], ids=[c[0] for c in WEBHOOK_PROBLEMS])
def test_webhook_and_digest_problems(tmp_path: Path, extra: str, expected: str) -> None:
    owners = "owners:\n  - {id: desk, name: Desk, " + extra + "}\n"
    problems = [str(p) for p in check_rules(write(tmp_path, GOOD_ROUTING, owners))]
    assert any(p.startswith(f"rules/owners.yaml: {expected}") for p in problems), problems


def test_no_problem_echoes_a_webhook_url_in_full(tmp_path: Path) -> None:
    # The token of a Slack or Teams incoming webhook sits in the URL's path: `rules check` output lands in CI logs.
    urls = ["https://hooks.slack.com/services/T0/B0/s3cret x", "https://h.example.com:99999/s3cret",
            "https://u:s3cret@h.example.com:0x/h", "ftp://h.example.com/s3cret", "https://[::1/s3cret",
            "https:///s3cret"]
    owners = "owners:\n" + "".join(
        f"  - {{id: o{n}, name: O, channels: [webhook], webhook: {{url: '{url}'}}}}\n" for n, url in enumerate(urls))
    problems = [str(p) for p in check_rules(write(tmp_path, GOOD_ROUTING, owners))]
    assert len([p for p in problems if "webhook.url" in p]) == len(urls), problems
    assert not [p for p in problems if "s3cret" in p], problems


def test_owner_digest_is_compiled(tmp_path: Path) -> None:
    owners = OWNERS + "  - {id: dg, name: Dg, email: dg@example.com, channels: [inbox, email], digest: 15m}\n"
    ruleset = load_rules(write(tmp_path, GOOD_ROUTING, owners))
    assert ruleset.owners["dg"].digest == timedelta(minutes=15)
    assert ruleset.owners["alice"].digest is None


def test_rule_cooldown_and_holdout_are_compiled(tmp_path: Path) -> None:
    routing = """
rules:
  - {name: a, when: {model: churn}, owner: desk, cooldown: 1d12h, holdout: 0.25}
  - {name: b, when: {}, owner: desk, action: record}
"""
    a, b = load_rules(write(tmp_path, routing)).rules
    assert (a.cooldown, a.holdout) == (timedelta(hours=36), 0.25)
    assert (b.cooldown, b.holdout) == (None, 0.0)


def test_exponent_text_quoted_or_on_a_text_field_loads_and_matches_that_text(tmp_path: Path) -> None:
    from decision_router.router import route

    routing = """
rules:
  - {name: code, when: {context.code: {in: ['1e5', "2e5"]}}, owner: desk, continue: true}
  - {name: version, when: {model_version: 1e5}, owner: desk, continue: true}
  - {name: b, when: {}, owner: desk, action: record}
"""
    ruleset = load_rules(write(tmp_path, routing))
    document = {"model_version": "1e5", "context": {"code": "2e5"}}
    assert [d.rule for d in route(document, ruleset)] == ["code", "version", "b"]
    assert [d.rule for d in route({"model_version": "100000", "context": {"code": 100000}}, ruleset)] == ["b"]


UTC = UTC
AWAY_CASES = [
    # A date is "away through the end of that day (UTC)": back at the next midnight UTC.
    ("date", "2027-01-15", datetime(2027, 1, 16, tzinfo=UTC)),
    ("quoted-date", "'2027-01-15'", datetime(2027, 1, 16, tzinfo=UTC)),
    ("last-day-of-year", "2026-12-31", datetime(2027, 1, 1, tzinfo=UTC)),
    ("date-time-utc", "2027-01-15T09:30:00Z", datetime(2027, 1, 15, 9, 30, tzinfo=UTC)),
    ("date-time-offset-to-utc", "2027-01-15T09:30:00+01:00", datetime(2027, 1, 15, 8, 30, tzinfo=UTC)),
    ("quoted-date-time", "'2027-01-15T09:30:00Z'", datetime(2027, 1, 15, 9, 30, tzinfo=UTC)),
    ("quoted-date-time-space", "'2027-01-15 09:30+02:00'", datetime(2027, 1, 15, 7, 30, tzinfo=UTC)),
]


@pytest.mark.parametrize(("written", "expected"), [c[1:] for c in AWAY_CASES], ids=[c[0] for c in AWAY_CASES])
def test_away_until_is_compiled_to_utc(tmp_path: Path, written: str, expected: datetime) -> None:
    owners = OWNERS + f"  - {{id: ann, name: Ann, away_until: {written}, delegate: desk}}\n"
    ann = load_rules(write(tmp_path, GOOD_ROUTING, owners)).owners["ann"]
    assert (ann.away_until, ann.delegate) == (expected, "desk")
    assert ann.away_until is not None and ann.away_until.utcoffset() == timedelta(0)
    assert ann.is_away(expected - timedelta(microseconds=1)) and not ann.is_away(expected)


def test_owner_without_leave_is_never_away(tmp_path: Path) -> None:
    alice = load_rules(write(tmp_path, GOOD_ROUTING)).owners["alice"]
    assert (alice.away_until, alice.delegate) == (None, None)
    assert not alice.is_away(datetime(2027, 1, 1, tzinfo=UTC))


def test_impossible_yaml_date_is_kept_as_text_not_a_traceback(tmp_path: Path) -> None:
    # PyYAML raises a bare ValueError for 2024-13-01; the loader keeps it as text instead.
    routing = "rules:\n  - {name: a, when: {context.renewal_date: {in: [2024-13-01]}}, owner: desk}\n" + CATCH_ALL
    assert check_rules(write(tmp_path, routing)) == []


# context_sources -------------------------------------------------------------------------

SOURCE_PROBLEMS = [
    ("unknown-placeholder", '{redis_hash: "context:{account}"}',
     "context_sources.s.redis_hash: unknown placeholder '{account}' in key pattern 'context:{account}'; "
     "use {entity_type}, {entity_id}, {prediction_id}, {model}"),
    ("placeholder-with-conversion", '{redis_hash: "context:{entity_id!r}"}',
     "context_sources.s.redis_hash: unknown placeholder '{entity_id!r}' in key pattern 'context:{entity_id!r}'; "
     "use {entity_type}, {entity_id}, {prediction_id}, {model}"),
    ("unbalanced-brace", '{redis_hash: "context:{entity_id"}',
     "context_sources.s.redis_hash: invalid key pattern 'context:{entity_id': expected '}' before end of string"),
    ("null-pattern", "{redis_hash: null}",
     "context_sources.s.redis_hash: expected a key pattern like 'context:{entity_type}:{entity_id}', got None"),
    ("not-a-select", '{sql: "delete from billing_accounts where account_id = :entity_id"}',
     "context_sources.s.sql: expected a single SELECT statement (a context query only reads), "
     "got one starting with 'delete'"),
    ("with-is-not-a-plain-select", '{sql: "with x as (delete from t returning *) select * from x"}',
     "context_sources.s.sql: expected a single SELECT statement (a context query only reads), "
     "got one starting with 'with'"),
    ("comment-hides-nothing", '{sql: "/* select */ update t set a = 1"}',
     "context_sources.s.sql: expected a single SELECT statement (a context query only reads), "
     "got one starting with 'update'"),
    ("two-statements", '{sql: "select 1; drop table billing_accounts"}',
     "context_sources.s.sql: expected a single SELECT statement, got several separated by ';'"),
    ("select-into", '{sql: "select * into copy from billing_accounts"}',
     "context_sources.s.sql: SELECT ... INTO writes a table; a context query only reads"),
    ("unknown-parameter", '{sql: "select plan from billing_accounts where account_id = :account_id"}',
     "context_sources.s.sql: unknown parameter ':account_id'; a context query can use "
     ":entity_type, :entity_id, :prediction_id, :model"),
    ("unterminated-string", """{sql: "select 'abc from t"}""",
     "context_sources.s.sql: unterminated string starting at \"'abc from t\""),
    ("empty-sql", '{sql: ""}', "context_sources.s.sql: expected a SELECT statement, got ''"),
    ("both-kinds", '{redis_hash: "k:{entity_id}", sql: "select 1"}',
     "context_sources.s: expected exactly one of redis_hash (a key pattern like "
     "'context:{entity_type}:{entity_id}') or sql (a SELECT statement)"),
    ("neither-kind", "{timeout_s: 2}",
     "context_sources.s: expected exactly one of redis_hash (a key pattern like "
     "'context:{entity_type}:{entity_id}') or sql (a SELECT statement)"),
    ("url-instead-of-variable-is-not-echoed", '{sql: "select 1", database_url_env: "postgresql://u:s3cret@db/x"}',
     "context_sources.s.database_url_env: expected the name of an environment variable that holds the database "
     "URL, like DECISION_ROUTER_CONTEXT_DB_URL, not the URL itself"),
    ("bad-variable-name", '{sql: "select 1", database_url_env: "CTX URL"}',
     "context_sources.s.database_url_env: expected an environment variable name like "
     "DECISION_ROUTER_CONTEXT_DB_URL, got 'CTX URL'"),
    ("database-on-a-hash", '{redis_hash: "k:{entity_id}", database_url_env: CTX_URL}',
     "context_sources.s: database_url_env only applies to a sql source"),
    ("zero-timeout", '{redis_hash: "k:{entity_id}", timeout_s: 0}',
     "context_sources.s.timeout_s: expected a number of seconds above 0 and at most 60, like 2, got 0"),
    ("text-timeout", '{redis_hash: "k:{entity_id}", timeout_s: "2s"}',
     "context_sources.s.timeout_s: expected a number of seconds above 0 and at most 60, like 2, got '2s'"),
    ("unknown-key", '{redis_hash: "k:{entity_id}", url: "redis://x"}',
     "context_sources.s.url: unknown key 'url'; expected one of redis_hash, sql, database_url_env, timeout_s"),
    ("not-a-mapping", '"context:{entity_id}"', "context_sources.s: expected a mapping, got 'context:{entity_id}'"),
]


@pytest.mark.parametrize(("source", "expected"), [c[1:] for c in SOURCE_PROBLEMS], ids=[c[0] for c in SOURCE_PROBLEMS])
def test_context_source_problems(tmp_path: Path, source: str, expected: str) -> None:
    routing = f"context_sources:\n  s: {source}\nrules:" + CATCH_ALL
    assert [str(p) for p in check_rules(write(tmp_path, routing))] == [R + expected]
    assert "s3cret" not in expected  # a URL written by mistake is never echoed back


def test_context_source_names_and_section_shape(tmp_path: Path) -> None:
    routing = 'context_sources:\n  crm.v2: {redis_hash: "k:{entity_id}"}\nrules:' + CATCH_ALL
    assert [str(p) for p in check_rules(write(tmp_path, routing))] == [
        R + "context_sources.crm.v2: expected a source name of letters, digits, '-' or '_' (no dots), got 'crm.v2'",
    ]
    listed = tmp_path / "listed"
    listed.mkdir()
    assert [str(p) for p in check_rules(write(listed, "context_sources: [crm]\nrules:" + CATCH_ALL))] == [
        R + "context_sources: expected a mapping, got ['crm']",
    ]


def test_lookup_paths_must_be_well_formed_and_name_declared_sources(tmp_path: Path) -> None:
    routing = """
context_sources:
  crm: {redis_hash: "context:{entity_type}:{entity_id}"}
  billing: {sql: "delete from billing_accounts"}
rules:
  - name: a
    when: {lookup.crn.tier: gold, lookup.crm: {exists: true}}
    owner: {from: lookup.hr.manager, fallback: desk}
    context: [lookup.crm.health_score, lookup.erp.plan, lookup.erp.terms, lookup.billing.plan, crm.tier]
""" + CATCH_ALL
    assert [str(p) for p in check_rules(write(tmp_path, routing))] == [
        # The declared billing source has a problem of its own, reported once, on the source.
        R + "context_sources.billing.sql: expected a single SELECT statement (a context query only reads), "
        "got one starting with 'delete'",
        R + "rule a: when.lookup.crm: expected lookup.<source>.<field>, like 'lookup.crm.health_score', got 'lookup.crm'",
        R + "rule a: context: unknown field 'crm': a path starts with one of prediction_id, model, model_version, "
        "entity_type, entity_id, score, label, predicted_at, features, context, lookup",
        R + "rule a: when.lookup.crn.tier: context source 'crn' is not declared in context_sources; did you mean 'crm'?",
        R + "rule a: owner.from: context source 'hr' is not declared in context_sources",
        R + "rule a: context: context source 'erp' is not declared in context_sources",  # once per rule and field
    ]


def test_lookup_without_any_context_sources(tmp_path: Path) -> None:
    routing = "rules:\n  - {name: a, when: {lookup.crm.tier: gold}, owner: desk}\n" + CATCH_ALL
    assert [str(p) for p in check_rules(write(tmp_path, routing))] == [
        R + "rule a: when.lookup.crm.tier: context source 'crm' is not declared in context_sources",
    ]


def test_context_sources_are_compiled(tmp_path: Path) -> None:
    routing = """
context_sources:
  crm:
    redis_hash: "context:{entity_type}:{entity_id}"
  billing:
    # Comments, casts, times in strings and a trailing ';' are all fine.
    sql: >-
      select overdue_amount, plan::text as plan, '12:30' as cutoff -- owed; per account
      from billing_accounts where account_id = :entity_id and kind = :entity_type and :entity_id <> '';
    database_url_env: DECISION_ROUTER_CONTEXT_DB_URL
    timeout_s: 0.5
rules:
  - {name: a, when: {lookup.crm.tier: gold}, owner: {from: lookup.crm.owner, fallback: desk}, context: [lookup.billing.plan]}
""" + CATCH_ALL
    ruleset = load_rules(write(tmp_path, routing))
    crm, billing = ruleset.context_sources["crm"], ruleset.context_sources["billing"]
    assert (crm.name, crm.kind, crm.key_pattern, crm.parameters, crm.timeout_s) == (
        "crm", "redis_hash", "context:{entity_type}:{entity_id}", ("entity_type", "entity_id"), 2.0)
    assert (billing.kind, billing.parameters, billing.database_url_env, billing.timeout_s) == (
        "sql", ("entity_id", "entity_type"), "DECISION_ROUTER_CONTEXT_DB_URL", 0.5)
    assert billing.sql is not None and billing.sql.startswith("select overdue_amount")
    assert ruleset.rules[0].context_fields == ("lookup.billing.plan",)
    (tmp_path / "none").mkdir()
    assert load_rules(write(tmp_path / "none", GOOD_ROUTING)).context_sources == {}



# --- models: owners and drift settings of the models --------------------------------------

MODEL_CASES = [
    ("unknown-owner", "models: {churn: {owner: alcie}}\n", [
        R + "model churn: owner: 'alcie' is not in the owner directory; did you mean 'alice'?",
    ]),
    ("shape", "models: {churn: {}, fraud: null, upsell: {owner: desk, colour: red}, 3: {owner: desk}}\n", [
        R + "model churn: owner: required",
        R + "model fraud: expected a mapping, got None",
        R + "model upsell: colour: unknown key 'colour'; expected one of owner, drift",
        R + "model #4: a model name must be a non-empty string, got 3",
    ]),
    ("misspelt-keys", "models: {churn: {owner: desk, drfit: {alpah: 0.01}}}\n", [
        R + "model churn: drfit: unknown key 'drfit' (did you mean 'drift'?); expected one of owner, drift",
    ]),
    ("not-a-mapping", "models: [churn]\n", [R + "models: expected a mapping, got ['churn']"]),
    ("drift-values", """
models:
  churn:
    owner: desk
    drift: {reference_days: 0, recent: 0s, alpha: 1, min_samples: 10, baseline_version: 2026.10, bins: 5}
  fraud: {owner: desk, drift: {reference_days: 2.5, recent: 1 day, alpha: '0.01', min_samples: true}}
""", [
        R + "model churn: drift.reference_days: expected a whole number >= 1 (days), got 0",
        R + "model churn: drift.recent: expected a duration above zero, got '0s'",
        R + "model churn: drift.alpha: expected a false-alarm rate with 0 < alpha < 1, like 0.01, got 1",
        R + "model churn: drift.min_samples: expected a whole number >= 50 (no PSI is computed on fewer values), got 10",
        R + "model churn: drift.baseline_version: expected a quoted version like '2026.10' "
        "(YAML reads an unquoted one as a number), got 2026.1",
        R + "model churn: drift.bins: unknown key 'bins'; expected one of reference_days, recent, alpha, min_samples, "
        "baseline_version",
        R + "model fraud: drift.reference_days: expected a whole number >= 1 (days), got 2.5",
        R + "model fraud: drift.recent: expected a duration like '30s', '15m', '4h', '2d' or '1w', got '1 day'",
        R + "model fraud: drift.alpha: expected a false-alarm rate with 0 < alpha < 1, like 0.01, got '0.01'",
        R + "model fraud: drift.min_samples: expected a whole number >= 50 (no PSI is computed on fewer values), got True",
    ]),
    # The monitor failed every check on these (OverflowError past the calendar; alpha split over the figures
    # became 0), or never judged a PSI (it reads at most 50,000 values per window).
    ("drift-bounds", """
models:
  churn: {owner: desk, drift: {reference_days: 3000000, alpha: 5.0e-324, min_samples: 50001}}
  fraud: {owner: desk, drift: {reference_days: 36500, alpha: 1.0e-12, min_samples: 50000}}
""", [
        R + "model churn: drift.reference_days: expected at most 36500 (100 years, like every duration in the rules "
        "files), got 3000000",
        R + "model churn: drift.alpha: expected a false-alarm rate of at least 1e-12, like 0.01, got 5e-324",
        R + "model churn: drift.min_samples: expected at most 50000 (the monitor reads at most 50000 values per "
        "window, so a PSI would never have enough), got 50001",
    ]),
    # alpha is usually written 1e-3, which YAML 1.1 reads as text.
    ("drift-alpha-exponent-as-text", "models: {churn: {owner: desk, drift: {alpha: 1e-3}}}\n", [
        R + "model churn: drift.alpha: expected a false-alarm rate with 0 < alpha < 1, like 0.01, got '1e-3' "
        "(YAML reads 1e-3 as text: an exponent needs a dot and a sign, like 1.0e-3)",
    ]),
]


@pytest.mark.parametrize(("models", "expected"), [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_model_problems(tmp_path: Path, models: str, expected: list[str]) -> None:
    assert [str(p) for p in check_rules(write(tmp_path, GOOD_ROUTING + models))] == expected


def test_model_problems_come_after_the_rules_and_name_the_model(tmp_path: Path) -> None:
    routing = "rules:\n  - {name: a, when: {}, owner: zed}\nmodels: {churn: {owner: nobody}}\n"
    assert check_rules(write(tmp_path, routing)) == [
        RuleProblem("rules/routing.yaml", "a", "owner", "'zed' is not in the owner directory"),
        RuleProblem("rules/routing.yaml", "model churn", "owner", "'nobody' is not in the owner directory"),
    ]


def test_model_owners_and_drift_settings_are_compiled(tmp_path: Path) -> None:
    from decision_router.rules import DriftConfig

    routing = GOOD_ROUTING + """
models:
  churn: {owner: alice}
  payment-fraud:
    owner: carol
    drift: {reference_days: 7, recent: 12h, alpha: 0.001, min_samples: 500, baseline_version: '2026.10'}
"""
    ruleset = load_rules(write(tmp_path, routing))
    assert dict(ruleset.model_owners) == {"churn": "alice", "payment-fraud": "carol"}
    assert ruleset.models["churn"].drift == DriftConfig()  # the defaults
    assert ruleset.models["payment-fraud"].drift == DriftConfig(
        reference_days=7, recent=timedelta(hours=12), alpha=0.001, min_samples=500, baseline_version="2026.10"
    )
    assert (DriftConfig().reference_days, DriftConfig().recent, DriftConfig().min_samples) == (3, timedelta(days=1), 200)
    # Without a models: section there are no model owners (and nothing breaks).
    (tmp_path / "plain").mkdir()
    assert dict(load_rules(write(tmp_path / "plain", GOOD_ROUTING)).model_owners) == {}


def test_a_deep_manager_chain_is_checked_in_linear_time(tmp_path: Path) -> None:
    # Each owner walked its chain to the top, looking each step up in a list: 2,000 owners in one chain
    # took half a minute of rules check (and of a reload).
    import time

    n = 3000
    chain = (f"  - {{id: o{i}, name: O, manager: o{i + 1}, delegate: o{i + 1}}}\n" for i in range(n))
    owners = "owners:\n" + "".join(chain)
    owners += f"  - {{id: o{n}, name: O, manager: o0}}\n"  # and it loops back to the start
    started = time.process_time()
    problems = [str(p) for p in check_rules(write(tmp_path, "rules:\n  - {name: a, when: {}, owner: o0}\n", owners))]
    assert time.process_time() - started < 10
    assert len(problems) == 1 and problems[0].startswith(O + "owner o0: manager: manager chain loops: o0 -> o1 -> o2")


@pytest.mark.parametrize(("content", "problem"), [
    (b"", "is empty"), (b"  \n", "is empty"), (b"\xff\xfe secret", "is not UTF-8 text"),
])
def test_a_secret_file_the_webhook_channel_cannot_read_is_a_problem(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    """It passed (the file exists) and then disabled the owner's webhook at start, with only a warning."""
    owners = ("owners:\n  - {id: desk, name: Desk, channels: [inbox, webhook], "
              "webhook: {url: 'https://example.com/h', secret_file: hook.key}}\n")
    rules_dir = write(tmp_path, GOOD_ROUTING, owners)
    (rules_dir / "hook.key").write_bytes(content)
    problems = [str(p) for p in check_rules(rules_dir)]
    assert problems == [f"rules/owners.yaml: owner desk: webhook.secret_file: secret file {rules_dir / 'hook.key'} "
                        f"{problem}"], problems
    (rules_dir / "hook.key").write_bytes(b"s3cret\n")
    assert check_rules(rules_dir) == []

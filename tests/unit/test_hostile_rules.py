"""Hostile and broken rules files: the loader never crashes, every problem names its file
(and its rule, field or YAML line), YAML is loaded safely and bounded, and regex conditions
run on a linear-time engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decision_router.rules import load_rules
from decision_router.rules.compile import lookup
from decision_router.rules.load import MAX_YAML_DEPTH, attempt_load
from decision_router.rules.spec import MAX_REGEX_LENGTH, MAX_REGEX_PROGRAM, compile_regex

SHIPPED = Path(__file__).resolve().parents[2] / "rules"
ROUTING = (SHIPPED / "routing.yaml").read_text()
OWNERS = (SHIPPED / "owners.yaml").read_text()
FILES = {"rules/routing.yaml", "rules/owners.yaml"}
PROPERTY = settings(
    max_examples=150, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def write(tmp_path: Path, routing: str | bytes, owners: str | bytes = OWNERS) -> Path:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir(exist_ok=True)
    for name, text in (("routing.yaml", routing), ("owners.yaml", owners)):
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
        (rules_dir / name).write_bytes(data)
    return rules_dir


def problems_of(rules_dir: Path) -> list:
    attempt = attempt_load(rules_dir)
    assert (attempt.ruleset is None) == bool(attempt.problems)
    for problem in attempt.problems:
        assert problem.file in FILES
        assert problem.message.strip()
        assert str(problem).startswith(problem.file + ": ")
        if problem.message.startswith("invalid YAML"):
            assert problem.field.startswith("line ") or problem.field == "-", problem
    return attempt.problems


def test_the_shipped_rules_load() -> None:
    assert problems_of(SHIPPED) == []


# -- property tests ------------------------------------------------------------------------

@PROPERTY
@given(data=st.binary(max_size=300))
def test_random_bytes_never_crash_the_loader(tmp_path_factory, data) -> None:
    rules_dir = write(tmp_path_factory.mktemp("r"), data)
    assert problems_of(rules_dir)  # no random blob is a valid routing file with a catch-all


@st.composite
def text_mutations(draw: st.DrawFn, text: str) -> str:
    """The shipped file with lines dropped, duplicated or cut, or characters inserted."""
    lines = text.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["drop", "duplicate", "cut", "insert", "indent"]))
        if action == "drop":
            del lines[i]
        elif action == "duplicate":
            lines.insert(i, lines[i])
        elif action == "cut":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))] + "\n"
        elif action == "insert":
            at = draw(st.integers(0, len(lines[i])))
            junk = draw(st.sampled_from([":", "- ", "{", "]", "&a ", "*a", "!!python/object:os.system ", "\t", "'",
                                         "\x00", "\ud800", "0x", "~", "? ", "|", "%YAML 1.1\n", "<<: "]))
            lines[i] = lines[i][:at] + junk + lines[i][at:]
        else:
            lines[i] = "  " + lines[i]
        if not lines:
            break
    return "".join(lines)


@PROPERTY
@given(routing=text_mutations(ROUTING))
def test_mutated_routing_files_never_crash_and_every_problem_has_a_location(tmp_path_factory, routing) -> None:
    problems_of(write(tmp_path_factory.mktemp("r"), routing))


@PROPERTY
@given(owners=text_mutations(OWNERS))
def test_mutated_owner_files_never_crash_and_every_problem_has_a_location(tmp_path_factory, owners) -> None:
    problems_of(write(tmp_path_factory.mktemp("r"), ROUTING, owners))


yaml_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
        st.dates(), st.sampled_from(["(", "(a+)+$", "x" * 600, "1d", "-5m", "gte", "context.", "lookup.x.y"]),
    ),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)


def paths(value: object, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, (*prefix, index))
    return found


@PROPERTY
@given(data=st.data())
def test_structurally_mutated_rules_name_the_rule_they_break(tmp_path_factory, data) -> None:
    """One value anywhere in the shipped routing.yaml replaced: the loader reports problems
    with locations, and a broken rule is named by its name (or #n) in at least one of them."""
    document = yaml.safe_load(ROUTING)
    where = data.draw(st.sampled_from([p for p in paths(document) if p]))
    value = data.draw(yaml_values)
    target = document
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    problems = problems_of(write(tmp_path_factory.mktemp("r"), yaml.safe_dump(document, allow_unicode=True)))
    rules = document.get("rules") if isinstance(document, dict) else None
    labels = {"-"} | {
        rule["name"] if isinstance(rule, dict) and isinstance(rule.get("name"), str) and rule["name"] else f"#{i + 1}"
        for i, rule in enumerate(rules if isinstance(rules, list) else [])
    }
    for problem in problems:
        if problem.file.endswith("routing.yaml") and not problem.rule.startswith("model "):
            assert problem.rule in labels, problem
    if where[0] == "rules" and len(where) > 2 and problems:
        # A broken rule is reported under its label, or the file as a whole is (no catch-all left, ...),
        # or a rule below it is (now unreachable).
        assert any(p.rule != "-" or p.field != "-" for p in problems)


# -- safe and bounded YAML -----------------------------------------------------------------

def test_python_tags_are_refused_with_a_clear_error(tmp_path) -> None:
    routing = "rules: !!python/object/apply:os.system ['touch /tmp/pwned-by-rules']\n"
    [problem] = problems_of(write(tmp_path, routing))
    assert str(problem) == (
        "rules/routing.yaml: line 1, column 8: invalid YAML: tag 'tag:yaml.org,2002:python/object/apply:os.system' "
        "is not allowed: rules files hold plain YAML data, loaded safely"
    )


def test_deep_nesting_is_reported_with_its_position_not_a_recursion_error(tmp_path) -> None:
    [problem] = problems_of(write(tmp_path, "rules: " + "[" * 50_000 + "]" * 50_000))
    assert problem.field == f"line 1, column {7 + MAX_YAML_DEPTH}"  # the first [ is at column 8
    assert problem.message == f"invalid YAML: nested more than {MAX_YAML_DEPTH} levels deep"


def test_billion_laughs_aliases_are_refused_before_they_expand(tmp_path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):  # 10**9 values once expanded
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    routing = "\n".join(lines) + "\nrules:\n  - {name: r, when: {score: {in: *a8}}, owner: analytics-desk}\n"
    [problem] = problems_of(write(tmp_path, routing))
    assert problem.message.startswith("invalid YAML: expands to more than 200000 values")
    assert problem.field.startswith("line ")


def test_an_alias_inside_itself_is_refused(tmp_path) -> None:
    [problem] = problems_of(write(tmp_path, "rules: &r [*r]\n"))
    assert problem.message == "invalid YAML: an alias refers to the node that contains it"


@pytest.mark.parametrize(
    "value",
    ["!!float nope", "!!float ''", "!!int f", "!!int 0x", "!!int ''", "!!int '-'", "!!bool foo", "!!timestamp foo"],
)
def test_a_tagged_value_its_tag_cannot_read_is_a_located_yaml_error(tmp_path, value) -> None:
    # PyYAML's constructors raise bare ValueError, KeyError, IndexError or AttributeError here.
    routing = f"rules:\n  - name: r\n    when: {{score: {{gte: {value}}}}}\n    owner: analytics-desk\n"
    [problem] = problems_of(write(tmp_path, routing))
    tag, text = value.split(" ", 1)
    held = yaml.safe_load(text)
    assert str(problem) == f"rules/routing.yaml: line 3, column 25: invalid YAML: {tag} cannot hold {held!r}"


@pytest.mark.parametrize("value", ["!!map 3", "!!set [1]"])
def test_a_mapping_tag_on_something_else_is_a_located_yaml_error(tmp_path, value) -> None:
    [problem] = problems_of(write(tmp_path, f"rules: {value}\n"))
    assert problem.field == "line 1, column 8"
    assert problem.message.startswith("invalid YAML: expected a mapping node, but found ")


@PROPERTY
@given(
    tag=st.sampled_from(["!!float", "!!int", "!!bool", "!!timestamp", "!!null", "!!binary", "!!str", "!!map", "!!set",
                         "!!seq", "!!omap", "!!pairs"]),
    value=st.one_of(
        st.text(max_size=8).map(lambda t: repr(t).replace('"', "'")), st.sampled_from(["[1]", "{a: 1}", "3"])
    ),
)
def test_any_standard_tag_on_any_value_never_crashes_the_loader(tmp_path_factory, tag, value) -> None:
    routing = (
        f"rules:\n  - name: r\n    when: {{score: {{gte: {tag} {value}}}}}\n    owner: analytics-desk\n"
        "  - {name: all, when: {}, owner: analytics-desk}\n"
    )
    problems_of(write(tmp_path_factory.mktemp("r"), routing))


def test_a_huge_file_is_refused_without_being_parsed(tmp_path) -> None:
    [problem] = problems_of(write(tmp_path, "#" * (5 * 1024 * 1024)))
    assert problem.message == "file is larger than 4 MiB; is this a rules file?"


def test_bytes_that_are_not_text_are_a_located_yaml_error(tmp_path) -> None:
    [problem] = problems_of(write(tmp_path, b"rules:\n  - name: \x80\x81\n"))
    assert problem.message.startswith("invalid YAML")


@pytest.mark.parametrize(
    ("raw", "where", "message"),
    [
        # Latin-1 "café": the byte of é, located by byte; not "character #x00e9 is not allowed".
        ('rules:\n  - name: "caf\xe9"\n'.encode("latin-1"), "line 2, column 15",
         "invalid YAML: the file is not UTF-8 text (byte 0xe9: invalid continuation byte)"),
        (b"rules:\n  - name: \x80\n", "line 2, column 11",
         "invalid YAML: the file is not UTF-8 text (byte 0x80: invalid start byte)"),
        # A control character in valid UTF-8 is a character YAML forbids.
        ("rules:\n  - name: caf\u00e9\x07\n".encode(), "line 2, column 15", "invalid YAML: character #x0007 is not allowed"),
    ],
)
def test_bytes_that_are_not_utf8_are_told_apart_from_forbidden_characters(tmp_path, raw, where, message) -> None:
    [problem] = problems_of(write(tmp_path, raw))
    assert (problem.field, problem.message) == (where, message)


# -- regex conditions ------------------------------------------------------------------------

def rules_with_regex(tmp_path: Path, pattern: str) -> Path:
    routing = {"rules": [
        {"name": "r", "when": {"context.name": {"regex": pattern}}, "owner": "analytics-desk"},
        {"name": "rest", "when": {}, "owner": "analytics-desk", "action": "record"},
    ]}
    return write(tmp_path, yaml.safe_dump(routing))


def test_regex_conditions_run_on_re2_so_a_catastrophic_pattern_finishes(tmp_path) -> None:
    # (a+)+$ on "aaaa...b" backtracks exponentially under Python's re: at 50,000 characters
    # it would outlive the test timeout. RE2 matches in linear time.
    assert type(compile_regex("(a+)+$")).__module__.startswith("re2")
    rule = load_rules(rules_with_regex(tmp_path, "(a+)+$")).rules[0]
    assert rule.matches({"context": {"name": "a" * 50_000 + "b"}}) is False
    assert rule.matches({"context": {"name": "a" * 50_000}}) is True
    assert lookup({"context": {"name": "x"}}, "context.name") == "x"


def test_regex_search_semantics_are_kept(tmp_path) -> None:
    rule = load_rules(rules_with_regex(tmp_path, "(^|[-.])shadow\\b")).rules[0]
    assert rule.matches({"context": {"name": "v3-shadow-2"}})
    assert rule.matches({"context": {"name": "shadow"}})
    assert not rule.matches({"context": {"name": "v3-shadowed"}})
    assert not rule.matches({"context": {"name": "a\ud800"}})  # not text RE2 can read: no match, no crash
    assert not rule.matches({"context": {"name": ["shadow"]}})


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("(a)\\1", ("is not supported by the linear-time engine (RE2): invalid escape sequence: \\1; "
                    "backreferences and lookarounds are not available")),
        ("x(?=y)", "is not supported by the linear-time engine (RE2): invalid perl operator: (?="),
        ("a" * (MAX_REGEX_LENGTH + 1), (f"regular expression of {MAX_REGEX_LENGTH + 1} characters is too long "
                                        f"(at most {MAX_REGEX_LENGTH})")),
        ("((a{100}){100}){100}", "is not supported by the linear-time engine (RE2)"),
    ],
    ids=["backreference", "lookahead", "too-long", "program-too-big"],
)
def test_patterns_re2_cannot_bound_are_refused_at_load_time(tmp_path, pattern, message) -> None:
    [problem] = problems_of(rules_with_regex(tmp_path, pattern))
    assert (problem.rule, problem.field) == ("r", "when.context.name.regex")
    assert message in problem.message


@pytest.mark.parametrize("pattern", [".{0,1000}.{0,1000}X", "[a-z]{1000}[a-z]{1000}X", "(a|b){999}X"])
def test_a_pattern_whose_matching_cost_grows_with_its_program_is_refused(tmp_path, pattern) -> None:
    """RE2's time is linear in the text, times the size of the compiled pattern once its DFA gives up:
    each of these took 1 to 3 seconds on one 64 KiB value (the gate's limit), for every prediction."""
    [problem] = problems_of(rules_with_regex(tmp_path, pattern))
    assert (problem.rule, problem.field) == ("r", "when.context.name.regex")
    assert f"more than {MAX_REGEX_PROGRAM}" in problem.message and "repetition" in problem.message


def test_a_pattern_within_the_program_limit_matches_a_64kib_value_quickly(tmp_path) -> None:
    import time

    rule = load_rules(rules_with_regex(tmp_path, "[a-z]{490}[a-z]{490}X")).rules[0]
    started = time.perf_counter()
    assert rule.matches({"context": {"name": "ab" * 32_768}}) is False
    assert time.perf_counter() - started < 0.5  # ~10 ms; 1.3 s at twice the repetition

"""Read, validate and cross-check a rules directory; compile it only when it is clean.

Every problem is collected before anything is reported, so an author fixes a file in
one round instead of one error per run. Each problem names the file, the rule (or
owner) by name and the dotted field, as `rules check` prints them.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from decision_router.durations import format_duration
from decision_router.echo import cap_digits, close_match, did_you_mean
from decision_router.rules.compile import RuleSet, build_ruleset
from decision_router.rules.spec import (
    LOOKUP,
    OPERATORS,
    OWNER_TAGS,
    ContextSourceSpec,
    DefaultsSpec,
    ModelDriftSpec,
    ModelSpec,
    OwnerFromSpec,
    OwnersFile,
    OwnerSpec,
    RoutingFile,
    RuleSpec,
    WebhookSpec,
    exponent_text,
    got_text,
    read_secret_file,
)

ROUTING_FILE = "routing.yaml"
OWNERS_FILE = "owners.yaml"
_END = 1 << 30  # sort position of whole-file checks that belong after every rule


@dataclass(frozen=True)
class RuleProblem:
    file: str  # "rules/routing.yaml"
    rule: str  # rule name or "#3"; "owner <id>" / "owner #3" in owners.yaml; "-" for the whole file
    field: str  # dotted field ("when.score.gte"), a YAML position ("line 4, column 7"), or "-"
    message: str

    def __str__(self) -> str:
        # "-" parts are left out so whole-file problems read "rules/routing.yaml: rules: ...".
        parts = [self.file]
        if self.rule != "-":
            parts.append(self.rule if self.rule.startswith(("owner ", "model ")) else f"rule {self.rule}")
        if self.field != "-":
            parts.append(self.field)
        return ": ".join([*parts, self.message])


class RulesInvalid(Exception):
    """A rules directory with problems; `str()` lists them, one per line."""

    def __init__(self, problems: Iterable[RuleProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def check_rules(rules_dir: Path | str) -> list[RuleProblem]:
    """Every problem in the directory; [] when it loads."""
    return _load(Path(rules_dir))[1]


def load_rules(rules_dir: Path | str) -> RuleSet:
    ruleset, problems = _load(Path(rules_dir))
    if problems or ruleset is None:
        raise RulesInvalid(problems)
    return ruleset


@dataclass
class _Problems:
    """Problems of one file, sorted by position (file-level first, then item order)."""

    file: str
    found: list[tuple[int, int, RuleProblem]] = field(default_factory=list)

    def add(self, position: int, label: str, field_: str, message: str) -> None:
        # A 400-digit number in the file (a threshold, a name, a YAML key) is quoted by its start and length.
        problem = RuleProblem(self.file, cap_digits(label), cap_digits(field_), cap_digits(message))
        self.found.append((position, len(self.found), problem))

    def sorted(self) -> list[RuleProblem]:
        return [p for _, _, p in sorted(self.found, key=lambda t: t[:2])]


# Bounds on a rules file, so a hostile or broken one is reported instead of exhausting the
# stack (deep nesting), memory or time (aliases that expand exponentially: "billion laughs").
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 200_000  # after expanding aliases; a large routing.yaml has a few thousand


class _WrittenFloat(float):
    """A float of a rules file with the text it was written as (`2026.10`, read as 2026.1)."""

    written: str


class _PlainExponent(str):
    """Text of a rules file written unquoted that looks like a number in exponent form (1e5), which YAML 1.1
    reads as text: quoted, the same text is what its author meant."""


class _TooMuch(yaml.MarkedYAMLError):
    """Raised while composing; reported like any YAML error, with its line and column."""


class _Loader(yaml.SafeLoader):
    """SafeLoader (no Python tags: `!!python/object` is refused) that records duplicate
    mapping keys, since plain YAML keeps the last one, which would silently drop a condition
    or an owner field; and that bounds nesting and alias expansion."""

    def __init__(self, stream: bytes) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _TooMuch(problem=f"nested more than {MAX_YAML_DEPTH} levels deep",
                               problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return self.construct_document(node)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
            # PyYAML's constructors of explicit tags raise bare Python errors on a value they cannot
            # read (`!!float nope`, `!!bool foo`, `!!int ''`): report it where it is, like any YAML error.
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            value = f" {node.value!r}" if isinstance(node, yaml.ScalarNode) else ""
            # An integer of more digits than int() reads: say why, as its message does not echo the value.
            too_long = "integer string conversion" in str(exc)
            why = f": more than {sys.get_int_max_str_digits()} digits" if too_long else ""
            raise yaml.constructor.ConstructorError(
                problem=f"{tag} cannot hold{value}{why}", problem_mark=node.start_mark
            ) from exc

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep=deep)  # `!!map 3`: PyYAML's "expected a mapping node"
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)
                if key in seen:
                    self.duplicates.append((key_node.start_mark.line + 1, key_node.value))
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:
        # An impossible date such as 2027-13-01 makes PyYAML raise a bare ValueError; keep
        # the text instead, so the field that holds it reports the problem.
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError:
            return self.construct_scalar(node)


def _check_expansion(root: yaml.Node) -> None:
    """Count nodes as the constructed data will hold them, each alias expanded; stop early."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            if known < 0:
                raise _TooMuch(problem="an alias refers to the node that contains it", problem_mark=node.start_mark)
            return known
        sizes[id(node)] = -1  # in progress: seeing it again means a cycle
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(key) + size(value) for key, value in node.value)
        if total > MAX_YAML_NODES:
            raise _TooMuch(problem=f"expands to more than {MAX_YAML_NODES} values (aliases repeated inside aliases?)",
                           problem_mark=node.start_mark)
        sizes[id(node)] = total
        return total

    size(root)


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _Loader.construct_yaml_timestamp)


def _construct_float(loader: _Loader, node: yaml.ScalarNode) -> float:
    value = _WrittenFloat(yaml.SafeLoader.construct_yaml_float(loader, node))
    value.written = str(node.value)
    return value


_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _construct_str(loader: _Loader, node: yaml.ScalarNode) -> str:
    value = yaml.SafeLoader.construct_yaml_str(loader, node)
    # style None: a plain scalar, not quoted nor a block; the validated rules hold a plain str again.
    return _PlainExponent(value) if node.style is None and exponent_text(value) is not None else value


_Loader.add_constructor("tag:yaml.org,2002:str", _construct_str)


def _read(path: Path, out: _Problems, top_key: str) -> tuple[bytes, dict[str, Any] | None]:
    """File bytes (for the version hash) and its top-level mapping, or None with problems."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            out.add(-1, "-", "-", f"file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; is this a rules file?")
            return b"", None
        raw = path.read_bytes()
    except FileNotFoundError:
        # routing.yml is the likeliest way to miss the name: say it is there rather than only "not found".
        short = path.with_suffix(".yml")
        hint = f"; {short.name} is there: rename it to {path.name}" if short.is_file() else ""
        out.add(-1, "-", "-",
                f"not found in {path.parent}/ (a rules directory holds {ROUTING_FILE} and {OWNERS_FILE}){hint}")
        return b"", None
    except OSError as exc:
        out.add(-1, "-", "-", f"cannot read: {exc.strerror}")
        return b"", None
    loader: _Loader | None = None
    try:
        loader = _Loader(raw)  # reads the first bytes already: may raise a ReaderError
        data = loader.get_single_data()
    except yaml.reader.ReaderError as exc:
        # Bytes that do not decode (located by byte), or a control character (by character). Both
        # carry an int `character`; PyYAML names the codec of a decode error, "unicode" otherwise.
        if exc.encoding != "unicode":
            before: bytes | str = raw[: exc.position]
            what = f"the file is not {exc.encoding.upper()} text (byte 0x{exc.character:02x}: {exc.reason})"
        else:
            encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8"
            before = raw.decode(encoding, "replace")[: exc.position]
            what = f"character #x{exc.character:04x} is not allowed"
        newline = b"\n" if isinstance(before, bytes) else "\n"
        where = f"line {before.count(newline) + 1}, column {exc.position - before.rfind(newline)}"  # type: ignore[arg-type]
        out.add(-1, "-", where, f"invalid YAML: {what}")
        return raw, None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "-"
        problem = str(exc.problem or exc.context)
        if isinstance(exc, yaml.constructor.ConstructorError) and "constructor for the tag" in problem:
            # Safe loading: a tag such as !!python/object would run code under an unsafe loader.
            tag = problem.rsplit("tag ", 1)[-1]
            problem = f"tag {tag} is not allowed: rules files hold plain YAML data, loaded safely"
        out.add(-1, "-", where, f"invalid YAML: {problem}")
        return raw, None
    except yaml.YAMLError as exc:
        out.add(-1, "-", "-", f"invalid YAML: {exc}")
        return raw, None
    finally:
        if loader is not None:
            loader.dispose()
    for line, key in loader.duplicates:
        out.add(-1, "-", f"line {line}", f"duplicate key '{key}' (YAML would silently keep only the last one)")
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        out.add(-1, "-", "-", f"expected a mapping with '{top_key}:' at the top, got {got}")
        return raw, None
    return raw, data


def _labels(items: Any, key: str, prefix: str) -> list[str]:
    """How each list item is named in problems: its name/id if it has one, else "#n"."""
    labels = []
    for i, item in enumerate(items if isinstance(items, list) else []):
        value = item.get(key) if isinstance(item, dict) else None
        labels.append(f"{prefix}{value}" if isinstance(value, str) and value else f"{prefix}#{i + 1}")
    return labels


# Which model an "unknown key" sits in, by the shape of its location (list indices removed).
def _container(path: tuple[str, ...], in_item: bool, list_key: str) -> tuple[type[BaseModel], str]:
    if not in_item:
        if path[:1] == ("defaults",):
            return DefaultsSpec, "key"
        if path[:1] == ("context_sources",) and len(path) == 3:
            return ContextSourceSpec, "key"
        return (RoutingFile if list_key == "rules" else OwnersFile), "key"
    if list_key == "owners":
        return (WebhookSpec if path[:1] == ("webhook",) and len(path) == 2 else OwnerSpec), "key"
    if path[:1] == ("when",) and len(path) == 3:
        return RuleSpec, "operator"
    if path[:1] == ("owner",):
        return OwnerFromSpec, "key"
    return RuleSpec, "key"


def _unknown(what: str, name: str, allowed: Iterable[str]) -> str:
    """An unknown key or operator, with the close match a typo (`onwer:`) most likely meant."""
    allowed = list(allowed)
    close = close_match(name, allowed)
    hint = f" (did you mean '{close}'?)" if close is not None else ""
    return f"unknown {what} '{name}'{hint}; expected one of {', '.join(allowed)}"


def _message(error: Any, path: tuple[str, ...], in_item: bool, list_key: str) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        model, what = _container(path, in_item, list_key)
        if what == "operator":
            return _unknown("operator", path[-1], OPERATORS)
        return _unknown("key", path[-1], [f.alias or name for name, f in model.model_fields.items()])
    if kind == "missing":
        return "required"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping, got {value!r}"
    if kind == "owner_shape":  # a list too: `owner: [desk]` read "expected an owner id or ..." and no more
        return f"{error['msg']}, got {got_text(value)}"
    if kind == "literal_error":
        return f"expected {error['ctx']['expected']}, got {value!r}"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {value!r}"
    message = str(error["msg"])
    return f"{message}, got {value!r}" if not isinstance(value, (dict, list)) else message


def _validation_problems(exc: ValidationError, labels: list[str], list_key: str, out: _Problems) -> None:
    for error in exc.errors():
        loc = error["loc"]
        if list_key == "rules" and loc[:1] == ("models",) and len(loc) > 1:
            continue  # reported per model by _check_models
        in_item = len(loc) > 1 and loc[0] == list_key and isinstance(loc[1], int)
        rest = loc[2:] if in_item else loc
        # Drop list positions and pydantic's internal markers: the message quotes the value.
        path = tuple(str(p) for p in rest if not isinstance(p, int) and p not in OWNER_TAGS and p != "[key]")
        position = int(loc[1]) if in_item else -1
        label = labels[position] if in_item else "-"
        out.add(position, label, ".".join(path) or "-", _message(error, path, in_item, list_key))


def _str(item: Any, key: str) -> str | None:
    value = item.get(key) if isinstance(item, dict) else None
    return value if isinstance(value, str) else None


def _parse(model: type[BaseModel], item: Any) -> Any:
    """The item as `model`, or None: its own problems are reported by the whole-file validation."""
    try:
        return model.model_validate(item)
    except ValidationError:
        return None


def _loop(start: str, links: dict[str, str | None], ends: set[str]) -> list[str] | None:
    """The chain start -> ... -> start if following `links` from start comes back to it.

    `ends` holds the owners known to lead to the top of their chain (shared by the calls of one check):
    a walk stops there, so a deep chain is walked once, not once per owner (2,000 owners in one chain
    took half a minute).
    """
    chain, seen = [start], {start}
    while (nxt := links.get(chain[-1])) is not None and nxt not in seen and nxt not in ends:
        chain.append(nxt)
        seen.add(nxt)
    if nxt == start:
        return [*chain, start]
    if nxt is None or nxt in ends:  # not when it ran into a loop that start is not part of
        ends.update(chain)
    return None


def _check_owners(raw: list[Any], labels: list[str], out: _Problems, rules_dir: Path) -> None:
    """Duplicate ids, unknown managers and delegates, manager and delegate loops, email
    channel without email, away owners without a delegate.

    Works on the raw entries, so an owner with a typo elsewhere is still checked here.
    """
    first: dict[str, int] = {}
    managers: dict[str, str | None] = {}
    delegates: dict[str, str | None] = {}
    for i, item in enumerate(raw):
        oid = _str(item, "id")
        if oid is not None:
            if oid in first:
                out.add(i, labels[i], "id", f"duplicate id '{oid}': owners #{first[oid] + 1} and #{i + 1} both use it")
            first.setdefault(oid, i)
            managers.setdefault(oid, _str(item, "manager"))
            delegates.setdefault(oid, _str(item, "delegate"))
    reported: dict[str, set[str]] = {"manager": set(), "delegate": set()}
    ends: dict[str, set[str]] = {"manager": set(), "delegate": set()}
    for i, item in enumerate(raw):
        oid, manager, delegate = _str(item, "id"), _str(item, "manager"), _str(item, "delegate")
        if manager is not None and manager not in first:
            out.add(i, labels[i], "manager", f"'{manager}' is not in the owner directory{did_you_mean(manager, first)}")
        channels = item.get("channels") if isinstance(item, dict) else None
        if isinstance(channels, list) and "email" in channels and _str(item, "email") is None:
            out.add(i, labels[i], "channels", "channel 'email' needs an email address, and email is not set")
        webhook = item.get("webhook") if isinstance(item, dict) else None
        if isinstance(channels, list) and "webhook" in channels and webhook is None:
            out.add(i, labels[i], "channels", "channel 'webhook' needs webhook: {url: ...}, and webhook is not set")
        if webhook is not None and not (isinstance(channels, list) and "webhook" in channels):
            out.add(i, labels[i], "webhook", "webhook is configured but 'webhook' is not in channels")
        if isinstance(webhook, dict) and isinstance(webhook.get("secret_file"), str):
            secret_file = rules_dir / webhook["secret_file"]
            if not secret_file.is_file():
                out.add(i, labels[i], "webhook.secret_file", f"file not found: {webhook['secret_file']} (relative to {rules_dir})")
            else:
                try:  # as the webhook channel reads it at start, which disabled the channel of an unreadable one
                    read_secret_file(secret_file)
                except ValueError as exc:
                    out.add(i, labels[i], "webhook.secret_file", str(exc))
        if delegate is not None and delegate == oid:
            out.add(i, labels[i], "delegate", "an owner cannot be their own delegate")
        elif delegate is not None and delegate not in first:
            others = [known for known in first if known != oid]  # never suggest delegating to oneself
            out.add(i, labels[i], "delegate",
                    f"'{delegate}' is not in the owner directory{did_you_mean(delegate, others)}")
        if isinstance(item, dict) and item.get("away_until") is not None and item.get("delegate") is None:
            out.add(i, labels[i], "delegate", "away owners need a delegate, or alerts would go unread")
        if oid is None or first[oid] != i:
            continue
        for field_, links in (("manager", managers), ("delegate", delegates)):
            if oid in reported[field_] or (field_ == "delegate" and delegate == oid):  # self-delegation: reported above
                continue
            # Each loop is reported once, on its first owner in the file.
            if (loop := _loop(oid, links, ends[field_])) is not None:
                reported[field_].update(loop)
                out.add(i, labels[i], field_, f"{field_} chain loops: {' -> '.join(loop)}")


def _check_routing(data: dict[str, Any], labels: list[str], directory: set[str] | None, out: _Problems) -> None:
    """Names unique, owners known, deadlines ordered, a catch-all last and nothing after it.

    Works on the raw rules, so a rule with a typo elsewhere still gets these checks.
    """
    raw = data.get("rules") if isinstance(data.get("rules"), list) else []
    defaults = _parse(DefaultsSpec, data.get("defaults") or {})
    if defaults and defaults.ack_within > defaults.act_within:
        out.add(-1, "-", "defaults.ack_within", f"ack_within ({format_duration(defaults.ack_within)}) is longer than act_within "
                f"({format_duration(defaults.act_within)}): the action would be due before the acknowledgement")
    first_name: dict[str, int] = {}
    catch_all: int | None = None
    for i, item in enumerate(raw):
        item = item if isinstance(item, dict) else {}
        name = _str(item, "name")
        if name is not None:
            if name in first_name:
                out.add(i, labels[i], "name", f"duplicate name: rules #{first_name[name] + 1} and #{i + 1} are both called '{name}'")
            first_name.setdefault(name, i)
        if catch_all is not None:
            out.add(i, labels[i], "-", f"unreachable: rule {labels[catch_all]} (#{catch_all + 1}) above has when: {{}} "
                    "and no continue: true, so it takes every prediction first")
        elif item.get("when") == {} and item.get("continue") is not True:
            catch_all = i
        _check_owner_ref(item.get("owner"), i, labels[i], directory, out)
        _check_text_fields(item, i, labels[i], out)
        _check_deadlines(item, i, labels[i], defaults, out)
        _check_alert_only(item, i, labels[i], out)
    if not any(isinstance(item, dict) and item.get("when") == {} for item in raw):
        out.add(_END, "-", "rules", "no catch-all rule: some predictions could match no rule and go unowned; "
                "add a last rule with when: {} (for example owner: analytics-desk, action: record)")


# Prediction fields that are always text (the contract): a rule value YAML read as a number matches
# the text str(number) only, so `model_version: 2026.10` (the number 2026.1) never matched '2026.10'.
_TEXT_FIELDS = ("prediction_id", "model", "model_version", "entity_type", "entity_id")
_EQUALITIES = ("eq", "ne", "in", "not_in")


def _check_text_fields(item: dict[str, Any], i: int, label: str, out: _Problems) -> None:
    when = item.get("when")
    if not isinstance(when, dict):
        return
    for path, condition in when.items():
        operators = condition if isinstance(condition, dict) else {"eq": condition}
        for op in _EQUALITIES:
            given = operators.get(op)
            field_ = f"when.{path}" if operators is not condition else f"when.{path}.{op}"
            for value in given if isinstance(given, list) else [given]:
                if path not in _TEXT_FIELDS:
                    # Elsewhere text is legitimate (a code '1e5' in context), but this one was written as a number
                    # that YAML read as text: it never equals 100000. Quoted, it is text on purpose and loads.
                    if isinstance(value, _PlainExponent):
                        out.add(i, label, field_, f"{exponent_text(value)}, and the text {value.strip()!r} never "
                                f"equals a number: write the number so, or quote the text, '{value.strip()}'")
                        break
                elif isinstance(value, _WrittenFloat) and str(float(value)) != value.written.strip():
                    out.add(i, label, field_, f"YAML reads {value.written} as the number {float(value)!r}, which "
                            f"never equals the text {value.written!r} that {path} holds: quote it, '{value.written}'")
                    break


def _check_owner_ref(owner: Any, i: int, label: str, directory: set[str] | None, out: _Problems) -> None:
    named: list[tuple[str, Any]] = []
    if isinstance(owner, str):
        named.append(("owner", owner))
    elif isinstance(owner, dict) and "from" in owner:
        if owner.get("fallback") is None:
            out.add(i, label, "owner.fallback", "required with owner.from: the owner used when "
                    f"{owner['from']} is missing or names no one in the directory")
        else:
            named.append(("owner.fallback", owner["fallback"]))
    for field_, oid in named:
        # Skipped when owners.yaml is unreadable: every owner would be "unknown".
        if directory is not None and isinstance(oid, str) and oid not in directory:
            out.add(i, label, field_, f"'{oid}' is not in the owner directory{did_you_mean(oid, directory)}")


_ALERT_ONLY = {
    "cooldown": "cooldown only applies to action: alert; a record rule delivers nothing to hold back",
    "holdout": "holdout only applies to action: alert; a record rule delivers nothing to hold out",
}


def _check_alert_only(item: dict[str, Any], i: int, label: str, out: _Problems) -> None:
    if item.get("action") != "record":  # the default is alert; a bad action is reported already
        return
    for key, message in _ALERT_ONLY.items():
        if key in item:
            out.add(i, label, key, message)


def _check_deadlines(item: dict[str, Any], i: int, label: str, defaults: DefaultsSpec | None, out: _Problems) -> None:
    given = {key: item[key] for key in ("ack_within", "act_within") if key in item}
    own = _parse(DefaultsSpec, given) if given else None
    if own is None:
        return  # nothing set on the rule, or a bad duration that is reported already
    ack = own.ack_within if "ack_within" in given else (defaults.ack_within if defaults else None)
    act = own.act_within if "act_within" in given else (defaults.act_within if defaults else None)
    if ack is not None and act is not None and ack > act:
        field_ = "ack_within" if "ack_within" in given else "act_within"
        out.add(i, label, field_, f"ack_within ({format_duration(ack)}) is longer than act_within "
                f"({format_duration(act)}): the action would be due before the acknowledgement")


def _check_models(data: dict[str, Any], directory: set[str] | None, out: _Problems) -> None:
    """`models:` entries, each named "model <name>": shape, drift settings, owner in the directory.

    Reported after the rules. A top-level `models:` that is not a mapping is reported by the
    whole-file validation.
    """
    raw = data.get("models")
    if not isinstance(raw, dict):
        return
    for i, (name, item) in enumerate(raw.items()):
        position = _END + 1 + i
        if not isinstance(name, str) or not name.strip():
            out.add(position, f"model #{i + 1}", "-", f"a model name must be a non-empty string, got {got_text(name)}")
            continue
        label = f"model {name}"
        try:
            ModelSpec.model_validate(item)
        except ValidationError as exc:
            for error in exc.errors():
                path = tuple(str(p) for p in error["loc"] if not isinstance(p, int))
                if error["type"] == "extra_forbidden":
                    model = ModelDriftSpec if path[:1] == ("drift",) and len(path) == 2 else ModelSpec
                    message = _unknown("key", path[-1], list(model.model_fields))
                else:
                    message = _message(error, path, True, "rules")
                out.add(position, label, ".".join(path) or "-", message)
        owner = _str(item, "owner")
        # Skipped when owners.yaml is unreadable: every owner would be "unknown".
        if directory is not None and owner is not None and owner not in directory:
            out.add(position, label, "owner",
                    f"'{owner}' is not in the owner directory{did_you_mean(owner, directory)}")


def _check_lookups(data: dict[str, Any], labels: list[str], out: _Problems) -> None:
    """Every lookup.<source>.<field> a rule uses (in when, context or owner.from) names a
    source declared under context_sources.

    Works on the raw rules and source names, so a declared source with a problem of its own
    is still declared here: its problem is reported once, on the source.
    """
    sources = data.get("context_sources")
    declared = [name for name in sources if isinstance(name, str)] if isinstance(sources, dict) else []
    for i, item in enumerate(data.get("rules") if isinstance(data.get("rules"), list) else []):
        if not isinstance(item, dict):
            continue
        used: list[tuple[str, Any]] = []
        if isinstance(item.get("when"), dict):
            used += [(f"when.{path}", path) for path in item["when"]]
        if isinstance(item.get("owner"), dict):
            used.append(("owner.from", item["owner"].get("from")))
        if isinstance(item.get("context"), list):
            used += [("context", path) for path in item["context"]]
        reported: set[tuple[str, str]] = set()
        for field_, path in used:
            parts = path.split(".") if isinstance(path, str) else []
            if len(parts) < 3 or parts[0] != LOOKUP or not parts[1]:
                continue  # not a lookup, or a malformed path that spec.py reports
            source = parts[1]
            if source not in declared and (field_, source) not in reported:
                reported.add((field_, source))
                out.add(i, labels[i], field_, f"context source '{source}' is not declared in context_sources"
                        f"{did_you_mean(source, declared)}")


def version_of(routing: bytes, owners: bytes) -> str:
    """The rules version: first 12 hex characters of sha256(routing.yaml + b"\0" + owners.yaml)."""
    return hashlib.sha256(routing + b"\0" + owners).hexdigest()[:12]


@dataclass(frozen=True)
class LoadAttempt:
    """One read of a rules directory: the rule set when it is valid, else its problems.
    `version` hashes the bytes read either way (missing files count as empty)."""

    ruleset: RuleSet | None
    problems: list[RuleProblem]
    version: str


def _load(rules_dir: Path) -> tuple[RuleSet | None, list[RuleProblem]]:
    attempt = attempt_load(rules_dir)
    return attempt.ruleset, attempt.problems


def attempt_load(rules_dir: Path | str) -> LoadAttempt:
    rules_dir = Path(rules_dir)
    if rules_dir.is_file():
        # `rules check rules/routing.yaml`: one problem saying so, not "routing.yaml/routing.yaml: cannot read".
        problem = RuleProblem(str(rules_dir), "-", "-", f"is a file: give the rules directory ({rules_dir.parent})")
        return LoadAttempt(None, [problem], version_of(b"", b""))
    base = rules_dir.resolve().name or str(rules_dir)
    routing_out = _Problems(f"{base}/{ROUTING_FILE}")
    owners_out = _Problems(f"{base}/{OWNERS_FILE}")

    owners_bytes, owners_data = _read(rules_dir / OWNERS_FILE, owners_out, "owners")
    owner_specs: list[OwnerSpec] = []
    directory: set[str] | None = None
    if owners_data is not None:
        labels = _labels(owners_data.get("owners"), "id", "owner ")
        try:
            OwnersFile.model_validate(owners_data)
        except ValidationError as exc:
            _validation_problems(exc, labels, "owners", owners_out)
        raw_owners = owners_data.get("owners") if isinstance(owners_data.get("owners"), list) else None
        if raw_owners is not None:
            _check_owners(raw_owners, labels, owners_out, rules_dir)
            owner_specs = [spec for spec in (_parse(OwnerSpec, o) for o in raw_owners) if spec is not None]
            directory = {oid for oid in (_str(o, "id") for o in raw_owners) if oid is not None}

    routing_bytes, routing_data = _read(rules_dir / ROUTING_FILE, routing_out, "rules")
    routing: RoutingFile | None = None
    if routing_data is not None:
        labels = _labels(routing_data.get("rules"), "name", "")
        try:
            routing = RoutingFile.model_validate(routing_data)
        except ValidationError as exc:
            _validation_problems(exc, labels, "rules", routing_out)
        _check_routing(routing_data, labels, directory, routing_out)
        _check_models(routing_data, directory, routing_out)
        _check_lookups(routing_data, labels, routing_out)

    problems = routing_out.sorted() + owners_out.sorted()
    version = version_of(routing_bytes, owners_bytes)
    if problems or routing is None:
        return LoadAttempt(None, problems, version)
    return LoadAttempt(build_ruleset(routing, owner_specs, version=version, source_dir=rules_dir), [], version)

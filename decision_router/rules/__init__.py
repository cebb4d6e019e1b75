"""Routing rules and the owner directory: load, check and compile `rules/*.yaml`.

The format is documented in docs/rules.md.
"""

from typing import TYPE_CHECKING, Any

from decision_router.rules.compile import (
    MISSING,
    CompiledRule,
    ContextSource,
    DriftConfig,
    ModelConfig,
    Owner,
    RuleSet,
    lookup,
)
from decision_router.rules.load import RuleProblem, RulesInvalid, check_rules, load_rules

if TYPE_CHECKING:
    from decision_router.rules.watch import RulesWatcher

__all__ = [
    "MISSING",
    "CompiledRule",
    "ContextSource",
    "DriftConfig",
    "ModelConfig",
    "Owner",
    "RuleProblem",
    "RuleSet",
    "RulesInvalid",
    "RulesWatcher",
    "check_rules",
    "load_rules",
    "lookup",
]


def __getattr__(name: str) -> Any:
    # RulesWatcher (hot reload) is only for the service; imported on first use, as it pulls in structlog,
    # which `rules check` and the stats commands' loading of the rules do not otherwise need.
    if name == "RulesWatcher":
        from decision_router.rules.watch import RulesWatcher

        return RulesWatcher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

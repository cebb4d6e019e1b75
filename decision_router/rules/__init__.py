"""Routing rules and the owner directory: load, check and compile `rules/*.yaml`.

The format is documented in docs/rules.md.
"""

from decision_router.rules.compile import MISSING, CompiledRule, ContextSource, DriftConfig, ModelConfig, Owner, RuleSet, lookup
from decision_router.rules.load import RuleProblem, RulesInvalid, check_rules, load_rules
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

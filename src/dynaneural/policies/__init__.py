"""Decision machinery shared by every dynamic model."""

from dynaneural.policies.exit_rules import (
    EXIT_RULES,
    ConfidenceRule,
    EntropyRule,
    ExitPolicyHead,
    ExitRule,
    LearnedRule,
    PatienceRule,
    create_exit_rule,
)

__all__ = ["EXIT_RULES", "ConfidenceRule", "EntropyRule", "ExitPolicyHead", "ExitRule", "LearnedRule",
           "PatienceRule", "create_exit_rule"]

"""Decision machinery shared by every dynamic model: exit rules, relaxations, REINFORCE, budget losses."""

from dynaneural.policies.budget import BudgetLoss
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
from dynaneural.policies.reinforce import PolicySample, ReinforceLoss, sample_bernoulli, sample_categorical
from dynaneural.policies.relaxations import (
    Decision,
    TemperatureSchedule,
    binary_decision,
    categorical_decision,
    gumbel_sigmoid,
    gumbel_softmax,
    straight_through,
)

__all__ = ["EXIT_RULES", "BudgetLoss", "ConfidenceRule", "Decision", "EntropyRule", "ExitPolicyHead", "ExitRule",
           "LearnedRule", "PatienceRule", "PolicySample", "ReinforceLoss", "TemperatureSchedule",
           "binary_decision", "categorical_decision", "create_exit_rule", "gumbel_sigmoid", "gumbel_softmax",
           "sample_bernoulli", "sample_categorical", "straight_through"]

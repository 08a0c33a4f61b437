"""Halting: ponder a step function for a learned, per-sample number of steps (ACT, PonderNet)."""

from dynaneural.sample_wise.halting import act, pondernet  # noqa: F401  (register the models)
from dynaneural.sample_wise.halting.act import AdaptiveComputationTime, act_halting, calibrate_act_eps
from dynaneural.sample_wise.halting.pondernet import (
    PonderNet,
    PonderNetLoss,
    calibrate_pondernet_threshold,
    geometric_prior,
    halting_distribution,
    kl_to_geometric,
)
from dynaneural.sample_wise.halting.steps import PonderBody, RecurrentBody, ResidualBody

__all__ = ["AdaptiveComputationTime", "PonderBody", "PonderNet", "PonderNetLoss", "RecurrentBody", "ResidualBody",
           "act_halting", "calibrate_act_eps", "calibrate_pondernet_threshold", "geometric_prior",
           "halting_distribution", "kl_to_geometric"]

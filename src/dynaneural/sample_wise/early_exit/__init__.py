"""Early exiting (dynamic depth): multi-exit networks, cascades, exit rules."""

from dynaneural.sample_wise.early_exit import (  # noqa: F401  (registers models)
    cascade,
    exit_convnet,
    exit_vit,
    msdnet,
    sdn_resnet,
)
from dynaneural.sample_wise.early_exit.multi_exit import ExitCostProfile, MultiExitNetwork, StaticChain

__all__ = ["MultiExitNetwork", "ExitCostProfile", "StaticChain"]

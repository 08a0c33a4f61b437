"""Early exiting (dynamic depth): multi-exit networks, cascades, exit rules."""

from dynaneural.sample_wise.early_exit import cascade, exit_convnet, msdnet, sdn_resnet  # noqa: F401  (registers models)
from dynaneural.sample_wise.early_exit.multi_exit import ExitCostProfile, MultiExitNetwork, StaticChain

__all__ = ["MultiExitNetwork", "ExitCostProfile", "StaticChain"]

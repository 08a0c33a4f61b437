"""Layer skipping (dynamic depth): per-sample gates or a policy network decide which residual blocks run.

:mod:`~dynaneural.sample_wise.layer_skip.base` runs a ResNet with skipped blocks in the three modes (execute mode
gathers the rows that run a block); one file per method: SkipNet, ConvNet-AIG, BlockDrop.
"""

from dynaneural.sample_wise.layer_skip import blockdrop, convnet_aig, skipnet  # noqa: F401  (registers models)
from dynaneural.sample_wise.layer_skip.base import (
    LayerSkipNetwork,
    LayerSkipOutput,
    SkipCosts,
    block_usage_by_class,
    plot_block_usage,
)
from dynaneural.sample_wise.layer_skip.blockdrop import (
    BlockDrop,
    blockdrop_joint_loss,
    blockdrop_reward,
    curriculum_free_gates,
    train_blockdrop_policy,
)
from dynaneural.sample_wise.layer_skip.convnet_aig import ConvNetAIG
from dynaneural.sample_wise.layer_skip.skipnet import SkipNet, skipnet_hybrid_loss

__all__ = ["BlockDrop", "ConvNetAIG", "LayerSkipNetwork", "LayerSkipOutput", "SkipCosts", "SkipNet",
           "block_usage_by_class", "blockdrop_joint_loss", "blockdrop_reward", "curriculum_free_gates", "plot_block_usage",
           "skipnet_hybrid_loss", "train_blockdrop_policy"]

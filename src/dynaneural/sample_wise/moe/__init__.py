"""Mixture-of-experts: token-level MoE feed-forward layers (top-k and expert-choice routing, capacity, sorted
dispatch), MoE classifiers (MLP, Transformer encoder, CNN with patch-level MoE blocks) and expert parallelism on
torch.distributed."""

from dynaneural.sample_wise.moe import moe_convnet, moe_mlp, moe_transformer  # noqa: F401  (registers the models)
from dynaneural.sample_wise.moe.moe_convnet import MoEConvNet, MoEConvNetConfig
from dynaneural.sample_wise.moe.moe_layer import (
    DenseMixtureFFN,
    MoEFeedForward,
    MoEModelOutput,
    MoEResult,
    Routing,
    SwiGLU,
    load_balancing_loss,
    router_z_loss,
)
from dynaneural.sample_wise.moe.moe_mlp import MoEMLP, MoEMLPConfig
from dynaneural.sample_wise.moe.moe_transformer import MoETransformer, MoETransformerConfig

__all__ = ["DenseMixtureFFN", "MoEConvNet", "MoEConvNetConfig", "MoEFeedForward", "MoEMLP", "MoEMLPConfig",
           "MoEModelOutput", "MoEResult",
           "MoETransformer", "MoETransformerConfig", "Routing", "SwiGLU", "load_balancing_loss", "router_z_loss"]

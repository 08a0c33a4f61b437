"""Sparse upcycling: a mixture-of-experts model initialised from its trained dense twin.

Paper: A. Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints", ICLR 2023,
arXiv:2212.05055. Every weight of the dense model is carried over; each MoE layer's single expert (the dense
feed-forward layer) is copied into all ``num_experts`` experts, and the routers start fresh. The experts then
diverge during continued training as the routers learn to dispatch tokens.

The upcycled layers combine their top-k experts with straight-through weights (``MoEFeedForward``'s
``straight_through_weights``): forward, the renormalised top-k probabilities, which sum to one, so with identical
experts the upcycled model computes *exactly* the dense model's function at any k; backward, the raw probabilities'
gradient, so the routers learn (with plain renormalised top-1 weights, always 1, they would get no gradient from the
task). With ``top_k=1`` each token runs one expert of the dense layer's width: the same active FLOPs as the dense
model, plus the router.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dynaneural.sample_wise.moe.moe_layer import MoEFeedForward

__all__ = ["upcycle"]


def upcycle(dense: nn.Module, *, num_experts: int, top_k: int = 1, seed: int | None = None) -> nn.Module:
    """The MoE model of ``dense``'s architecture with ``num_experts`` copies of each dense feed-forward layer.

    Args:
        dense: a model of this package's MoE stacks (``MoEConvNet``, ``MoEMLP``, ``MoETransformer``) built with one
            expert per MoE layer, i.e. a dense SwiGLU feed-forward layer (the moe-accuracy bench's dense twin).
        num_experts: experts per upcycled layer (≥ 2).
        top_k: experts per token; 1 keeps the dense model's active FLOPs.
        seed: seeds the fresh routers (default: the global RNG).

    Returns:
        A new model on ``dense``'s device and dtype, in its train/eval mode, computing the same outputs as
        ``dense`` until it is trained.
    """
    layers = getattr(dense, "moe_layers", None)
    cfg = getattr(dense, "config", None)
    if not callable(layers) or not dataclasses.is_dataclass(cfg) or not hasattr(cfg, "straight_through_weights"):
        raise TypeError(f"upcycle needs a model of the MoE stacks (MoEConvNet, MoEMLP, MoETransformer), got "
                        f"{type(dense).__name__}")
    if any(m.num_experts != 1 for m in layers()):
        raise ValueError("upcycle starts from a dense model: every MoE layer must have num_experts=1, got "
                         f"{[m.num_experts for m in layers()]}")
    if num_experts < 2:
        raise ValueError(f"num_experts must be >= 2, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if getattr(cfg, "routing", "top_k") != "top_k":
        raise ValueError("upcycle builds top-k routed layers; the dense model's routing must be 'top_k'")
    new_cfg = dataclasses.replace(cfg, num_experts=num_experts, top_k=top_k, straight_through_weights=True)
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = type(dense)(new_cfg)
    param = next(dense.parameters())
    model.to(device=param.device, dtype=param.dtype)
    src = dense.state_dict()
    state = model.state_dict()
    experts = {f"{name}.{w}" for name, m in model.named_modules() if isinstance(m, MoEFeedForward)
               for w in ("w_gate_up", "w_down")}
    routers = {f"{name}.router.weight" for name, m in model.named_modules() if isinstance(m, MoEFeedForward)}
    for key, value in state.items():
        if key in routers:
            continue  # a fresh router: the dense one has a single, meaningless logit
        if key in experts:
            value.copy_(src[key].expand_as(value))
        else:
            value.copy_(src[key])
    model.load_state_dict(state)
    return model.train(dense.training)

"""Static, generic building blocks shared by the model families."""

from dynaneural.layers.blocks import ConvBNAct, PooledLinearHead

__all__ = ["ConvBNAct", "PooledLinearHead"]

"""Static, generic building blocks shared by the model families."""

from dynaneural.layers.blocks import ConvBNAct, PooledLinearHead
from dynaneural.layers.fuse import fold_batch_norms

__all__ = ["ConvBNAct", "PooledLinearHead", "fold_batch_norms"]

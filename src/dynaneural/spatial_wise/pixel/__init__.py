"""Pixel-level spatially dynamic networks: sparse convolution at active positions (``sparse_conv``), block-sparse
tiles (SBNet), spatially gated residual blocks (DynConv) and spatially adaptive computation time (SACT)."""

from dynaneural.spatial_wise.pixel import dynconv, sact, sbnet  # noqa: F401  (registers the models)

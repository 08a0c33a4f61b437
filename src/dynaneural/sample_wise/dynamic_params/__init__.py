"""Dynamic parameters (CondConv, dynamic convolution, hypernetworks, squeeze-excitation) and cross-layer dynamic
connections (a gated dense block)."""

from dynaneural.sample_wise.dynamic_params import (  # noqa: F401  (registers their models)
    condconv,
    dynamic_conv,
    gated_dense,
    hypernetwork,
    squeeze_excite,
)

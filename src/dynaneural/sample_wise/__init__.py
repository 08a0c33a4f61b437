"""Sample-wise dynamic networks: each sample gets its own depth, width or parameters."""

from dynaneural.sample_wise import (  # noqa: F401  (imports every method module)
    dynamic_params,
    dynamic_width,
    early_exit,
    halting,
    layer_skip,
    moe,
)

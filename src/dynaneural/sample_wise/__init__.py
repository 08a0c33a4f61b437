"""Sample-wise dynamic networks: each sample gets its own depth, width or parameters."""

from dynaneural.sample_wise import early_exit  # noqa: F401

"""Dynamic width: per-sample channel gating (FBS) and per-sample width levels (slimmable networks)."""

from dynaneural.sample_wise.dynamic_width import (
    channel_gating,  # noqa: F401  (registers its models)
    slimmable,  # noqa: F401
)

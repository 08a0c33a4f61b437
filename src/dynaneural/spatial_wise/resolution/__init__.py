"""Resolution-level spatial dynamics: resolution-adaptive networks (RANet) that look at low resolution first."""

from dynaneural.spatial_wise.resolution import ranet  # noqa: F401

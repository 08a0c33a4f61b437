"""Spatial-wise dynamic networks: computation spent on chosen pixels, regions, resolutions or tokens."""

from dynaneural.spatial_wise import deformable, pixel, region, resolution, token  # noqa: F401

"""Region-level spatial dynamics: glance and focus (GFNet) and a spatial-transformer region selector."""

from dynaneural.spatial_wise.region import gfnet, stn  # noqa: F401

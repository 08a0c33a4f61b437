"""Token-level spatial dynamics on a small ViT: per-sample pruning (DynamicViT), per-token halting (A-ViT) and
token merging (ToMe), executed on packed ragged token sets (see :mod:`dynaneural.spatial_wise.token.vit`)."""

from dynaneural.spatial_wise.token import avit, dynamicvit, tome  # noqa: F401

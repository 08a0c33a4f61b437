"""Deformable convolution (v1/v2, our own op) and ResNets of dynamic residual blocks built on it."""

from dynaneural.spatial_wise.deformable import deform_conv  # noqa: F401  (registers the models)

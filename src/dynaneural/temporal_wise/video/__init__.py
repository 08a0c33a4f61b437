"""Video methods: adaptive frame selection (AdaFrame) and early exit over frames, on moving-digits clips."""

from dynaneural.temporal_wise.video import adaframe, frame_exit  # noqa: F401

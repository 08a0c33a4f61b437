"""Checkpoint folders for benchmark trainings: resumable when cut, reused when run again with the same settings.

A benchmark trains several networks before it times anything. Each training checkpoints into
``<root>/<tag>-<digest>``, where the digest covers everything that determines its result (model, data, training
settings, the weights it starts from). The trainer resumes from the folder's ``last.safetensors``, so a cut run
continues where it stopped and a finished one is loaded instead of retrained: re-timing after a change to an
execute path costs no training. Change any setting and the digest, hence the folder, changes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["run_digest", "training_dir"]


def run_digest(*parts: Any) -> str:
    """A short, stable digest of JSON-able settings (dict order does not matter)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def training_dir(root: str | Path | None, tag: str, *parts: Any) -> Path | None:
    """``<root>/checkpoints/<tag>-<digest of parts>``, or None without a root (no checkpoints kept)."""
    return Path(root) / "checkpoints" / f"{tag}-{run_digest(*parts)}" if root is not None else None

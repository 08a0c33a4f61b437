import os
from pathlib import Path

import pytest
import torch

# The shared data folder sits beside the repository (../shared/data); CI's clean clone has it too.
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if "DYNANEURAL_DATA" not in os.environ and _SHARED.is_dir():
    os.environ["DYNANEURAL_DATA"] = str(_SHARED)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield

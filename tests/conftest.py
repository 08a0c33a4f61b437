import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# The shared data folder sits beside the repository (../shared/data); CI's clean clone has it too.
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if "DYNANEURAL_DATA" not in os.environ and _SHARED.is_dir():
    os.environ["DYNANEURAL_DATA"] = str(_SHARED)


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    """Seed every test, and run the tiny test models on one intra-op thread.

    Their ops take microseconds, so a parallel region only adds a barrier; on shared cores that barrier waits for a
    descheduled second thread, and a 4 ms forward/backward took 1 s (measured on the 2-core CI machine).
    """
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

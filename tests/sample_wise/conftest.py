"""Shared fixtures of the sample-wise tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run the tiny test models on one intra-op thread.

    Their ops take microseconds, so a parallel region only adds a barrier; on shared cores that barrier waits for a
    descheduled second thread, and a 4 ms forward/backward took 1 s (measured on the 2-core CI machine).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

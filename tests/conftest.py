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


@pytest.fixture
def tiny_mnist(monkeypatch):
    """Replace ``dynaneural.data.load_dataset`` with tiny 28×28, 3-class synthetic splits (learnable: the class
    shifts the pixel mean), so a recipe-driven benchmark runs end to end in seconds. Call it with the split sizes
    to install it: ``tiny_mnist(train=64, val=32, test=32)``."""
    from types import SimpleNamespace

    import dynaneural.data

    def install(*, train: int = 64, val: int = 32, test: int = 32) -> None:
        def load(*args, **kwargs):
            g = torch.Generator().manual_seed(0)

            def split(n):
                y = torch.arange(n) % 3
                return torch.randn(n, 1, 28, 28, generator=g) + y.view(n, 1, 1, 1).float(), y

            (tx, ty), (vx, vy), (sx, sy) = split(train), split(val), split(test)
            return SimpleNamespace(train_x=tx, train_y=ty, val_x=vx, val_y=vy, test_x=sx, test_y=sy, num_classes=3)

        monkeypatch.setattr(dynaneural.data, "load_dataset", load)

    return install


@pytest.fixture
def fvcore_macs():
    """The independent counter: fvcore's multiply-accumulates per sample of ``model(*inputs)``. fvcore has no
    rule for fused attention (``scaled_dot_product_attention``), so one is given here from the shapes alone:
    q·kᵀ and the weighted sum of v, B·H·Nq·Nk·dh MACs each. Skips where fvcore is not installed."""
    import warnings

    fvcore_nn = pytest.importorskip("fvcore.nn")

    def sdpa(inputs, outputs):
        q, k = (fvcore_nn.jit_handles.get_shape(v) for v in inputs[:2])
        return 2 * q[0] * q[1] * q[2] * k[2] * q[3]

    def count(model, *inputs: torch.Tensor) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = fvcore_nn.FlopCountAnalysis(model, inputs)
            analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            return float(analysis.total()) / inputs[0].shape[0]

    return count

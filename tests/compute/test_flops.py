"""Analytic FLOPs against an independent counter (fvcore), and hand-computed formulas."""


import pytest
import torch
from torch import nn

import dynaneural as dn
from dynaneural.compute import CostLedger, count_flops


class _ConvZoo(nn.Module):
    """Groups, stride, dilation, padding, depthwise, 1×1, batch norm, adaptive pooling, linear."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=2, dilation=2, groups=32, bias=False),
            nn.Conv2d(32, 64, 1), nn.Conv2d(64, 64, (5, 3), stride=(2, 1), padding=(0, 1)),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )

    def forward(self, x):
        return self.net(x)


class _TinyTransformer(nn.Module):
    """Embedding, layer norm, multi-head self-attention, MLP."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(16, 32)
        self.ln1 = nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ln2 = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        h = self.emb(x)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=True)[0]  # need_weights: the unfused path fvcore can trace
        h = h + self.mlp(self.ln2(h))
        return self.fc(h.mean(1))


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.LayerNorm(256), nn.ReLU(), nn.Linear(256, 10))


NETWORKS = {
    "conv_zoo": (_ConvZoo, (2, 3, 32, 32)),
    "transformer": (_TinyTransformer, (2, 20, 16)),
    "mlp": (_mlp, (2, 1, 28, 28)),
    "exit_convnet_mnist_static": (lambda: dn.create_model("exit_convnet_mnist", exits="last").to_static(),
                                  (2, 1, 28, 28)),
    "exit_vit_mnist_static": (lambda: dn.create_model("exit_vit_mnist", exits="last").to_static(), (2, 1, 28, 28)),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_static_flops_match_fvcore(name, fvcore_macs):
    build, shape = NETWORKS[name]
    model = build().eval()
    x = torch.randn(*shape)
    ours = count_flops(model, x).total
    theirs = fvcore_macs(model, x)
    assert ours == pytest.approx(theirs, rel=0.01), (ours, theirs)


def test_conv_formula_by_hand():
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=1, groups=4)
    # out 12 × 5 × 5 (from 9×9), each output a dot product of (8/4)·3·3 = 18 inputs
    assert count_flops(conv, torch.randn(3, 8, 9, 9)).total == 12 * 5 * 5 * 18


def test_rnn_formulas_by_hand():
    lstm = nn.LSTM(8, 16, num_layers=2)
    t, b = 7, 3
    per_step = 4 * 16 * (8 + 16) + 4 * 16 * (16 + 16)
    assert count_flops(lstm, torch.randn(t, b, 8), batch_size=b).total == t * per_step
    gru_cell = nn.GRUCell(8, 16)
    assert count_flops(gru_cell, torch.randn(b, 8)).total == 3 * 16 * (8 + 16)


def test_unknown_parameterised_module_is_an_error():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    with pytest.raises(NotImplementedError, match="no FLOPs rule"):
        count_flops(Odd(), torch.randn(2, 3))


def test_ledger_charges_only_given_rows():
    ledger = CostLedger.zeros(5, track_parts=True)
    ledger.charge(10.0)
    ledger.charge(3.0, torch.tensor([1, 4]), part="stage1")
    assert ledger.flops.tolist() == [10, 13, 10, 10, 13]
    assert ledger.by_part["stage1"].tolist() == [0, 3, 0, 0, 3]

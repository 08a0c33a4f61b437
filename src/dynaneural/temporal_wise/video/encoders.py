"""Static pieces shared by the temporal models of this package: a per-frame CNN, a recurrent memory whose weights
serve both a fused ``nn.LSTM`` (every step of every sample at once) and a per-step cell (a compacted sub-batch),
and the static twin that reads every step with the fused kernel.

The fused ``nn.LSTM`` is the fastest static way to run an LSTM over a whole sequence, so it is the honest
baseline: the static twin uses it, and dynamic models call ``torch.lstm_cell`` with the *same* parameters on the
rows that still need a step (``RecurrentMemory.step``).
"""

from __future__ import annotations

import torch
from torch import nn

from dynaneural.layers import ConvBNAct
from dynaneural.layers.lstm import LSTMStep

__all__ = ["FrameEncoder", "RecurrentMemory", "StaticRecurrentClassifier", "lstm_step_flops"]


def lstm_step_flops(input_size: int, hidden_size: int) -> float:
    """MACs of one LSTM step for one sample (the four gate matrices; the convention of ``compute/flops.py``)."""
    return float(4 * hidden_size * (input_size + hidden_size))


class FrameEncoder(nn.Module):
    """A small per-frame CNN: ``len(widths)`` stride-2 conv-BN-ReLU layers, global average pool → (N, widths[-1]).

    Args:
        in_chans: channels of a frame.
        widths: channels of each layer (each halves the resolution).
    """

    def __init__(self, *, in_chans: int = 1, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_chans
        for w in widths:
            layers.append(ConvBNAct(prev, w, stride=2))
            prev = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, F)
        return self.pool(self.features(x)).flatten(1)


class RecurrentMemory(nn.Module):
    """A one-layer LSTM used two ways with one set of weights.

    ``forward(seq)`` runs PyTorch's fused kernel over (B, S, F) and returns every hidden state (B, S, H);
    ``step(x, (h, c))`` advances only the rows given, on the same parameters: ``torch.lstm_cell`` with autograd,
    :class:`~dynaneural.layers.lstm.LSTMStep`'s one-GEMM step (cached stacked, packed weights) in inference.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.input_size, self.hidden_size = input_size, hidden_size
        self._step = LSTMStep(self.lstm)

    @property
    def step_flops(self) -> float:
        return lstm_step_flops(self.input_size, self.hidden_size)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:  # (B, S, F) -> (B, S, H)
        return self.lstm(seq)[0]

    def zeros(self, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = like.new_zeros(n, self.hidden_size)
        return z, z

    def step(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One step for the rows of ``x`` (n, F); ``state`` is (h, c), each (n, H)."""
        return self._step(x, state)


class StaticRecurrentClassifier(nn.Module):
    """The static twin of the recurrent dynamic models: encode every step at once (one batched call over B·S
    inputs), run the fused LSTM over all steps, classify the last hidden state. Shares its modules with the
    dynamic model it came from.

    Args:
        encoder: maps (B·S, *step_shape) to (B·S, F).
        memory: the recurrent memory.
        classifier: maps (B, H) to logits.
        steps: S, the number of steps a sample is split into.
        step_shape: the shape of one step's input.
    """

    def __init__(self, encoder: nn.Module, memory: RecurrentMemory, classifier: nn.Module, *, steps: int,
                 step_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.encoder, self.memory, self.classifier = encoder, memory, classifier
        self.steps, self.step_shape = int(steps), tuple(step_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        feats = self.encoder(x.reshape(b * self.steps, *self.step_shape)).view(b, self.steps, -1)  # (B, S, F)
        return self.classifier(self.memory(feats)[:, -1])

"""Pieces shared by the sequence methods: the input encoder, the static recurrent twin, cell FLOPs, checks.

Every sequence model of this package reads either token ids ``(B, T)`` (``input_dtype = torch.long``, through a
:class:`TokenEmbedding`) or float feature sequences ``(B, T, F)``, runs one recurrent layer (LSTM or GRU) and
classifies from the final hidden state. Their static twin is :class:`StaticRecurrentClassifier`: the same
embedding, PyTorch's fused ``nn.LSTM`` / ``nn.GRU`` (the fastest static implementation on CPU and GPU) and the
same linear head, sharing the weights.

FLOPs follow :mod:`dynaneural.compute.flops`: one recurrent cell step costs ``gates * H * (F + H)`` MACs (4 gates
for the LSTM, 3 for the GRU), an embedding lookup 0, a linear layer its MACs.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

from dynaneural.contract import AllOnFlag, DynamicModel
from dynaneural.layers.lstm import LSTMStep
from dynaneural.validation import check_batch, check_token_batch

__all__ = ["CellKind", "RecurrentBackbone", "StaticRecurrentClassifier", "TokenEmbedding", "cell_flops",
           "check_sequence_batch"]

CellKind = Literal["lstm", "gru"]
_GATES = {"lstm": 4, "gru": 3}


def cell_flops(kind: str, input_size: int, hidden_size: int) -> int:
    """MACs of one recurrent cell step for one sample (the gate matrices; the rule of ``compute.flops``)."""
    if kind not in _GATES:
        raise ValueError(f"cell must be 'lstm' or 'gru', got {kind!r}")
    return _GATES[kind] * hidden_size * (input_size + hidden_size)


class TokenEmbedding(nn.Embedding):
    """An ``nn.Embedding`` that tells the FLOPs counter it costs nothing (a table lookup, no multiply-add).

    A subclass with its own ``flops`` method rather than a global rule for ``nn.Embedding``, so that no other
    package's rule for that type can clash with this one.
    """

    def flops(self, inputs: tuple[Any, ...], output: Any) -> float:  # noqa: ARG002 - counter interface
        return 0.0


class RecurrentBackbone(nn.Module):
    """Embedding (token inputs) + one recurrent layer (``nn.LSTM``/``nn.GRU``, batch first) + linear head.

    The dynamic models keep their weights in these very modules, so the static twin is a copy of them and
    execute mode reads ``rnn.weight_ih_l0`` & co. for its per-step compact cells.

    Args:
        cell: ``"lstm"`` or ``"gru"``.
        hidden_size: state size H.
        num_classes: classes of the head.
        vocab_size: token inputs: vocabulary size (an embedding of ``embed_dim`` is built); None for features.
        embed_dim: embedding size (token inputs).
        input_size: feature size F (feature inputs).
        padding_idx: embedding row kept at zero (token inputs).
    """

    def __init__(self, *, cell: CellKind, hidden_size: int, num_classes: int, vocab_size: int | None = None,
                 embed_dim: int = 64, input_size: int | None = None, padding_idx: int | None = 0) -> None:
        super().__init__()
        if cell not in _GATES:
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        if (vocab_size is None) == (input_size is None):
            raise ValueError("give exactly one of vocab_size (token inputs) or input_size (feature inputs)")
        for name, v in (("hidden_size", hidden_size), ("num_classes", num_classes), ("embed_dim", embed_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.cell = cell
        self.hidden_size = hidden_size
        self.embed = TokenEmbedding(vocab_size, embed_dim, padding_idx=padding_idx) if vocab_size else None
        self.feature_size = embed_dim if vocab_size else int(input_size)  # type: ignore[arg-type]
        rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(self.feature_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)
        self._lstm_step = LSTMStep(self.rnn) if cell == "lstm" else None

    @property
    def step_flops(self) -> int:
        """MACs of one cell step for one sample."""
        return cell_flops(self.cell, self.feature_size, self.hidden_size)

    @property
    def head_flops(self) -> int:
        return self.head.in_features * self.head.out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) ids or (B, T, F) features -> (B, T, F) floats."""
        return self.embed(x) if self.embed is not None else x

    def cell_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.rnn
        return r.weight_ih_l0, r.weight_hh_l0, r.bias_ih_l0, r.bias_hh_l0

    def step(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One cell step on (n, F) inputs and an (h, c) state of (n, H) each (GRU: c is unused and returned).
        LSTM: :class:`~dynaneural.layers.lstm.LSTMStep` (``torch.lstm_cell`` with autograd, one packed GEMM in
        inference)."""
        h, c = state
        if self._lstm_step is not None:
            return self._lstm_step(x, (h, c))
        return torch.gru_cell(x, h, *self.cell_weights()), c

    def run_fused(self, feats: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The fused ``nn.LSTM``/``nn.GRU`` over (B, T, F): outputs (B, T, H) and the final (h, c), each (B, H)."""
        if self.cell == "lstm":
            hx = None if state is None else (state[0].unsqueeze(0).contiguous(), state[1].unsqueeze(0).contiguous())
            out, (h, c) = self.rnn(feats, hx)
            return out, (h.squeeze(0), c.squeeze(0))
        out, h = self.rnn(feats, None if state is None else state[0].unsqueeze(0).contiguous())
        h = h.squeeze(0)
        return out, (h, torch.zeros_like(h) if state is None else state[1])

    def zero_state(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.zeros(batch, self.hidden_size, dtype=like.dtype, device=like.device)
        return z, z.clone()


class StaticRecurrentClassifier(nn.Module):
    """The static twin: embedding, fused ``nn.LSTM``/``nn.GRU`` over every step, head on the last state."""

    def __init__(self, backbone: RecurrentBackbone) -> None:
        super().__init__()
        self.embed = copy.deepcopy(backbone.embed)
        self.rnn = copy.deepcopy(backbone.rnn)
        self.head = copy.deepcopy(backbone.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.embed(x) if self.embed is not None else x
        out, _ = self.rnn(feats)
        return self.head(out[:, -1])


def check_sequence_batch(model: nn.Module, x: object) -> torch.Tensor:
    """Validate a model's input: token ids (B, T) against its vocabulary, or float features (B, T, F)."""
    vocab = getattr(model, "vocab_size", None)
    if getattr(model, "input_dtype", torch.float32) == torch.long:
        return check_token_batch(x, vocab_size=int(vocab))  # type: ignore[arg-type]
    x = check_batch(x, input_shape=None)
    feat = int(model.input_shape[-1])  # type: ignore[index]
    if x.dim() != 3 or x.shape[-1] != feat or x.shape[1] == 0:
        raise ValueError(f"input must be a feature sequence of shape (batch, length, {feat}), got {tuple(x.shape)}")
    return x


class SequenceModel(AllOnFlag, DynamicModel):
    """What the sequence models share: token-id or feature inputs, the all-updates-on switch, and the static twin
    (the fused recurrent classifier over ``self.backbone``, a :class:`RecurrentBackbone`)."""

    backbone: RecurrentBackbone

    def _init_sequence_io(self, *, vocab_size: int | None, input_size: int | None, max_len: int) -> None:
        """Token ids (B, max_len) when ``vocab_size`` is set, else features (B, max_len, input_size)."""
        if vocab_size is not None:
            self.input_dtype, self.vocab_size = torch.long, vocab_size
            self.input_shape = (max_len,)
        else:
            self.input_shape = (max_len, int(input_size))  # type: ignore[arg-type]
        self._all_on = False

    def to_static(self) -> StaticRecurrentClassifier:
        return StaticRecurrentClassifier(self.backbone)

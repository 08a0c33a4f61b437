"""The LSTM step on a compacted set of rows, shared by every dynamic recurrent model's execute path.

A dynamic recurrent model advances only the rows (samples) that still need a step, so it cannot call the fused
``nn.LSTM`` over a whole sequence; it runs one step at a time on a sub-batch. ``torch.lstm_cell`` does that with
two GEMMs, a chunk, three sigmoids and two ``tanh`` per call. On CPU this module's step is cheaper:

* **one GEMM** of ``[x_t, h]`` with the stacked ``[W_ih, W_hh]``; in inference (no autograd) on float32 CPU it runs
  through oneDNN's *pre-packed* linear (``torch.ops.mkldnn._linear_pointwise`` on a weight reordered once by
  ``_reorder_linear_weight``: the kernel family of oneDNN's own fused LSTM, ~20 % faster than ``addmm`` here);
* **one sigmoid for all four gates**: ``tanh(z) = 2·σ(2z) − 1``, the g-gate columns of the weight are pre-doubled,
  so one in-place sigmoid covers i, f, o and g (CPU's ``tanh`` costs ~6× a ``sigmoid`` per element here); the
  same identity gives ``tanh(c)``.

The functions are written in the TorchScript subset (the Skip RNN's scripted loops call them). ``LSTMStep`` wraps
them for an ``nn.LSTM``'s parameters, with the stacked and packed weights cached until a parameter changes.
Results equal ``torch.lstm_cell``'s to ~1e-7 (float32; tested).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LSTMStep", "cat_lstm_weights", "lstm_rows", "onednn_linear_available", "pack_linear_weight"]

_ONEDNN: dict[str, bool] = {}


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's packed linear ops (CPU builds with MKLDNN do)."""
    if "ok" not in _ONEDNN:
        _ONEDNN["ok"] = bool(torch.backends.mkldnn.is_available()
                             and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                             and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    return _ONEDNN["ok"]


def cat_lstm_weights(w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor, b_hh: torch.Tensor,
                     lstm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSTM's stacked ``[W_ih, W_hh]`` as a (F + H, 4H) matrix and the summed bias, gate columns reordered to
    i, f, o | g and the g columns doubled (see :func:`lstm_rows`). Empty tensors when ``lstm`` is False (a GRU
    caller)."""
    if not lstm:
        return torch.zeros(0), torch.zeros(0)
    hidden = w_hh.size(1)
    order = torch.cat([torch.arange(0, 2 * hidden), torch.arange(3 * hidden, 4 * hidden),
                       torch.arange(2 * hidden, 3 * hidden)]).to(w_hh.device)
    scale = torch.ones(4 * hidden, dtype=w_hh.dtype, device=w_hh.device)
    scale[3 * hidden:] = 2.0
    w = torch.cat([w_ih, w_hh], 1).index_select(0, order) * scale.unsqueeze(1)
    return w.t().contiguous(), (b_ih + b_hh).index_select(0, order) * scale


def pack_linear_weight(w_cat: torch.Tensor, pack: bool) -> torch.Tensor | None:
    """oneDNN's pre-packed copy of a (K, N) weight for :func:`lstm_rows`, or None where it does not apply (not
    asked, or not a float32 CPU tensor)."""
    if not pack or w_cat.device.type != "cpu" or w_cat.dtype != torch.float32:
        return None
    return torch.ops.mkldnn._reorder_linear_weight(w_cat.t().contiguous())


def lstm_rows(xt: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_cat: torch.Tensor, b_cat: torch.Tensor,
              w_packed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step of some rows: ``xt`` (n, F), ``h`` and ``c`` (n, H) → new ``(h, c)``.

    One GEMM of ``[x_t, h]`` with the stacked weights of :func:`cat_lstm_weights` (oneDNN's packed weight when
    given — inference only, the op has no autograd formula — else ``addmm``) and one sigmoid over all four gates.
    """
    hidden = h.size(1)
    inp = torch.cat([xt, h], 1)
    if w_packed is not None:
        # TorchScript's type of the op's ``Scalar?[]`` argument (a local annotation: never evaluated by Python)
        no_scalars: List[Optional[number]] = []  # noqa: F821, UP006, UP045
        z = torch.ops.mkldnn._linear_pointwise(inp, w_packed, b_cat, "none", no_scalars, "")
    else:
        z = torch.addmm(b_cat, inp, w_cat)
    s = z.sigmoid_()  # (n, 4H): σ(i), σ(f), σ(o), σ(2g)
    tg = s.narrow(1, 3 * hidden, hidden).mul_(2.0).sub_(1.0)  # tanh(g)
    cn = torch.addcmul(s.narrow(1, hidden, hidden) * c, s.narrow(1, 0, hidden), tg)
    hn = torch.mul(cn, 2.0).sigmoid_().mul_(2.0).sub_(1.0).mul_(s.narrow(1, 2 * hidden, hidden))  # o · tanh(c)
    return hn, cn


class LSTMStep:
    """One step of a one-layer ``nn.LSTM`` on a sub-batch of rows, fast in inference and exact in training.

    With autograd enabled it calls ``torch.lstm_cell`` (differentiable). Without, it runs :func:`lstm_rows` on
    stacked (and, on float32 CPU, oneDNN-packed) weights that are built once and reused until one of the LSTM's
    parameters changes (their version counters move on every in-place update: optimizer steps,
    ``load_state_dict``), so a step costs one GEMM and a few element-wise ops.

    Args:
        lstm: the ``nn.LSTM`` (one layer, unidirectional, with biases) whose parameters are used.
        pack: use oneDNN's packed GEMM where it applies.
    """

    def __init__(self, lstm: nn.LSTM, *, pack: bool = True) -> None:
        if lstm.num_layers != 1 or lstm.bidirectional or not lstm.bias or lstm.proj_size:
            raise ValueError("LSTMStep needs a one-layer, unidirectional LSTM with biases and no projection")
        self.lstm, self.pack = lstm, bool(pack)
        self._stamp: tuple[tuple[int, int], ...] | None = None
        self._weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def __getstate__(self) -> dict[str, object]:
        # The cache is dropped when copied or pickled: oneDNN's packed weight is an opaque tensor with no storage
        # (``copy.deepcopy`` of a model, e.g. by ``fold_batch_norms``, would fail on it); it is rebuilt on use.
        return {**self.__dict__, "_stamp": None, "_weights": None}

    def _params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.lstm
        return m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(w_cat, b_cat, w_packed)`` for :func:`lstm_rows`, rebuilt only when a parameter changed."""
        params = self._params()
        try:
            stamp: tuple[tuple[int, int], ...] | None = tuple((p._version, p.data_ptr()) for p in params)
        except RuntimeError:  # inference tensors keep no version counter: nothing to key a cache on
            stamp = None
        if self._weights is None or stamp is None or stamp != self._stamp:
            w_cat, b_cat = cat_lstm_weights(*params, True)
            self._weights = (w_cat, b_cat, pack_linear_weight(w_cat, self.pack and onednn_linear_available()))
            self._stamp = stamp
        return self._weights

    def __call__(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (n, F), ``state`` = (h, c), each (n, H) → the new (h, c)."""
        h, c = state
        if torch.is_grad_enabled() or x.dtype != self.lstm.weight_ih_l0.dtype:
            return torch.lstm_cell(x, (h, c), *self._params())
        w_cat, b_cat, w_packed = self.weights()
        return lstm_rows(x, h, c, w_cat, b_cat, w_packed)

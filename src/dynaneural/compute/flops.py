"""Analytic FLOPs of static layers, counted per sample.

Convention (the one used by the ResNet, MSDNet and SDN papers, and by fvcore): one *FLOP* is one
multiply-accumulate of a matrix product or convolution. Batch norm at inference costs 2 per element (scale and
shift), layer/group/instance norm 5 (they compute statistics), average pooling 1 per input element, max pooling
and element-wise activations 0; RNN cells count the MACs of their gate matrices. ``tests/compute/test_flops.py`` cross-checks these counts against fvcore.

The counter attaches forward hooks to leaf modules and evaluates the formulas from the *shapes* that actually
flow through them, so it is exact for any static network whatever its wiring. Dynamic models do not use it
at run time: they count their static pieces once (``static_flops``) and the :class:`~dynaneural.compute.ledger.
CostLedger` charges each sample for the pieces it ran.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["FlopsReport", "count_flops", "static_flops", "register_flops_rule"]

_Rule = Callable[[nn.Module, tuple[Any, ...], Any], float]
_RULES: dict[type[nn.Module], _Rule] = {}


def register_flops_rule(*module_types: type[nn.Module]) -> Callable[[_Rule], _Rule]:
    """Register an analytic FLOPs formula ``rule(module, inputs, output) -> flops of the whole batch``."""

    def wrap(fn: _Rule) -> _Rule:
        for t in module_types:
            if t in _RULES:
                raise ValueError(f"a FLOPs rule for {t.__name__} is already registered")
            _RULES[t] = fn
        return fn

    return wrap


def _first_tensor(obj: Any) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            if isinstance(o, torch.Tensor):
                return o
            try:
                return _first_tensor(o)
            except TypeError:
                pass
    raise TypeError(f"no tensor in {type(obj).__name__}")


@register_flops_rule(nn.Linear, nn.Bilinear)
def _linear(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> float:
    out = _first_tensor(output)
    rows = out.numel() // out.shape[-1]
    if isinstance(m, nn.Bilinear):
        return float(rows * m.in1_features * m.in2_features * m.out_features)
    return float(rows * m.in_features * m.out_features)


@register_flops_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> float:
    # Each output element is a dot product over (C_in / groups) * prod(kernel) inputs; stride, padding and
    # dilation only change how many output elements there are, which the output shape already tells.
    assert isinstance(m, nn.modules.conv._ConvNd)
    out = _first_tensor(output)
    per_output = (m.in_channels // m.groups) * math.prod(m.kernel_size)
    return float(out.numel() * per_output)


@register_flops_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> float:
    assert isinstance(m, nn.modules.conv._ConvNd)
    x = _first_tensor(inputs)
    per_input = (m.out_channels // m.groups) * math.prod(m.kernel_size)
    return float(x.numel() * per_input)


@register_flops_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> float:
    # At inference batch norm uses stored statistics: one scale and one shift per element (fvcore's convention).
    x = _first_tensor(inputs)
    return float(x.numel() * (2 if getattr(m, "affine", True) else 1))


@register_flops_rule(nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _stat_norm(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> float:
    # These compute statistics at inference too: mean, variance, normalise (+ scale and shift) — 5 per element
    # with affine parameters, 4 without (fvcore's convention).
    x = _first_tensor(inputs)
    affine = getattr(m, "affine", getattr(m, "elementwise_affine", True))
    return float(x.numel() * (5 if affine else 4))


@register_flops_rule(
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d
)
def _avg_pool(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> float:
    return float(_first_tensor(inputs).numel())


@register_flops_rule(nn.MultiheadAttention)
def _mha(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> float:
    assert isinstance(m, nn.MultiheadAttention)
    q, k = inputs[0], inputs[1]
    if m.batch_first:
        bsz, lq, e = q.shape
        lk = k.shape[1]
    else:
        lq, bsz, e = q.shape
        lk = k.shape[0]
    proj = bsz * (lq * e * e + 2 * lk * m.kdim * e + lq * e * e)  # q, k, v and output projections
    attn = bsz * 2 * lq * lk * e  # scores q·k and weighted sum over v, summed over heads
    return float(proj + attn)


def _rnn_cell_flops(kind: str, input_size: int, hidden: int) -> int:
    gates = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}[kind]
    return gates * hidden * (input_size + hidden)


@register_flops_rule(nn.LSTMCell, nn.GRUCell, nn.RNNCell)
def _rnn_cell(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> float:
    kind = {nn.LSTMCell: "LSTM", nn.GRUCell: "GRU", nn.RNNCell: "RNN_TANH"}[type(m)]
    x = _first_tensor(inputs)
    rows = x.shape[0] if x.dim() == 2 else 1
    return float(rows * _rnn_cell_flops(kind, m.input_size, m.hidden_size))  # type: ignore[arg-type]


@register_flops_rule(nn.LSTM, nn.GRU, nn.RNN)
def _rnn(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> float:
    assert isinstance(m, nn.RNNBase)
    x = _first_tensor(inputs)
    if isinstance(x, nn.utils.rnn.PackedSequence):  # pragma: no cover - rare
        raise TypeError("count_flops does not support PackedSequence; pass a padded tensor")
    if x.dim() == 2:
        steps_x_batch = x.shape[0]
    else:
        steps_x_batch = x.shape[0] * x.shape[1]
    hidden = m.proj_size or m.hidden_size
    dirs = 2 if m.bidirectional else 1
    total = 0
    for layer in range(m.num_layers):
        in_size = m.input_size if layer == 0 else hidden * dirs
        per_step = _rnn_cell_flops(m.mode, in_size, m.hidden_size)
        if m.proj_size:
            per_step += m.hidden_size * m.proj_size
        total += dirs * steps_x_batch * per_step
    return float(total)


def _rule_for(cls: type) -> _Rule | None:
    for base in cls.__mro__:  # subclasses (e.g. MultiheadAttention's NonDynamicallyQuantizableLinear) inherit
        if base in _RULES:
            return _RULES[base]
    return None


@dataclass
class FlopsReport:
    """FLOPs of one forward pass, per sample.

    Attributes:
        total: FLOPs per sample.
        by_module: FLOPs per sample of each counted leaf module, by qualified name.
        uncounted: names of leaf modules with parameters but no rule (their cost is missing from ``total``).
    """

    total: float
    by_module: dict[str, float] = field(default_factory=dict)
    uncounted: list[str] = field(default_factory=list)


def count_flops(model: nn.Module, *args: Any, strict: bool = True, batch_size: int | None = None, **kwargs: Any
                ) -> FlopsReport:
    """Count the FLOPs per sample of ``model(*args, **kwargs)`` from the shapes that flow through it.

    Args:
        model: any module; only leaf modules with a registered rule are counted (plus the ``flops_per_sample``
            hook of custom modules, see below).
        *args: example inputs; the leading dimension of the first tensor is the batch size, and the result is
            divided by it.
        strict: raise if a leaf module that holds parameters has no rule (its cost would silently be missing).
        batch_size: samples in the example (default: leading dimension of the first tensor; give it for
            sequence-first inputs).
        **kwargs: passed to the forward.

    Modules may define ``flops(inputs, output) -> float`` (whole-batch FLOPs) to count themselves; their children
    are then not visited.
    """
    batch = batch_size if batch_size is not None else _first_tensor(args).shape[0]
    if batch == 0:
        raise ValueError("count_flops needs a non-empty example batch")
    by_module: dict[str, float] = {}
    uncounted: list[str] = []
    handles = []

    def make_hook(name: str, rule: _Rule) -> Callable[..., None]:
        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            by_module[name] = by_module.get(name, 0.0) + rule(mod, inputs, output) / batch

        return hook

    covered: list[str] = []  # modules counted as a whole (a rule or their own flops()): skip their children
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in covered):
            continue
        custom = getattr(mod, "flops", None)
        if callable(custom) and mod is not model:
            covered.append(name)
            handles.append(mod.register_forward_hook(make_hook(name, lambda m, i, o: m.flops(i, o))))  # type: ignore[operator]
            continue
        rule = _rule_for(type(mod))
        if rule is not None:
            covered.append(name)
            handles.append(mod.register_forward_hook(make_hook(name, rule)))
        elif not list(mod.children()) and any(True for _ in mod.parameters(recurse=False)):
            uncounted.append(name or type(mod).__name__)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if strict and uncounted:
        raise NotImplementedError(f"no FLOPs rule for parameterised modules {uncounted}; register one with "
                                  "register_flops_rule or give the module a flops(inputs, output) method")
    return FlopsReport(total=sum(by_module.values()), by_module=by_module, uncounted=uncounted)


def static_flops(module: nn.Module, example: Any) -> float:
    """FLOPs per sample of ``module(example)``; ``example`` is a batch tensor or a list of batch tensors."""
    return count_flops(module, example).total

"""A cascade of independently trained classifiers, small to large, as a multi-exit network.

Paper: X. Wang, Y. Luo, D. Crankshaw, A. Tumanov, F. Yu, J. E. Gonzalez, "IDK Cascades: Fast Deep Learning by
Learning not to Overthink", UAI 2018, arXiv:1706.00885 (and the model cascades of the dynamic-network survey,
Han et al., "Dynamic Neural Networks: A Survey", TPAMI 2021, arXiv:2102.04906, Sec. 2.1.1).

A sample is classified by the smallest model first; only when that model is not confident enough does the next,
larger one run — on the *input*, since the models share nothing. Written as a
:class:`~dynaneural.sample_wise.early_exit.multi_exit.MultiExitNetwork`:

    stage k: identity (the state passed on is the input itself; 0 FLOPs)
    exit k:  the whole k-th model, input ─▶ logits

so the generic machinery gives the cascade its exit rules, execute-mode compaction (a larger model only sees the
samples the smaller ones passed on), threshold calibration and per-sample cost ledger: a sample leaving at exit k
pays for models 0..k (every enabled one). With the intermediate exits disabled the cascade is its largest model.

Training: the models are trained independently (the usual recipe); training the cascade itself with the multi-exit
loss is the same thing, since with no shared stage the sum of the per-exit losses splits into one loss per model.

Members may be plain modules returning logits or :class:`MultiExitNetwork`\\ s; of the latter the cascade keeps the
static twin (``to_static()``: its stages and final classifier, same weights), so the FLOPs counter sees ordinary
leaf modules and the member's own intermediate exits and policy heads are not part of the cascade.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dynaneural.registry import create_model, register_model
from dynaneural.sample_wise.early_exit import exit_convnet  # noqa: F401  (registers the member models used below)
from dynaneural.sample_wise.early_exit.multi_exit import MultiExitNetwork

__all__ = ["CascadeMember", "build_cascade"]


class CascadeMember(nn.Module):
    """Exit ``k`` of a cascade: a whole classifier run on the input, returning (B, num_classes) logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.net = model.to_static() if isinstance(model, MultiExitNetwork) else model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _describe(model: nn.Module) -> dict[str, Any]:
    """What is known about how a member was built: its registry name and arguments, or its config."""
    name = getattr(model, "model_name", None)
    if name is not None:
        return {"name": name, "kwargs": dict(getattr(model, "model_kwargs", {}))}
    return {"class": type(model).__name__, "config": dict(getattr(model, "config", {}) or {})}


def build_cascade(models: Sequence[nn.Module], *, num_classes: int | None = None,
                  input_shape: Sequence[int] | None = None, exit_policy: bool = False) -> MultiExitNetwork:
    """Chain classifiers, cheapest first, into a cascade (exit k = model k).

    Args:
        models: two or more classifiers, each mapping (B, *input_shape) to (B, num_classes) logits, or
            :class:`MultiExitNetwork`\\ s (their static twin is used).
        num_classes: classes; read from MultiExitNetwork members when omitted.
        input_shape: shape of one input sample; read from MultiExitNetwork members when omitted.
        exit_policy: also build learned exit-policy heads.

    Raises:
        ValueError: fewer than two models, members that disagree on the input shape or the number of classes, or a
            member whose output is not (B, num_classes) logits.
    """
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"a cascade needs at least two models, got {len(models)}")
    known = [m for m in models if isinstance(m, MultiExitNetwork)]
    shapes = {m.input_shape for m in known} | ({tuple(int(d) for d in input_shape)} if input_shape else set())
    classes = {m.num_classes for m in known} | ({int(num_classes)} if num_classes is not None else set())
    if len(shapes) != 1:
        raise ValueError(f"cascade members must share one input shape (pass input_shape= for plain modules); "
                         f"got {sorted(shapes)}")
    if len(classes) != 1:
        raise ValueError(f"cascade members must share num_classes (pass num_classes= for plain modules); "
                         f"got {sorted(classes)}")
    (shape,), (n_cls,) = shapes, classes
    heads = {k: CascadeMember(m) for k, m in enumerate(models)}
    _check_members(heads, shape, n_cls)
    return MultiExitNetwork(stages=[nn.Identity() for _ in models], heads=heads, num_classes=n_cls,
                            input_shape=shape, exit_policy=exit_policy,
                            config={"members": [_describe(m) for m in models], "exit_policy": exit_policy})


def _check_members(heads: dict[int, CascadeMember], shape: tuple[int, ...], num_classes: int) -> None:
    """Fail at build time, with the member's index, if a member does not return (B, num_classes) logits."""
    for k, member in heads.items():
        p = next(member.parameters(), None)
        x = torch.zeros((2, *shape), dtype=p.dtype if p is not None else torch.float32,
                        device=p.device if p is not None else None)
        modes = {m: m.training for m in member.modules()}
        member.eval()  # never let the check touch batch-norm statistics
        try:
            with torch.no_grad():
                out = member(x)
        finally:
            for m, training in modes.items():
                m.training = training
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"cascade member {k} must return (batch, {num_classes}) logits, got {got}")


@register_model
def cascade_mnist(*, exit_policy: bool = False, num_classes: int = 10) -> MultiExitNetwork:
    """28×28 MNIST / Fashion-MNIST: a 2-stage then a 4-stage static ``exit_convnet_mnist`` (~1.2 / 14.8 MFLOPs)."""
    small = create_model("exit_convnet_mnist", num_stages=2, exits="last", num_classes=num_classes)
    large = create_model("exit_convnet_mnist", exits="last", num_classes=num_classes)
    return build_cascade([small, large], exit_policy=exit_policy)


@register_model
def test_cascade(*, exit_policy: bool = False, num_classes: int = 10) -> MultiExitNetwork:
    """Tiny variant for tests: static ``test_exit_convnet`` of 1, 2 and 3 stages on 1×8×8 inputs."""
    members = [create_model("test_exit_convnet", num_stages=n, exits="last", num_classes=num_classes)
               for n in (1, 2, 3)]
    return build_cascade(members, exit_policy=exit_policy)

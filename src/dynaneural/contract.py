"""The interface every dynamic model in DynaNeural keeps (tested over the registry by tests/test_contract.py).

A dynamic model is an ``nn.Module`` whose ``forward(x, *, mode=...)`` returns a
:class:`~dynaneural.outputs.DynamicOutput` (or a subclass): final logits, per-sample cost from the cost ledger,
the per-sample decisions by name, and auxiliary losses. ``mode`` defaults to ``train`` while the module is in
training mode and ``execute`` otherwise.

Besides ``forward``, the contract asks for:

* ``input_shape`` and ``num_classes`` — the per-sample input shape (without the batch) and the number of
  classes, so tests and tools can build a batch (``example_input``);
* ``all_on()`` — a context manager in which every decision takes its "run everything" value (no exit, no
  skipped block, full width, every token/frame); inside it, ``forward`` in execute mode must match
  ``to_static()`` in outputs, and its cost must equal the static twin's FLOPs;
* ``to_static()`` — the static twin: the same weights as a plain network without the decision machinery.

A model for which "every decision on" has no static twin (a mixture-of-experts with top-k < E, a
hypernetwork) sets ``has_static_twin = False`` and says why in its docstring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dynaneural.execution import Mode

__all__ = ["AllOnFlag", "DynamicModel", "resolve_mode", "set_train_progress"]


class AllOnFlag:
    """Mixin for models whose decisions read one flag: ``all_on()`` sets ``self._all_on`` for the duration of the
    context (and restores the previous value, so contexts nest). Put it before :class:`DynamicModel` in the bases."""

    _all_on: bool = False

    @contextlib.contextmanager
    def all_on(self) -> Iterator[None]:
        prev, self._all_on = self._all_on, True
        try:
            yield
        finally:
            self._all_on = prev


def resolve_mode(module: nn.Module, mode: Mode | str | None) -> Mode:
    """The mode a forward runs in: the one given, else ``train`` in training mode and ``execute`` in eval."""
    if mode is None:
        return Mode.TRAIN if module.training else Mode.EXECUTE
    return Mode.parse(mode)


class DynamicModel(nn.Module):
    """Base of DynaNeural's dynamic models (an interface plus the defaults most models can use).

    Subclasses set ``input_shape`` (tuple) and ``num_classes`` (int) and implement ``forward``, ``all_on`` and
    ``to_static`` (or set ``has_static_twin = False``).
    """

    input_shape: tuple[int, ...]
    num_classes: int
    has_static_twin: bool = True
    #: dtype of the input: float for images/features, torch.long for token ids.
    input_dtype: torch.dtype = torch.float32
    #: vocabulary size for token-id inputs (``input_dtype`` long); example inputs draw ids below it.
    vocab_size: int | None = None

    def example_input(self, batch_size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random batch the model accepts (tests, FLOPs counting, warm-up)."""
        device = next(iter(self.parameters())).device
        if self.input_dtype.is_floating_point:
            return torch.randn(batch_size, *self.input_shape, generator=generator).to(device)
        if self.vocab_size is None:
            raise NotImplementedError(f"{type(self).__name__} takes token ids but sets no vocab_size")
        return torch.randint(0, self.vocab_size, (batch_size, *self.input_shape), generator=generator).to(device)

    @contextlib.contextmanager
    def all_on(self) -> Iterator[None]:  # pragma: no cover - interface
        """Every decision takes its "run everything" value inside this context."""
        raise NotImplementedError(f"{type(self).__name__} does not implement all_on()")
        yield

    def to_static(self) -> nn.Module:  # pragma: no cover - interface
        """The static twin (same weights, no decision machinery)."""
        raise NotImplementedError(f"{type(self).__name__} has no static twin")

    def set_train_progress(self, progress: float) -> None:
        """Called by the training loop before every step with progress in [0, 1] (temperature schedules,
        curricula). The default does nothing."""


def set_train_progress(model: nn.Module, progress: float) -> None:
    """Tell every submodule that defines ``set_train_progress`` how far training has come (0 → 1)."""
    for m in model.modules():
        fn: Any = getattr(m, "set_train_progress", None)
        if callable(fn):
            fn(float(progress))


def example_input(model: nn.Module, batch_size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random batch for any registered model (dynamic or early-exit)."""
    fn = getattr(model, "example_input", None)
    if callable(fn):
        return fn(batch_size, generator=generator)
    return torch.randn(batch_size, *model.input_shape, generator=generator)  # type: ignore[arg-type]

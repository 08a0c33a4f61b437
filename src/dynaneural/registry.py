"""Model registry: ``@register_model`` entry points, ``create_model(name, **kwargs)``, ``list_models(pattern)``.

Strict on purpose (torchvision's lesson, PR 5001): a duplicate name raises, an unknown name raises with the
closest names, and entry points are keyword-only so a misspelt argument is a ``TypeError``, not a silently
different model. ``dynaneural/__init__.py`` imports every method module, so registration cannot be forgotten.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["register_model", "create_model", "list_models", "model_entrypoint"]

F = TypeVar("F", bound=Callable[..., nn.Module])
_MODELS: dict[str, Callable[..., nn.Module]] = {}
_MODULES: dict[str, str] = {}


def register_model(fn: F) -> F:
    """Register a model entry point under its function name; its parameters must be keyword-only."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered (by {_MODULES[name]})")
    params = inspect.signature(fn).parameters.values()
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional:
        raise TypeError(f"model entry point {name!r} must take keyword-only arguments; {positional} are positional")
    _MODELS[name] = fn
    _MODULES[name] = fn.__module__
    return fn


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (see dynaneural.list_models())") from None


def create_model(name: str, *, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model; unknown keyword arguments raise ``TypeError``.

    ``seed``: initialise the weights from ``torch.manual_seed(seed)`` without touching the caller's global RNG, so
    that the same call gives the same weights in every process. Without it the weights come from the global RNG
    as it stands, whose start value differs between processes unless the caller seeded it.
    """
    fn = model_entrypoint(name)
    accepted = inspect.signature(fn).parameters
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise TypeError(f"model {name!r} got unknown argument(s) {unknown}; it accepts {sorted(accepted)}")
    if seed is None:
        model = fn(**kwargs)
    else:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = fn(**kwargs)
    model.model_name = name  # type: ignore[assignment]
    model.model_kwargs = dict(kwargs)  # type: ignore[assignment]
    return model


def list_models(pattern: str = "*", *, exclude_tests: bool = False) -> list[str]:
    """Registered model names matching a shell-style wildcard, sorted."""
    names = sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))
    if exclude_tests:
        names = [n for n in names if not n.startswith("test_")]
    return names

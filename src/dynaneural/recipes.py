"""Experiment recipes: validated dataclasses loaded from YAML (never executed), with a ``quick`` override set.

A recipe names a registered model, a dataset, the training configuration, the budgets to calibrate, what to
benchmark and the static family to compare with. Shipped recipes live in ``dynaneural/configs/*.yaml``; every one
of them is parsed by a test.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dynaneural.data import list_datasets
from dynaneural.registry import model_entrypoint

__all__ = ["Recipe", "CalibrationSpec", "BenchSpec", "load_recipe", "list_recipes"]


def _strict(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    return cls(**data)


@dataclass
class CalibrationSpec:
    """Budgets to calibrate the exits to.

    Attributes:
        budgets: target mean costs per sample, in ``unit``.
        unit: ``fraction`` (of the full network's FLOPs), ``flops``, ``depth`` or ``ms``.
        method: ``geometric`` (MSDNet's prior) or ``search``.
        rule: exit rule: ``confidence``, ``entropy``, ``patience`` or ``learned``.
    """

    budgets: list[float] = field(default_factory=lambda: [0.25, 0.4, 0.6, 0.8])
    unit: str = "fraction"
    method: str = "geometric"
    rule: str = "confidence"

    def __post_init__(self) -> None:
        if not self.budgets or any(not isinstance(b, (int, float)) or b <= 0 for b in self.budgets):
            raise ValueError(f"calibration.budgets must be positive numbers, got {self.budgets}")
        if self.unit not in ("fraction", "flops", "depth", "ms"):
            raise ValueError(f"calibration.unit must be fraction, flops, depth or ms, got {self.unit!r}")
        if self.method not in ("geometric", "search"):
            raise ValueError(f"calibration.method must be geometric or search, got {self.method!r}")
        if self.rule not in ("confidence", "entropy", "patience", "learned"):
            raise ValueError(f"calibration.rule must be confidence, entropy, patience or learned, got {self.rule!r}")


@dataclass
class BenchSpec:
    """What to time.

    Attributes:
        batch_sizes: batch sizes to measure realized speed-up at.
        repeats: interleaved repeats per measurement (medians are reported).
        timed_samples: test samples timed per repeat (batch 1 uses ``timed_samples_batch1``).
        static_family: model-kwargs overrides of static networks of the same design to train and compare with
            (``exits: last`` is implied).
    """

    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    repeats: int = 9
    timed_samples: int = 2048
    timed_samples_batch1: int = 256
    static_family: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(f"bench.batch_sizes must be positive integers, got {self.batch_sizes}")
        if self.repeats < 1 or self.timed_samples < 1 or self.timed_samples_batch1 < 1:
            raise ValueError("bench.repeats and bench.timed_samples must be >= 1")


@dataclass
class Recipe:
    """A full experiment: model, data, training, calibration and benchmark settings.

    ``options`` holds method-specific settings that the family's bench command reads (validated there).
    """

    name: str
    model: str
    dataset: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    bench: BenchSpec = field(default_factory=BenchSpec)
    quick: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        model_entrypoint(self.model)  # raises with close names if unknown
        if self.dataset not in list_datasets():
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {list(list_datasets())}")
        keys = {"seed", "val_size", "train_limit"} | ({"val_split"} if self.dataset == "sst2" else set())
        bad = set(self.data) - keys
        if bad:
            raise ValueError(f"data: unknown key(s) {sorted(bad)}; expected {', '.join(sorted(keys))}")
        if set(self.quick) - {"train", "data", "calibration", "bench", "options"}:
            raise ValueError("quick: only train, data, calibration, bench and options can be overridden, got "
                             f"{list(self.quick)}")
        from dynaneural.engine import TrainConfig  # local: engine imports models, recipes are imported by the CLI

        TrainConfig.from_dict(self.train)  # validate now, not after an hour of data loading

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, where: str = "recipe") -> Recipe:
        raw = copy.deepcopy(raw)
        raw["calibration"] = _strict(CalibrationSpec, raw.get("calibration", {}) or {}, f"{where}: calibration")
        raw["bench"] = _strict(BenchSpec, raw.get("bench", {}) or {}, f"{where}: bench")
        return _strict(cls, raw, where)

    def quick_variant(self) -> Recipe:
        """The recipe with its ``quick`` overrides applied (a fast smoke-sized run)."""
        raw = {"name": self.name + "-quick", "model": self.model, "dataset": self.dataset,
               "model_kwargs": dict(self.model_kwargs), "data": {**self.data, **self.quick.get("data", {})},
               "train": {**self.train, **self.quick.get("train", {})},
               "calibration": {**vars(self.calibration), **self.quick.get("calibration", {})},
               "bench": {**vars(self.bench), **self.quick.get("bench", {})},
               "options": {**self.options, **self.quick.get("options", {})}}
        return Recipe.from_dict(raw, where=f"{self.name} (quick)")


def list_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    root = resources.files("dynaneural") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a shipped recipe by name (see :func:`list_recipes`) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        text = path.read_text()
        where = str(path)
    else:
        res = resources.files("dynaneural") / "configs" / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ValueError(f"unknown recipe {name_or_path!r}; shipped recipes: {list_recipes()}")
        text = res.read_text()
        where = f"recipe {name_or_path}"
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{where} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a YAML mapping")
    return Recipe.from_dict(raw, where=where)

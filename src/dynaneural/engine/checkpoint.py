"""Checkpoints: a model (and, for resuming, its training state) in one safetensors file.

Format (``format_version`` 1). A checkpoint is a single `safetensors <https://github.com/huggingface/safetensors>`_
file, so loading one never unpickles anything:

* tensors named as in ``model.state_dict()`` — the weights and persistent buffers (e.g. the calibrated
  ``exit_thresholds`` of a multi-exit network);
* tensors named ``_extras/<n>`` and ``_train/<n>`` — the tensors inside the caller's extras and inside the
  training state (optimizer moments, RNG states), referenced from the metadata below (``/`` never occurs in a
  ``state_dict`` key, so the names cannot collide);
* string metadata: ``"format": "pt"`` and ``"dynaneural"``: a JSON object with ``format`` (``"dynaneural.checkpoint"``),
  ``format_version``, ``library_version``, ``torch_version``, ``model`` (``name`` and ``kwargs`` to rebuild it with
  :func:`dynaneural.create_model`, ``class``, ``config``), ``exit_rule`` (the exit rule's config or null),
  ``extras``, ``training_state`` (null for a plain model checkpoint) and ``sha256`` — digests of the weights, the
  extras tensors and the training-state tensors, so a flipped bit anywhere is caught on load, not trained on.

Inside ``extras`` and ``training_state`` JSON cannot hold everything Python can, so values are tagged: a tensor is
``{"__tensor__": name}``, a tuple ``{"__tuple__": [...]}`` and a dict with non-string keys (an optimizer's
per-parameter state) ``{"__items__": [[key, value], ...]}``; they round-trip exactly.

Writes are atomic: the file is written beside the target under a temporary name, flushed to disk and moved into
place with ``os.replace``, so an interrupted save leaves the previous checkpoint intact. Because the training
state travels in the same file as the weights, the two can never get out of step.

Every problem found while loading — missing file, truncated or corrupted bytes, a file that is not safetensors,
missing metadata, an unsupported format version, an unknown model, weights that do not fit — raises
:class:`CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dynaneural.version import __version__

__all__ = [
    "CheckpointError", "CheckpointInfo", "TrainingState", "save_model", "load_model", "load_weights",
    "read_checkpoint", "load_training_state", "FORMAT_VERSION",
]

FORMAT_NAME = "dynaneural.checkpoint"
FORMAT_VERSION = 1
_META_KEY = "dynaneural"
_META_DIGEST_KEY = "dynaneural_sha256"
_EXTRAS = "_extras/"
_TRAIN = "_train/"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and the problem."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself (its metadata), without the weights.

    Attributes:
        path: the file.
        format_version: version of this checkpoint format.
        library_version: the DynaNeural version that wrote it.
        model_name: registered name to rebuild the model with (None if it was not built by ``create_model``).
        model_kwargs: keyword arguments for ``create_model``.
        model_class: qualified class name of the saved model.
        model_config: the model's ``config`` dict, if it has one.
        exit_rule: the exit rule's config, for models with one.
        extras: what the caller stored (calibration results, a training summary...).
        has_training_state: whether the file also holds a :class:`TrainingState` to resume from.
    """

    path: Path
    format_version: int
    library_version: str
    model_name: str | None
    model_kwargs: dict[str, Any]
    model_class: str
    model_config: dict[str, Any]
    exit_rule: dict[str, Any] | None
    extras: dict[str, Any]
    has_training_state: bool


@dataclass
class TrainingState:
    """Everything beside the weights that a run needs to continue exactly where it stopped.

    Attributes:
        epoch: epochs completed.
        step: optimizer steps taken.
        optimizer: ``optimizer.state_dict()``.
        scheduler: ``scheduler.state_dict()`` (None without a scheduler).
        rng: random states: ``"torch"`` (CPU), ``"cuda"`` (one per device, when CUDA was in use) and
            ``"generator/<name>"`` for each named ``torch.Generator`` (e.g. the data order).
        extra: anything else the trainer needs (JSON-like values and tensors), e.g. the history so far.
    """

    epoch: int
    step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None = None
    rng: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
        """The current global torch RNG states and the states of ``generators``, by name."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        for name, gen in (generators or {}).items():
            rng[f"generator/{name}"] = gen.get_state()
        return rng

    def restore_rng(self, generators: Mapping[str, torch.Generator] | None = None) -> None:
        """Put back the global RNG states and those of ``generators`` (which must all have been captured)."""
        if "torch" in self.rng:
            torch.set_rng_state(self.rng["torch"])
        cuda = self.rng.get("cuda")
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        for name, gen in (generators or {}).items():
            key = f"generator/{name}"
            if key not in self.rng:
                raise CheckpointError(f"the training state holds no state for generator {name!r} "
                                      f"(it has {sorted(self.rng)})")
            gen.set_state(self.rng[key])

    def _to_json(self) -> dict[str, Any]:
        return {"epoch": int(self.epoch), "step": int(self.step), "optimizer": self.optimizer,
                "scheduler": self.scheduler, "rng": self.rng, "extra": self.extra}


# ----------------------------------------------------------------------------------------------------- saving
def save_model(model: nn.Module, path: str | os.PathLike[str], *, extras: Mapping[str, Any] | None = None,
               training_state: TrainingState | None = None) -> Path:
    """Write ``model`` (weights, buffers, how to rebuild it, its exit rule) to a safetensors file, atomically.

    Args:
        model: the model; to be rebuilt by :func:`load_model` it must come from :func:`dynaneural.create_model`.
        path: the file to write (its folder is created); an existing file is replaced only once the new one is
            complete.
        extras: anything else to keep with the weights (calibration results, a training summary): JSON-like
            values (dict, list, tuple, str, number, bool, None) and tensors.
        training_state: also store the state needed to resume training (see :class:`TrainingState`).

    Returns:
        The path written.

    Raises:
        TypeError: ``extras`` or the training state hold a value that cannot be stored.
    """
    path = Path(path)
    weights = _weights_for_saving(model)
    tensors: dict[str, torch.Tensor] = dict(weights)
    extra_tensors: dict[str, torch.Tensor] = {}
    extras_json = _encode(dict(extras or {}), _EXTRAS, extra_tensors, "extras")
    train_tensors: dict[str, torch.Tensor] = {}
    train_json = (_encode(training_state._to_json(), _TRAIN, train_tensors, "training_state")
                  if training_state is not None else None)
    tensors.update(extra_tensors)
    tensors.update(train_tensors)
    rule = getattr(model, "exit_rule", None)
    name = getattr(model, "model_name", None)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": torch.__version__,
        "model": {
            "name": name,
            "kwargs": _encode(dict(getattr(model, "model_kwargs", {}) or {}), "", None, "model_kwargs"),
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "config": _encode(dict(getattr(model, "config", {}) or {}), "", None, "model.config")
            if isinstance(getattr(model, "config", None), Mapping) else {},
        },
        "exit_rule": rule.config() if rule is not None and hasattr(rule, "config") else None,
        "extras": extras_json,
        "training_state": train_json,
        "sha256": {"weights": _digest(weights), "extras": _digest(extra_tensors),
                   "training_state": _digest(train_tensors)},
    }
    try:
        text = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as e:  # e.g. an exit rule config holding something JSON cannot
        raise TypeError(f"cannot write checkpoint {path}: metadata is not JSON-serialisable ({e})") from e
    header = {"format": "pt", _META_KEY: text, _META_DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return path


def _weights_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies-or-views of the state dict (safetensors refuses tensors that share memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().to("cpu").contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:  # tied weights, or a CPU view of a parameter another entry already uses
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via ``write(tmp_path)`` to a temporary file beside ``path``, fsync it, then ``os.replace`` it in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    try:  # make the rename itself durable; not possible on every platform
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _encode(obj: Any, prefix: str, tensors: dict[str, torch.Tensor] | None, where: str) -> Any:
    """JSON-able form of ``obj``; tensors go to ``tensors`` under ``prefix<n>`` (not allowed if it is None)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        if tensors is None:
            raise TypeError(f"{where} holds a tensor; only JSON-like values can be stored there")
        name = f"{prefix}{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: name}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, prefix, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, prefix, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not {_TENSOR, _TUPLE, _ITEMS} & set(obj):
            return {k: _encode(v, prefix, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {_ITEMS: [[_encode(k, prefix, tensors, f"{where} key"), _encode(v, prefix, tensors, f"{where}[{k!r}]")]
                         for k, v in obj.items()]}
    if hasattr(obj, "item") and callable(obj.item) and type(obj).__module__ == "numpy":
        return obj.item()  # a numpy scalar
    raise TypeError(f"cannot store a {type(obj).__name__} at {where} in a checkpoint; use JSON-like values "
                    "(dict, list, tuple, str, number, bool, None) or tensors")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_TUPLE}:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
        if set(obj) == {_ITEMS}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------------- loading
class _Checkpoint:
    """A checkpoint file whose header and metadata have been checked; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.entries = self._read_header()
        self.meta = self._read_meta()

    def error(self, what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {self.path}: {what}")

    def _read_header(self) -> dict[str, Any]:
        """Check the safetensors framing by hand, so a bad file gets a message saying what is wrong with it."""
        p = self.path
        if not p.exists():
            raise self.error("no such file")
        if not p.is_file():
            raise self.error("not a regular file")
        size = p.stat().st_size
        if size < 8:
            raise self.error(f"the file is {size} bytes long: empty or truncated, not a safetensors checkpoint")
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8 or n > _MAX_HEADER:
                raise self.error(f"not a safetensors file, or truncated: its first 8 bytes announce a {n}-byte "
                                 f"header but only {size - 8} bytes follow")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self.error(f"corrupted: the safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self.error("corrupted: the safetensors header is not a JSON object")
        data_len = size - 8 - n
        entries: dict[str, Any] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                start, end = (int(v) for v in info["data_offsets"])
                shape = [int(d) for d in info["shape"]]
                str(info["dtype"])
            except (TypeError, KeyError, ValueError):
                raise self.error(f"corrupted: malformed header entry for tensor {name!r}") from None
            if not 0 <= start <= end:
                raise self.error(f"corrupted: tensor {name!r} has invalid byte offsets [{start}, {end}]")
            if end > data_len:
                raise self.error(f"truncated: tensor {name!r} ends at data byte {end} but the file holds only "
                                 f"{data_len} bytes of tensor data")
            entries[name] = {"shape": shape, "dtype": info["dtype"]}
        self._raw_meta = header.get("__metadata__")
        return entries

    def _read_meta(self) -> dict[str, Any]:
        raw = self._raw_meta
        if not isinstance(raw, dict) or _META_KEY not in raw:
            raise self.error("no DynaNeural metadata: this safetensors file was not written by "
                             "dynaneural.engine.save_model")
        try:
            meta = json.loads(raw[_META_KEY])
        except (TypeError, json.JSONDecodeError) as e:
            raise self.error(f"corrupted: the DynaNeural metadata is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise self.error(f"metadata does not describe a {FORMAT_NAME} file")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise self.error(f"checkpoint format version {version!r} (written by dynaneural "
                             f"{meta.get('library_version', '?')}); this dynaneural {__version__} reads format "
                             f"version {FORMAT_VERSION}")
        if raw.get(_META_DIGEST_KEY) != hashlib.sha256(raw[_META_KEY].encode()).hexdigest():
            raise self.error("corrupted: the DynaNeural metadata does not match the checksum recorded when it was "
                             "saved")
        for key in ("model", "sha256", "extras"):
            if not isinstance(meta.get(key), dict):
                raise self.error(f"corrupted: metadata field {key!r} is missing or not an object")
        return meta

    def names(self, group: str) -> list[str]:
        if group == "weights":
            return [k for k in self.entries if not k.startswith((_EXTRAS, _TRAIN))]
        prefix = _EXTRAS if group == "extras" else _TRAIN
        return [k for k in self.entries if k.startswith(prefix)]

    def tensors(self, group: str, *, verify: bool = True) -> dict[str, torch.Tensor]:
        """Read the tensors of one group (``weights``, ``extras``, ``training_state``) and check their digest."""
        names = self.names(group)
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                out = {k: f.get_tensor(k) for k in names}
        except Exception as e:  # safetensors raises its own error types; never let them escape unexplained
            raise self.error(f"cannot read the tensors ({type(e).__name__}: {e})") from None
        if verify:
            expected = self.meta["sha256"].get(group)
            if expected != _digest(out):
                raise self.error(f"corrupted: the {group} do not match the checksum recorded when it was saved")
        return out

    def info(self, *, verify: bool = True) -> CheckpointInfo:
        m = self.meta
        model = m["model"]
        try:
            extras = _decode(m["extras"], self.tensors("extras", verify=verify))
            kwargs = _decode(model.get("kwargs") or {}, {})
            config = _decode(model.get("config") or {}, {})
        except (KeyError, TypeError, ValueError) as e:
            raise self.error(f"corrupted: cannot decode the metadata ({type(e).__name__}: {e})") from None
        return CheckpointInfo(path=self.path, format_version=int(m["format_version"]),
                              library_version=str(m.get("library_version", "?")), model_name=model.get("name"),
                              model_kwargs=dict(kwargs), model_class=str(model.get("class", "?")),
                              model_config=dict(config), exit_rule=m.get("exit_rule"), extras=extras,
                              has_training_state=m.get("training_state") is not None)


def read_checkpoint(path: str | os.PathLike[str], *, verify: bool = True) -> CheckpointInfo:
    """Read a checkpoint's metadata and extras (not its weights).

    Raises:
        CheckpointError: the file is missing, not a DynaNeural checkpoint, corrupted or of another format version.
    """
    return _Checkpoint(path).info(verify=verify)


def load_weights(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True, verify: bool = True
                 ) -> CheckpointInfo:
    """Load a checkpoint's weights and buffers into ``model`` and restore its exit rule.

    Args:
        model: a model of the same architecture.
        path: the checkpoint.
        strict: every key must be present on both sides (shapes must always match).
        verify: check the weights against the checksum recorded at save time.

    Returns:
        The checkpoint's metadata.

    Raises:
        CheckpointError: the file cannot be read, or its weights do not fit ``model``.
    """
    ckpt = _Checkpoint(path)
    info = ckpt.info(verify=verify)
    weights = ckpt.tensors("weights", verify=verify)
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if mismatched or (strict and (missing or unexpected)):
        problems = []
        for label, items in (("shape mismatch", mismatched), ("missing from the checkpoint", missing),
                             ("not in the model", unexpected)):
            if items and (strict or label == "shape mismatch"):
                shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
                problems.append(f"{label}: {shown}")
        saved = info.model_name or info.model_class
        raise ckpt.error(f"its weights (saved from {saved!r} {info.model_kwargs}) do not fit this "
                         f"{type(model).__name__}: " + "; ".join(problems))
    try:
        model.load_state_dict(weights, strict=strict)
    except RuntimeError as e:
        raise ckpt.error(f"cannot load its weights: {e}") from None
    _restore_exit_rule(model, info, ckpt)
    return info


def _restore_exit_rule(model: nn.Module, info: CheckpointInfo, ckpt: _Checkpoint) -> None:
    if info.exit_rule is None or not hasattr(model, "exit_rule"):
        return
    from dynaneural.policies.exit_rules import create_exit_rule

    try:
        if hasattr(model, "configure_exits") and isinstance(getattr(model, "exit_thresholds", None), torch.Tensor):
            model.configure_exits(rule=info.exit_rule, thresholds=model.exit_thresholds.clone())
        else:
            model.exit_rule = create_exit_rule(info.exit_rule)
    except (ValueError, TypeError) as e:
        raise ckpt.error(f"cannot restore its exit rule {info.exit_rule}: {e}") from None


def load_model(path: str | os.PathLike[str], *, device: str | torch.device = "cpu", verify: bool = True
               ) -> nn.Module:
    """Rebuild a model with ``create_model`` from a checkpoint's metadata and load its weights strictly.

    The model is returned in eval mode on ``device``, with its calibrated thresholds and exit rule restored.

    Raises:
        CheckpointError: the file cannot be read, the model it names is unknown or cannot be built with the
            saved arguments, or the weights do not fit.
    """
    ckpt = _Checkpoint(path)
    info = ckpt.info(verify=verify)
    if not info.model_name:
        raise ckpt.error(f"it records no registered model name (it was saved from a {info.model_class} not built "
                         "by dynaneural.create_model); build the model yourself and call load_weights(model, path)")
    import dynaneural  # noqa: F401  (importing the package registers every model)
    from dynaneural.registry import create_model

    try:
        model = create_model(info.model_name, **info.model_kwargs)
    except (ValueError, TypeError) as e:
        raise ckpt.error(f"cannot rebuild model {info.model_name!r} with {info.model_kwargs}: {e} (saved by "
                         f"dynaneural {info.library_version}; this is {__version__})") from None
    load_weights(model, path, strict=True, verify=verify)
    return model.to(device).eval()


def load_training_state(path: str | os.PathLike[str], *, verify: bool = True) -> TrainingState:
    """Read the :class:`TrainingState` stored in a checkpoint (apply it with the optimizer's ``load_state_dict``
    and :meth:`TrainingState.restore_rng`).

    Raises:
        CheckpointError: the file cannot be read or holds no training state.
    """
    ckpt = _Checkpoint(path)
    raw = ckpt.meta.get("training_state")
    if raw is None:
        raise ckpt.error("it holds no training state (it was saved without training_state=...)")
    tensors = ckpt.tensors("training_state", verify=verify)
    try:
        d = _decode(raw, tensors)
        return TrainingState(epoch=int(d["epoch"]), step=int(d["step"]), optimizer=d["optimizer"],
                             scheduler=d.get("scheduler"), rng=dict(d.get("rng") or {}),
                             extra=dict(d.get("extra") or {}))
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt.error(f"corrupted training state ({type(e).__name__}: {e})") from None

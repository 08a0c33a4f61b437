"""Checkpoints: exact round trips, and a clear CheckpointError for every kind of bad file."""

import hashlib
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import dynaneural as dn
from dynaneural.engine import (
    CheckpointError,
    TrainingState,
    load_model,
    load_training_state,
    load_weights,
    read_checkpoint,
    save_model,
)
from dynaneural.engine import checkpoint as ckpt_module


def _calibrated_model():
    model = dn.create_model("test_exit_convnet", num_classes=7)
    model.configure_exits(rule="entropy", thresholds=[0.3, 0.5, float("-inf")])
    with torch.no_grad():  # make batch-norm statistics non-trivial so that buffers matter
        model.train()
        model(torch.randn(16, 1, 8, 8) * 2 + 1)
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    model = _calibrated_model()
    path = save_model(model, tmp_path / "model.safetensors", extras={"calibration": {"budget": 0.5}})
    return model, path


def test_round_trip_restores_outputs_thresholds_and_exit_rule(saved):
    model, path = saved
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.model_name == "test_exit_convnet" and loaded.model_kwargs == {"num_classes": 7}
    assert loaded.exit_rule.name == "entropy"
    assert torch.equal(loaded.exit_thresholds, model.exit_thresholds)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(32, 1, 8, 8)
    with torch.inference_mode():
        for mode in ("train", "simulate", "execute"):
            a, b = model(x, mode=mode), loaded(x, mode=mode)
            assert torch.equal(a.logits, b.logits), mode
            assert torch.equal(a.exit_index, b.exit_index), mode
            assert torch.equal(a.cost, b.cost), mode


def test_metadata_and_extras(tmp_path):
    model = _calibrated_model()
    extras = {"thresholds": torch.tensor([0.1, 0.2]), "pair": (1, 2.5), "by_id": {3: "x"}, "nested": [None, True]}
    path = save_model(model, tmp_path / "m.safetensors", extras=extras)
    info = read_checkpoint(path)
    assert info.model_name == "test_exit_convnet" and info.model_kwargs == {"num_classes": 7}
    assert info.library_version == dn.__version__ and info.format_version == ckpt_module.FORMAT_VERSION
    assert info.exit_rule == {"name": "entropy"}
    assert info.model_config["num_classes"] == 7 and info.model_config["widths"] == (4, 8, 8)
    assert torch.equal(info.extras["thresholds"], extras["thresholds"])
    assert info.extras["pair"] == (1, 2.5) and info.extras["by_id"] == {3: "x"} and info.extras["nested"] == [None, True]
    assert not info.has_training_state
    with pytest.raises(TypeError, match=r"extras.bad"):
        save_model(model, tmp_path / "bad.safetensors", extras={"bad": object()})
    assert not (tmp_path / "bad.safetensors").exists()


def test_training_state_round_trip_is_exact(tmp_path):
    torch.manual_seed(1)
    model = dn.create_model("test_exit_convnet")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.99))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 1, 8, 8)).logits.sum().backward()
        opt.step()
    gen = torch.Generator().manual_seed(5)
    torch.randn(3, generator=gen)
    state = TrainingState(epoch=3, step=17, optimizer=opt.state_dict(), scheduler={"last_epoch": 17},
                          rng=TrainingState.capture_rng({"order": gen}), extra={"history": [{"loss": 1.5}]})
    path = save_model(model, tmp_path / "last.safetensors", training_state=state)
    assert read_checkpoint(path).has_training_state
    back = load_training_state(path)
    assert (back.epoch, back.step, back.scheduler, back.extra) == (3, 17, {"last_epoch": 17}, state.extra)
    saved_opt, loaded_opt = opt.state_dict(), back.optimizer
    assert loaded_opt["param_groups"] == saved_opt["param_groups"]  # incl. tuple betas and int param ids
    assert loaded_opt["state"].keys() == saved_opt["state"].keys()
    for pid, s in saved_opt["state"].items():
        for key, v in s.items():
            assert torch.equal(loaded_opt["state"][pid][key], v), (pid, key)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fresh.load_state_dict(loaded_opt)
    expected_next = torch.randn(4, generator=gen)
    torch.rand(10)  # move the global RNG away, restore must bring it back
    back.restore_rng({"order": gen})
    assert torch.equal(torch.randn(4, generator=gen), expected_next)
    assert torch.equal(torch.get_rng_state(), state.rng["torch"])
    # The same file is also an ordinary model checkpoint.
    assert isinstance(load_model(path), nn.Module)


def test_load_training_state_needs_one(saved):
    with pytest.raises(CheckpointError, match="no training state"):
        load_training_state(saved[1])


def _expect_error(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("keep", [0, 5, 8, 200, -1])
def test_truncated_file(saved, keep):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    _expect_error(path, "truncated|too short|bytes long|not a safetensors")


def test_flipped_bytes_in_header(saved):
    _, path = saved
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    for pos in (3, 8, 9, 8 + n // 3, 8 + n // 2, 8 + n - 2):
        corrupt = bytearray(data)
        corrupt[pos] ^= 0xFF
        path.write_bytes(bytes(corrupt))
        _expect_error(path, "corrupted|not a safetensors|truncated")


def test_flipped_bytes_in_weights_fail_the_checksum(saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    _expect_error(path, "checksum")


@pytest.mark.parametrize("content", [b"", b"hello, this is not a checkpoint\n" * 10, bytes(range(256)) * 40])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    _expect_error(path, "not a safetensors|bytes long|corrupted")


def test_missing_file_and_directory(tmp_path):
    _expect_error(tmp_path / "nope.safetensors", "no such file")
    _expect_error(tmp_path, "not a regular file")


def test_plain_safetensors_without_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(dn.create_model("test_exit_convnet").state_dict(), path)
    _expect_error(path, "no DynaNeural metadata")


def _rewrite_meta(path, edit):
    """Rewrite the metadata as another writer would (with a valid checksum)."""

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["dynaneural"])
    edit(info)
    meta["dynaneural"] = json.dumps(info)
    meta["dynaneural_sha256"] = hashlib.sha256(meta["dynaneural"].encode()).hexdigest()
    save_file(tensors, path, metadata=meta)


def test_edited_metadata_fails_its_checksum(saved):
    _, path = saved
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["dynaneural"] = meta["dynaneural"].replace('"num_classes": 7', '"num_classes": 8', 1)
    save_file(tensors, path, metadata=meta)
    _expect_error(path, "metadata does not match")


def test_format_version_mismatch(saved):
    _, path = saved
    _rewrite_meta(path, lambda m: m.update(format_version=99))
    _expect_error(path, "format version 99")


def test_unknown_model_name(tmp_path):
    model = dn.create_model("test_exit_convnet")
    model.model_name = "test_exit_convnett"
    path = save_model(model, tmp_path / "m.safetensors")
    _expect_error(path, "cannot rebuild model 'test_exit_convnett'.*did you mean")


def test_unknown_model_kwargs(saved):
    _, path = saved
    _rewrite_meta(path, lambda m: m["model"]["kwargs"].update(colour="red"))
    _expect_error(path, "cannot rebuild model.*colour")


def test_weights_do_not_fit(saved):
    _, path = saved  # 7 classes
    other = dn.create_model("test_exit_convnet", num_classes=10)
    with pytest.raises(CheckpointError, match=r"shape mismatch: heads\.0\.fc\.weight: checkpoint \(7, 4\)"):
        load_weights(other, path)
    smaller = dn.create_model("test_exit_convnet", num_classes=7, num_stages=2)
    with pytest.raises(CheckpointError, match="not in the model: stages.2"):
        load_weights(smaller, path)


def test_model_not_from_registry(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    path = save_model(model, tmp_path / "plain.safetensors")
    _expect_error(path, "no registered model name")
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    load_weights(other, path)
    assert torch.equal(other[1].weight, model[1].weight)


def test_interrupted_save_keeps_previous_checkpoint(saved, monkeypatch):
    model, path = saved
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, path)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind
    load_model(path)


def test_tied_weights_are_saved(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    path = save_model(model, tmp_path / "tied.safetensors")
    other = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    load_weights(other, path)
    assert torch.equal(other[1].weight, model[0].weight)

"""train / evaluate: determinism, exact resumption, plain classifiers, config validation."""

import math

import pytest
import torch
from torch import nn

import dynaneural as dn
from dynaneural.engine import CHECKPOINT_NAME, TrainConfig, evaluate, load_model, read_checkpoint, train

N, BATCH = 48, 16  # 3 steps per epoch


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (N + 24,), generator=g)
    x = torch.randn(N + 24, 1, 8, 8, generator=g) * 0.5
    x[:, 0, :, :] += y.view(-1, 1, 1).float() - 1  # learnable: the class shifts the mean
    return x[:N], y[:N], x[N:], y[N:]


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return dn.create_model("test_exit_convnet", num_classes=3, **kwargs)


def _config(**overrides):
    base = dict(epochs=4, batch_size=BATCH, lr=0.05, warmup_epochs=1, device="cpu", progress=False, num_threads=1,
                distill_alpha=0.3, exit_weights="linear")
    return TrainConfig(**{**base, **overrides})


def noisy(x, *, generator):
    """An augmentation that draws from the run's generator, so its state must be checkpointed too."""
    return x + 0.05 * torch.randn(x.shape, generator=generator)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_same_weights_and_different_seed_differs(data):
    x, y, _, _ = data
    runs = []
    for seed in (0, 0, 1):
        model = _model(exit_policy=True)
        train(model, train_x=x, train_y=y, config=_config(epochs=2, seed=seed, optimizer="adamw", lr=1e-2),
              augment=noisy)
        runs.append(model)
    assert _same_weights(runs[0], runs[1])
    assert not _same_weights(runs[0], runs[2])


def test_learns_and_reports_history(data, tmp_path):
    x, y, vx, vy = data
    model = _model()
    res = train(model, train_x=x, train_y=y, val_x=vx, val_y=vy, config=_config(epochs=6, checkpoint_dir=tmp_path,
                checkpoint_every=4))
    assert [h["epoch"] for h in res.history] == list(range(1, 7))
    assert res.steps == 18 and res.epochs_completed == 6 and res.resumed_from is None
    first, last = res.history[0], res.history[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["val_acc"] > 0.5
    assert {"val_acc/exit0", "val_acc/exit2", "train_acc/exit1", "train/ce/exit0", "train/distill", "lr"} <= set(last)
    assert math.isclose(last["lr"], 0.0, abs_tol=1e-12)  # cosine annealed to min_lr_ratio = 0
    assert res.checkpoint == tmp_path / CHECKPOINT_NAME
    info = read_checkpoint(res.checkpoint)
    assert info.extras["train"]["epoch"] == 6 and len(info.extras["train"]["history"]) == 6
    assert _same_weights(load_model(res.checkpoint), model)


def _interrupting(after_calls):
    calls = {"n": 0}

    def augment(x, *, generator):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise KeyboardInterrupt  # the machine goes down in the middle of epoch 3
        return noisy(x, generator=generator)

    return augment


def test_resume_after_interruption_gives_identical_weights(data, tmp_path):
    x, y, vx, vy = data
    reference = _model()
    ref = train(reference, train_x=x, train_y=y, val_x=vx, val_y=vy, augment=noisy,
                config=_config(checkpoint_dir=tmp_path / "ref"))

    cfg = _config(checkpoint_dir=tmp_path / "run")
    model = _model()
    with pytest.raises(KeyboardInterrupt):
        train(model, train_x=x, train_y=y, val_x=vx, val_y=vy, config=cfg, augment=_interrupting(2 * 3 + 1))
    assert read_checkpoint(tmp_path / "run" / CHECKPOINT_NAME).extras["train"]["epoch"] == 2

    torch.manual_seed(123)  # a new process: different global RNG, freshly initialised model
    resumed = _model(seed=99)
    res = train(resumed, train_x=x, train_y=y, val_x=vx, val_y=vy, config=cfg, augment=noisy)
    assert res.resumed_from == tmp_path / "run" / CHECKPOINT_NAME
    assert res.steps == ref.steps == 12
    assert _same_weights(resumed, reference)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in res.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in ref.history]

    # Resuming a finished run does nothing more.
    again = train(resumed, train_x=x, train_y=y, config=cfg, augment=noisy)
    assert again.steps == 12 and _same_weights(resumed, reference)


def test_max_steps_cut_inside_an_epoch_resumes_exactly(data, tmp_path):
    x, y, _, _ = data
    reference = _model(exit_policy=True)
    train(reference, train_x=x, train_y=y, config=_config(epochs=3, optimizer="adamw", lr=1e-2), augment=noisy)

    model = _model(exit_policy=True)
    cut = train(model, train_x=x, train_y=y, augment=noisy,
                config=_config(epochs=3, optimizer="adamw", lr=1e-2, checkpoint_dir=tmp_path, max_steps=4))
    assert (cut.steps, cut.epochs_completed, len(cut.history)) == (4, 1, 1)
    assert not _same_weights(model, reference)
    res = train(model, train_x=x, train_y=y, augment=noisy,
                config=_config(epochs=3, optimizer="adamw", lr=1e-2, checkpoint_dir=tmp_path))
    assert res.steps == 9 and res.epochs_completed == 3
    assert _same_weights(model, reference)


def test_resume_with_another_config_is_refused(data, tmp_path):
    x, y, _, _ = data
    train(_model(), train_x=x, train_y=y, config=_config(epochs=1, checkpoint_dir=tmp_path))
    with pytest.raises(ValueError, match="lr: 0.05 in the checkpoint, 0.1 now"):
        train(_model(), train_x=x, train_y=y, config=_config(epochs=1, lr=0.1, checkpoint_dir=tmp_path))
    res = train(_model(), train_x=x, train_y=y, config=_config(epochs=1, lr=0.1, checkpoint_dir=tmp_path),
                resume=False)
    assert res.resumed_from is None and res.steps == 3


def test_plain_classifier(data):
    x, y, vx, vy = data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    res = train(model, train_x=x, train_y=y, val_x=vx, val_y=vy, config=_config(epochs=3, distill_alpha=0.0))
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert "val_acc/exit0" not in res.history[-1] and "train/ce/exit0" in res.history[-1]
    ev = evaluate(model, vx, vy, mode="execute")
    assert ev.exit_accuracy is None and ev.mean_cost is None and ev.accuracy == res.history[-1]["val_acc"]


def test_custom_loss_and_non_finite_loss(data):
    x, y, _, _ = data
    model = _model()
    res = train(model, train_x=x, train_y=y, config=_config(epochs=1),
                loss_fn=lambda out, target: nn.functional.cross_entropy(out.logits, target))
    assert set(res.history[0]) >= {"train_loss"} and "train_acc/exit0" not in res.history[0]
    with pytest.raises(FloatingPointError, match="training loss is nan at step 0"):
        train(model, train_x=x, train_y=y, config=_config(epochs=1),
              loss_fn=lambda out, target: out.logits.sum() * float("nan"))


def test_evaluate_modes(data):
    x, y, vx, vy = data
    model = _model()
    model.configure_exits(rule="confidence", thresholds=[0.4, 0.45, float("-inf")])
    was = model.training
    r_train = evaluate(model, vx, vy, mode="train", batch_size=7)
    r_sim = evaluate(model, vx, vy, mode="simulate", batch_size=7)
    r_exe = evaluate(model, vx, vy, mode="execute", batch_size=5)
    assert model.training == was
    assert len(r_train.exit_accuracy) == 3 and r_train.exit_fraction is None
    assert r_train.accuracy == r_train.exit_accuracy[-1] == r_sim.exit_accuracy[-1]
    assert r_exe.exit_accuracy is None
    assert r_sim.accuracy == r_exe.accuracy and math.isclose(r_sim.mean_cost, r_exe.mean_cost)
    assert math.isclose(sum(r_exe.exit_fraction), 1.0) and r_exe.exit_fraction == r_sim.exit_fraction
    assert r_exe.mean_cost <= r_train.mean_cost
    assert r_exe.to_dict()["num_samples"] == len(vy)


def test_data_validation(data):
    x, y, _, _ = data
    model = _model()
    cfg = _config(epochs=1)
    with pytest.raises(TypeError, match="integer class indices"):
        train(model, train_x=x, train_y=y.float(), config=cfg)
    with pytest.raises(ValueError, match="different numbers of samples"):
        train(model, train_x=x[:-1], train_y=y, config=cfg)
    with pytest.raises(ValueError, match="both val_x and val_y"):
        train(model, train_x=x, train_y=y, val_x=x, config=cfg)
    with pytest.raises(TypeError, match="TrainConfig"):
        train(model, train_x=x, train_y=y, config={"epochs": 1})


@pytest.mark.parametrize("bad", [
    dict(epochs=0), dict(batch_size=2.5), dict(lr=0), dict(lr=-1), dict(optimizer="adam"), dict(schedule="step"),
    dict(warmup_epochs=5, epochs=2), dict(min_lr_ratio=2), dict(max_steps=0), dict(checkpoint_every=0),
    dict(distill_alpha=2), dict(exit_weights="cubic"), dict(device="tpu9"), dict(grad_clip=0), dict(seed=-1),
    dict(nesterov=True, optimizer="adamw"),
])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_config_dict_round_trip(tmp_path):
    cfg = TrainConfig(epochs=3, exit_weights=[1, 2], checkpoint_dir=str(tmp_path), device="cpu")
    assert cfg.checkpoint_dir == tmp_path and cfg.exit_weights == (1.0, 2.0)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['epoch'\]"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(TypeError):
        TrainConfig(3)  # keyword-only


def test_channels_last_training_returns_a_default_format_model():
    import dynaneural as dn
    from dynaneural.engine import TrainConfig, train

    model = dn.create_model("test_exit_convnet")
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    train(model, train_x=x, train_y=y, config=TrainConfig(epochs=1, batch_size=32, progress=False, device="cpu",
                                                          channels_last=True))
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()


def test_trains_a_token_model_on_integer_ids():
    """Sequence models take int64 token ids; the loop accepts them and learns a trivial rule (first token)."""
    model = dn.create_model("test_skip_lstm")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, model.vocab_size, (256, *model.input_shape), generator=g)
    y = (x[:, -1] % 2).long()
    res = train(model, train_x=x, train_y=y, config=TrainConfig(epochs=3, batch_size=32, lr=0.01, optimizer="adamw",
                                                               progress=False))
    assert math.isfinite(res.history[-1]["train_loss"])
    with pytest.raises(TypeError, match="token ids"):
        train(model, train_x=x.to(torch.uint8), train_y=y, config=TrainConfig(epochs=1, progress=False))

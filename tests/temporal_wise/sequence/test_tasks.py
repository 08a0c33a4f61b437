"""The adding task (Skip RNN paper, Sec. 4.1): markers where the paper puts them, targets, the accuracy measure."""

import pytest
import torch

from dynaneural.temporal_wise.sequence.tasks import ADDING_SOLVED_MSE, adding_accuracy, make_adding_task


def test_markers_and_targets_follow_the_paper():
    task = make_adding_task(500, steps=50, seed=3)
    assert task.x.shape == (500, 50, 2) and task.y.shape == (500,) and len(task) == 500
    marks = task.x[..., 1]
    assert torch.equal(marks.sum(1), torch.full((500,), 2.0))
    pos = marks.nonzero()[:, 1].view(500, 2)
    assert bool((pos[:, 0] < 5).all()) and bool((pos[:, 1] >= 25).all())  # first 10 %, last half
    values = task.x[..., 0]
    assert bool(((values >= 0) & (values < 1)).all())
    assert torch.allclose(task.y, (values * marks).sum(1))


def test_deterministic_per_seed():
    a, b, c = make_adding_task(20, seed=1), make_adding_task(20, seed=1), make_adding_task(20, seed=2)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and not torch.equal(a.x, c.x)


def test_accuracy_measure():
    y = torch.tensor([0.5, 1.0, 1.5, 0.2])
    r = adding_accuracy(y + torch.tensor([0.0, 0.01, 0.2, -0.049]), y)
    assert r["accuracy"] == 0.75 and r["solved"] is (r["mse"] < ADDING_SOLVED_MSE)
    assert adding_accuracy(y, y) == {"mse": 0.0, "accuracy": 1.0, "tolerance": 0.05, "solved": True}


@pytest.mark.parametrize("kw", [{"n": 0}, {"n": 4, "steps": 3}])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        make_adding_task(**kw)


def test_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        adding_accuracy(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="tolerance"):
        adding_accuracy(torch.zeros(3), torch.zeros(3), tolerance=0)

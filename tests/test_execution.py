"""The compaction helpers of execute mode."""

import pytest
import torch

from dynaneural.execution import group_rows, rows_where, run_rows, select_rows, tree_index_select


def test_run_rows_computes_only_the_selected_rows():
    seen = []

    def fn(t):
        seen.append(t.shape[0])
        return t * 10

    x = torch.arange(5.0).unsqueeze(1)
    idx = rows_where(torch.tensor([True, False, True, False, False]))
    out = run_rows(fn, x, idx)
    assert seen == [2]
    assert out.squeeze(1).tolist() == [0.0, 1.0, 20.0, 3.0, 4.0]
    assert x.squeeze(1).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0], "the input is not modified"


def test_run_rows_edge_cases():
    x = torch.ones(3, 2)
    calls = []
    assert run_rows(lambda t: calls.append(1) or t, x, torch.empty(0, dtype=torch.long)) is x and not calls
    torch.testing.assert_close(run_rows(lambda t: t + 1, x, torch.arange(3)), x + 1)
    into = torch.zeros(3, 4)
    out = run_rows(lambda t: torch.ones(t.shape[0], 4), x, torch.tensor([1]), into=into)
    assert out.sum() == 4 and out[1].sum() == 4


def test_run_rows_inplace_writes_the_state_and_refuses_autograd_tensors():
    x = torch.arange(5.0).unsqueeze(1)
    out = run_rows(lambda t: t * 10, x, torch.tensor([2, 4]), inplace=True)
    assert out is x and x.squeeze(1).tolist() == [0.0, 1.0, 20.0, 3.0, 40.0]
    leaf = torch.ones(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match="autograd"):
        run_rows(lambda t: t + 1, leaf, torch.tensor([0]), inplace=True)
    with torch.no_grad():
        state = leaf.detach().clone()
        assert run_rows(lambda t: t + 1, state, torch.tensor([0]), inplace=True) is state


def test_rows_where_validates():
    with pytest.raises(ValueError):
        rows_where(torch.tensor([1, 0]))


def test_group_rows_partitions_in_stable_order():
    keys = torch.tensor([2, 0, 2, 1, 0, 2])
    groups = group_rows(keys, 4)
    assert [g.tolist() for g in groups] == [[1, 4], [3], [0, 2, 5], []]
    with pytest.raises(ValueError):
        group_rows(keys, 2)


def test_tree_cat_and_slice_keep_the_structure():
    from dynaneural.execution import tree_cat, tree_slice

    a = {"h": [torch.zeros(2, 3), torch.ones(2)], "n": 3}
    b = {"h": [torch.ones(1, 3), torch.zeros(1)], "n": 3}
    c = tree_cat(a, b)
    assert c["h"][0].shape == (3, 3) and c["h"][1].tolist() == [1, 1, 0] and c["n"] == 3
    tail = tree_slice(c, 1)
    assert tail["h"][0].shape == (2, 3) and tail["h"][1].tolist() == [1, 0]
    with pytest.raises(ValueError, match="keys"):
        tree_cat({"a": torch.zeros(1)}, {"b": torch.zeros(1)})


def test_check_slots_rejects_non_positive_and_non_int():
    from dynaneural.execution import check_slots

    assert check_slots(3) == 3
    for bad in (0, -2, 2.5, True, "4", None):
        with pytest.raises(ValueError, match="slots"):
            check_slots(bad)


def test_compaction_keeps_a_channels_last_map_channels_last():
    """A sub-batch gathered from a channels-last map is channels-last too, so its convolutions run in the same
    layout as the full batch's; values equal index_select's, and a run block's rows scatter back unchanged."""
    x = torch.randn(8, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    idx = torch.tensor([6, 1, 3])
    sub = select_rows(x, idx)
    assert sub.is_contiguous(memory_format=torch.channels_last) and not sub.is_contiguous()
    assert torch.equal(sub, x.index_select(0, idx))
    assert tree_index_select({"h": x}, idx)["h"].is_contiguous(memory_format=torch.channels_last)
    plain = torch.randn(8, 6, 5, 5)
    assert select_rows(plain, idx).is_contiguous()  # standard layout stays standard
    conv = torch.nn.Conv2d(6, 6, 3, padding=1).to(memory_format=torch.channels_last)
    seen = []
    out = run_rows(lambda t: seen.append(t.is_contiguous(memory_format=torch.channels_last)) or conv(t), x, idx)
    assert seen == [True]
    ref = x.clone()
    ref[idx] = conv(x[idx])
    torch.testing.assert_close(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last)

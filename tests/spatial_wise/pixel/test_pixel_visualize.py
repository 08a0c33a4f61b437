"""Mask pictures and the ``dynaneural visualize`` / ``bench spatial`` command plumbing."""

import math

import pytest
import torch

import dynaneural as dn
from dynaneural.cli.bench_spatial import crossover_density, exact_mask, run_kernel_bench
from dynaneural.cli.cmd_visualize import available_kinds
from dynaneural.spatial_wise.pixel.visualize import mask_overlay, visualize_pixel_masks


def test_overlay_and_pngs(tmp_path):
    img = torch.randn(3, 8, 8)
    m = torch.zeros(4, 4, dtype=torch.bool)
    m[0, 0] = True
    ov = mask_overlay(img, m)
    assert ov.shape == (8, 8, 3) and float(ov.min()) >= 0 and float(ov.max()) <= 1
    for name in ("test_dynconv", "test_sact"):
        model = dn.create_model(name)
        paths = visualize_pixel_masks(model, model.example_input(3), tmp_path / name)
        assert paths and all(p.exists() and p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_visualize_kinds_include_pixel_masks():
    assert "pixel-mask" in available_kinds()


def test_crossover_density():
    assert abs(crossover_density([0.1, 0.25, 0.5], [3.0, 2.0, 0.5]) - (0.25 + 0.25 * 1.0 / 1.5)) < 1e-12
    assert math.isnan(crossover_density([0.1, 0.5], [0.8, 0.5]))
    assert crossover_density([0.1, 0.5], [3.0, 1.5]) == 1.0


def test_kernel_bench_rows_are_exact_and_complete():
    res = run_kernel_bench(batch=2, channels=8, size=16, densities=(0.25,), block=(4, 8), repeats=1,
                           log=lambda *a: None)
    rows = [r.to_dict() for r in res["rows"]]
    assert [(r["method"], r["tile"]) for r in rows] == [("sparse_conv3x3", 1), ("sbnet_conv3x3", 4),
                                                        ("sbnet_conv3x3", 8)]
    for r in rows:
        assert r["max_abs_error_vs_dense"] < 1e-4 and r["realized_speedup"] > 0 and r["static_flops"] > r["mean_flops"]
        assert r["density"] == 0.25  # exact-count masks: 64 of 256 pixels, 4 of 16 or 1 of 4 tiles
    assert {"crossover_density_sparse_conv3x3", "crossover_density_sbnet_conv3x3_tile4",
            "crossover_density_sbnet_conv3x3_tile8"} <= set(res["meta"])


def test_exact_mask_has_the_stated_count_per_sample_at_different_places():
    m = exact_mask(3, 50, 0.3, torch.Generator().manual_seed(0))
    assert m.sum(1).tolist() == [15, 15, 15] and not torch.equal(m[0], m[1])
    assert exact_mask(2, 10, 0.0, torch.Generator()).sum() == 0 and exact_mask(2, 10, 1.0, torch.Generator()).all()
    with pytest.raises(ValueError, match="density"):
        exact_mask(1, 4, 1.5, torch.Generator())

"""Mask pictures and the ``dynaneural visualize`` / ``bench spatial`` command plumbing."""

import math

import torch

import dynaneural as dn
from dynaneural.cli.bench_spatial import crossover_density, run_kernel_bench
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
    res = run_kernel_bench(batch=2, channels=8, size=16, densities=(0.25,), block=4, repeats=1, log=lambda *a: None)
    rows = [r.to_dict() for r in res["rows"]]
    assert {r["method"] for r in rows} == {"sparse_conv3x3", "sbnet_conv3x3"}
    for r in rows:
        assert r["max_abs_error_vs_dense"] < 1e-4 and r["realized_speedup"] > 0 and r["static_flops"] > r["mean_flops"]

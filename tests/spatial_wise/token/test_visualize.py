"""The token pictures are written as PNG files."""

import dynaneural as dn


def test_token_render_writes_pngs(tmp_path):
    from dynaneural.spatial_wise.token.visualize import render

    for name in ("test_dynamicvit", "test_avit", "test_tome"):
        model = dn.create_model(name)
        paths = render(model, model.example_input(2), tmp_path / name)
        assert len(paths) == 2 and all(p.stat().st_size > 0 for p in paths)

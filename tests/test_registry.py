import pytest
import torch

import dynaneural as dn
from dynaneural.registry import register_model


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean"):
        dn.create_model("test_exit_convnett")


def test_unknown_kwarg_is_rejected():
    with pytest.raises(TypeError, match="unknown argument"):
        dn.create_model("test_exit_convnet", num_clases=5)


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        @register_model
        def test_exit_convnet(*, num_classes: int = 10):  # noqa: F811
            return torch.nn.Identity()


def test_positional_entry_point_rejected():
    with pytest.raises(TypeError, match="keyword-only"):
        @register_model
        def _positional_model(num_classes=10):
            return torch.nn.Identity()


def test_list_models_wildcards():
    assert "test_exit_convnet" in dn.list_models("test_*")
    assert all(not n.startswith("test_") for n in dn.list_models(exclude_tests=True))


def test_create_model_seed_fixes_the_weights_and_leaves_the_global_rng_alone():
    import torch

    from dynaneural.registry import create_model

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = create_model("test_exit_convnet", seed=7)
    b = create_model("test_exit_convnet", seed=7)
    after = torch.rand(3)
    assert torch.equal(before, after)  # the caller's RNG stream is unchanged by the seeded builds
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    c = create_model("test_exit_convnet", seed=8)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            create_model("test_exit_convnet", seed=bad)

"""Loading a state dict into a plug: a plug whose own tensors are sized by its settings takes the stored settings
and shapes; every other mismatch (timm's tensors, another plug's own tensors) still fails a strict load."""
from __future__ import annotations

import pytest
import torch

from adala.attention import get_plug


def test_a_plug_built_with_defaults_loads_weights_trained_with_other_settings() -> None:
    trained = get_plug("hedgehog")(64, 4, feature_dim=16)
    with torch.no_grad():
        trained.feature_map_q.weight.normal_()
    fresh = get_plug("hedgehog")(64, 4)  # feature_dim 64: feature maps of another shape
    kept = fresh.feature_map_q.weight
    fresh.load_state_dict(trained.state_dict(), strict=True)
    assert fresh.settings == {"feature_dim": 16}
    assert fresh.feature_map_q.weight is kept and kept.shape == (4, 16, 16)  # resized in place, still the Parameter
    x = torch.randn(2, 17, 64)
    torch.testing.assert_close(fresh(x), trained(x))


def test_a_timm_tensor_of_another_shape_still_fails_the_load() -> None:
    state = get_plug("hedgehog")(64, 4, feature_dim=16).state_dict()
    state["qkv.weight"] = torch.zeros(96, 64)
    with pytest.raises(RuntimeError, match="size mismatch for qkv.weight"):
        get_plug("hedgehog")(64, 4).load_state_dict(state)


def test_own_tensors_of_a_plug_whose_shapes_do_not_follow_settings_are_not_resized() -> None:
    plug = get_plug("l2vit")(64, 4)
    assert not plug.shapes_follow_settings
    state = plug.state_dict()
    state["temperature"] = torch.zeros(8)
    with pytest.raises(RuntimeError, match="size mismatch for temperature"):
        get_plug("l2vit")(64, 4).load_state_dict(state)

"""The structured attention plugs (nystrom, linformer, monarch, l2vit) against independent references.

References: the PyPI packages ``nystrom-attention`` and ``linformer`` (weights copied across) where their token
policy and ours coincide (no class/register tokens, no padding); explicit dense forms written from each method's
equations elsewhere (class/register tokens, uneven segments, other resolutions, MonarchAttention's updates,
L²ViT's quadratic form and its LCM through ``F.conv2d``). float64 throughout, so tolerances are near roundoff:
the references reorder the same float64 sums (and Nyströmformer's inverse iteration amplifies their roundoff a
little), hence rtol 1e-9, atol 1e-10.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from adala.attention import get_plug
from tests.tensor_probe import LargestTensor

F64_TOL = dict(rtol=1e-9, atol=1e-10)
FP32_TOL = dict(rtol=1e-4, atol=1e-5)

# ViT token counts: (tokens, class/register tokens, patch grid).
LAYOUTS = [(197, 1, (14, 14)), (201, 5, (14, 14)), (50, 1, (7, 7))]
# Small settings that exercise each plug's structure at these token counts.
SMALL = {
    "nystrom": {"landmarks": 12},
    "linformer": {"k": 10, "grid": [7, 7]},
    "monarch": {},
    "l2vit": {},
}


def build(name: str, dim: int = 24, heads: int = 3, prefix: int = 1, layout: tuple[int, int] | None = (7, 7),
          dtype: torch.dtype = torch.float64, qkv_bias: bool = True, **settings) -> torch.nn.Module:
    """A plug with random weights everywhere (its own included), laid out for ``prefix`` tokens on ``layout``."""
    plug = get_plug(name)(dim, heads, qkv_bias=qkv_bias, dtype=dtype, **settings)
    plug.set_token_layout(prefix, layout)
    with torch.no_grad():
        for param in plug.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return plug.eval()


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


# -- Nyströmformer --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens,landmarks", [(64, 16), (196, 28), (120, 8)])
def test_nystrom_matches_the_reference_package(tokens: int, landmarks: int) -> None:
    """No class tokens and N a multiple of the landmarks: the reference pads nothing and both policies coincide.
    The reference runs once per image and head (its inverse's scaling is a max over everything it is given)."""
    from nystrom_attention import NystromAttention as Reference

    torch.manual_seed(0)
    dim, n_heads, d = 24, 3, 8
    plug = build("nystrom", dim, n_heads, prefix=0, layout=None, qkv_bias=False, landmarks=landmarks)
    x = torch.randn(2, tokens, dim, dtype=torch.float64)
    reference = Reference(dim, dim_head=d, heads=1, num_landmarks=landmarks, pinv_iterations=6,
                          residual=False).double()
    w = plug.qkv.weight.detach()
    expected = torch.zeros(2, tokens, dim, dtype=torch.float64)
    with torch.no_grad():
        for h in range(n_heads):
            rows = [w[part * dim + h * d: part * dim + (h + 1) * d] for part in range(3)]
            reference.to_qkv.weight.copy_(torch.cat(rows))
            reference.to_out[0].weight.copy_(plug.proj.weight[:, h * d:(h + 1) * d])
            reference.to_out[0].bias.zero_()
            for image in range(2):
                expected[image] += reference(x[image:image + 1])[0]
        expected += plug.proj.bias
        torch.testing.assert_close(plug(x), expected, **F64_TOL)


def nystrom_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, landmarks: int,
                     iterations: int) -> torch.Tensor:
    """One head, written out: class tokens exact rows and own landmarks, uneven ⌊r·n/m⌋ segments of patches."""
    from nystrom_attention.nystrom_attention import moore_penrose_iter_pinv

    q = q / math.sqrt(q.shape[-1])
    patches = q.shape[0] - prefix
    bounds = [prefix + r * patches // landmarks for r in range(landmarks + 1)]
    q_land = torch.stack([q[i] for i in range(prefix)] + [q[a:b].mean(0) for a, b in zip(bounds, bounds[1:])])
    k_land = torch.stack([k[i] for i in range(prefix)] + [k[a:b].mean(0) for a, b in zip(bounds, bounds[1:])])
    f = torch.softmax(q[prefix:] @ k_land.T, dim=-1)
    a = torch.softmax(q_land @ k_land.T, dim=-1)
    b = torch.softmax(q_land @ k.T, dim=-1)
    patch_rows = f @ moore_penrose_iter_pinv(a[None], iterations)[0] @ (b @ v)
    prefix_rows = torch.softmax(q[:prefix] @ k.T, dim=-1) @ v
    return torch.cat([prefix_rows, patch_rows])


@pytest.mark.parametrize("tokens,prefix,grid", LAYOUTS)
def test_nystrom_class_and_register_tokens(tokens: int, prefix: int, grid: tuple[int, int]) -> None:
    torch.manual_seed(1)
    plug = build("nystrom", prefix=prefix, layout=grid, landmarks=12, pinv_iterations=5)
    x = torch.randn(2, tokens, 24, dtype=torch.float64)
    q, k, v = plug.qkv_heads(x)
    expected = torch.stack([torch.stack([nystrom_explicit(q[b, h], k[b, h], v[b, h], prefix, 12, 5)
                                         for h in range(3)]) for b in range(2)])
    torch.testing.assert_close(plug.mix(q, k, v), expected, **F64_TOL)


def test_nystrom_falls_back_to_softmax_with_few_patches() -> None:
    torch.manual_seed(2)
    plug = build("nystrom", prefix=1, layout=(7, 7), landmarks=49)
    q, k, v = plug.qkv_heads(torch.randn(2, 50, 24, dtype=torch.float64))
    torch.testing.assert_close(plug.mix(q, k, v), softmax_attention(q, k, v), **F64_TOL)


# -- Linformer ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,k", [((7, 8), 16), ((14, 14), 32)])
def test_linformer_matches_the_reference_package(grid: tuple[int, int], k: int) -> None:
    from linformer import LinformerSelfAttention

    torch.manual_seed(3)
    dim, n_heads, d = 24, 4, 6
    tokens = grid[0] * grid[1]
    plug = build("linformer", dim, n_heads, prefix=0, layout=grid, qkv_bias=False, k=k, grid=list(grid))
    reference = LinformerSelfAttention(dim, seq_len=tokens, k=k, heads=n_heads, dim_head=d).double().eval()
    w = plug.qkv.weight.detach()
    with torch.no_grad():
        for part, layer in enumerate((reference.to_q, reference.to_k, reference.to_v)):
            layer.weight.copy_(w[part * dim:(part + 1) * dim])
        reference.proj_k.copy_(plug.key_proj.T)
        reference.proj_v.copy_(plug.value_proj.T)
        reference.to_out.load_state_dict(plug.proj.state_dict())
        x = torch.randn(2, tokens, dim, dtype=torch.float64)
        torch.testing.assert_close(plug(x), reference(x), **F64_TOL)


def linformer_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, e: torch.Tensor,
                       f: torch.Tensor) -> torch.Tensor:
    """Softmax attention over the class/register keys and values as they are plus E K, F V of the patches."""
    keys = torch.cat([k[..., :prefix, :], torch.einsum("rn,bhnd->bhrd", e, k[..., prefix:, :])], dim=-2)
    values = torch.cat([v[..., :prefix, :], torch.einsum("rn,bhnd->bhrd", f, v[..., prefix:, :])], dim=-2)
    return softmax_attention(q, keys, values)


@pytest.mark.parametrize("tokens,prefix,grid", LAYOUTS)
def test_linformer_class_and_register_tokens_stay_exact(tokens: int, prefix: int, grid: tuple[int, int]) -> None:
    torch.manual_seed(4)
    plug = build("linformer", prefix=prefix, layout=grid, k=20, grid=list(grid))
    q, k, v = plug.qkv_heads(torch.randn(2, tokens, 24, dtype=torch.float64))
    expected = linformer_explicit(q, k, v, prefix, plug.key_proj.detach(), plug.value_proj.detach())
    torch.testing.assert_close(plug.mix(q, k, v), expected, **F64_TOL)


def test_linformer_initialisation_is_segment_averaging_capped_at_the_patch_count() -> None:
    plug = get_plug("linformer")(24, 3, k=20, grid=[7, 7], dtype=torch.float64)
    torch.testing.assert_close(plug.key_proj.sum(dim=1), torch.ones(20, dtype=torch.float64))
    assert ((plug.key_proj > 0).sum(dim=0) == 1).all()  # every patch token in exactly one segment
    assert get_plug("linformer")(24, 3, k=256, grid=[7, 7]).key_proj.shape == (49, 49)


@pytest.mark.parametrize("new_grid", [(9, 12), (3, 4)])
def test_linformer_at_another_grid_resamples_its_projections(new_grid: tuple[int, int]) -> None:
    """Documented: E, F resized over the patch grid and scaled by n_old/n_new, so a row that averages a region
    still averages it; a row constant over the grid therefore becomes the mean over the new grid's tokens."""
    torch.manual_seed(5)
    plug = build("linformer", prefix=1, layout=(6, 6), k=8, grid=[6, 6])
    levels = torch.rand(8, 1, dtype=torch.float64) + 0.5
    with torch.no_grad():
        plug.key_proj.copy_(levels.expand(8, 36) / 36)
        plug.value_proj.copy_(2 * levels.expand(8, 36) / 36)
    patches = new_grid[0] * new_grid[1]
    plug.set_token_layout(1, new_grid)
    q, k, v = plug.qkv_heads(torch.randn(2, 1 + patches, 24, dtype=torch.float64))
    expected = linformer_explicit(q, k, v, 1, levels.expand(8, patches) / patches,
                                  2 * levels.expand(8, patches) / patches)
    torch.testing.assert_close(plug.mix(q, k, v), expected, **F64_TOL)


def test_linformer_without_a_grid_stops_with_one_clear_error() -> None:
    plug = build("linformer", prefix=1, layout=None, k=8, grid=[6, 6])
    with pytest.raises(ValueError, match="do not form a square grid"):
        plug(torch.randn(1, 1 + 40, 24, dtype=torch.float64))


def test_linformer_takes_the_models_grid_when_converted_and_records_it() -> None:
    """grid null (the default): E and F are laid out for the model's patch grid at conversion, so k = 256 means
    256 rows at any resolution (capped at the patch count); the export's spec and the config buffer keep it."""
    from adala.models import attention_config, linearize
    from adala.models.spec import normalise_attention

    assert normalise_attention({"kind": "linformer"})["grid"] is None
    for size, grid in ((112, [7, 7]), (320, [20, 20])):
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=size, depth=2)
        model = linearize(vit, "linformer")
        assert attention_config(model) == {"kind": "linformer", "k": 256, "grid": grid}
        assert model.blocks[1].attn.key_proj.shape == (min(256, grid[0] * grid[1]), grid[0] * grid[1])
        rebuilt = linearize(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                                              img_size=size, depth=2), attention_config(model))
        rebuilt.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(ValueError, match="needs the patch grid .*linearize .* grid=\\[rows, columns\\]"):
        get_plug("linformer")(24, 3)


def test_linformer_weights_keep_their_grid_when_attention_linformer_is_asked_for_at_another_size(
        tmp_path) -> None:
    """grid null in a request means the model's: weights already converted satisfy it with their own grid (E and F
    resampled at the new size); a grid given explicitly must match theirs."""
    from adala.errors import UserError
    from adala.models import attention_config, build_vfm, linearize, save_export

    model = linearize(build_vfm("demo_tiny"), {"kind": "linformer", "k": 16})
    path = save_export(model.state_dict(), tmp_path / "m.safetensors",
                       {"model": "demo_tiny", "attention": attention_config(model)})
    larger = build_vfm("demo_tiny", weights=path, attention={"kind": "linformer", "k": 16}, img_size=64)
    assert attention_config(larger) == {"kind": "linformer", "k": 16, "grid": [8, 8]}
    assert torch.isfinite(larger(torch.randn(1, 3, 64, 64))).all()
    with pytest.raises(UserError, match="attention.grid=\\[8,8\\]"):
        build_vfm("demo_tiny", weights=path, attention={"kind": "linformer", "k": 16, "grid": [16, 16]}, img_size=64)


# -- MonarchAttention -----------------------------------------------------------------------------------------------

def monarch_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int,
                  steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One head, MonarchAttention's alternating updates written on the dense N×N score matrix: the factors as
    maximisers of Σ_rows ⟨M_i, S_i⟩ + H(M_i) over M[(p,k),(q,j)] = L[(p,k),q] R[q,k,j]. Returns out and M."""
    n, d = q.shape
    m = math.ceil(n / b)
    size = m * b
    scores = torch.zeros(size, size, dtype=q.dtype)
    scores[:n, :n] = q @ k.T / math.sqrt(d)
    block, position = torch.arange(size) // b, torch.arange(size) % b
    real = torch.arange(size) < n
    same_position = (position[:, None] == torch.arange(b)[None, :]).to(q.dtype)  # (row, k)
    across = (block[:, None] == torch.arange(m)[None, :]).to(q.dtype)  # L[(p,k), q], block identity
    for _ in range(steps):
        weight = across[:, block] * real[:, None]  # L of the row's query for the column's block
        numerator = same_position.T @ (weight * scores)  # (k, column): Σ_p L[(p,k), q] S[(p,k), (q,j)]
        denominator = same_position.T @ weight
        # No real query weighs the padded positions of the last block at the first step: R uniform there.
        logits = torch.where(denominator > 0, numerator / denominator, 0.0).masked_fill(~real[None, :], -math.inf)
        within = torch.softmax(logits.reshape(b, m, b), dim=-1).permute(1, 0, 2)  # R[q, k, j]
        entropy = -torch.special.xlogy(within, within).sum(-1)  # (q, k)
        r_dense = within[block[None, :], position[:, None], position[None, :]]  # R[col block, row pos, col pos]
        gain = (r_dense * scores).reshape(size, m, b).sum(-1) + entropy[:, position].T
        across = torch.softmax(gain, dim=-1)
    matrix = across[:, block] * within[block[None, :], position[:, None], position[None, :]]
    padded_v = torch.cat([v, v.new_zeros(size - n, v.shape[1])])
    return (matrix @ padded_v)[:n], matrix[:n, :n]


@pytest.mark.parametrize("tokens,block_size,steps", [(197, None, 3), (201, None, 1), (50, 4, 2), (50, 7, 3)])
def test_monarch_matches_its_dense_equations(tokens: int, block_size: int | None, steps: int) -> None:
    torch.manual_seed(6)
    plug = build("monarch", block_size=block_size, steps=steps)
    q, k, v = plug.qkv_heads(torch.randn(1, tokens, 24, dtype=torch.float64))
    b = block_size or math.ceil(math.sqrt(tokens))
    expected = torch.stack([monarch_dense(q[0, h], k[0, h], v[0, h], b, steps)[0] for h in range(3)])[None]
    torch.testing.assert_close(plug.mix(q, k, v), expected, **F64_TOL)


def test_monarch_kl_to_softmax_never_grows_with_steps() -> None:
    """Each update maximises Σ_i lse(S_i) − KL(M_i ‖ softmax(S_i)) over one factor, so the KL cannot grow."""
    torch.manual_seed(7)
    q, k, v = torch.randn(3, 61, 8, dtype=torch.float64).unbind(0)
    target = torch.softmax(q @ k.T / math.sqrt(8), dim=-1)
    kls = []
    for steps in range(1, 6):
        matrix = monarch_dense(q, k, v, 8, steps)[1]
        torch.testing.assert_close(matrix.sum(-1), torch.ones(61, dtype=torch.float64))
        kls.append((torch.special.xlogy(matrix, matrix) - matrix * target.log()).sum().item())
    assert all(later <= earlier + 1e-9 for earlier, later in zip(kls, kls[1:])), kls
    assert kls[-1] < kls[0]


@pytest.mark.parametrize("block_size", [1, 50, 64])
def test_monarch_is_exact_for_one_block_or_single_token_blocks(block_size: int) -> None:
    torch.manual_seed(8)
    plug = build("monarch", block_size=block_size, steps=1)
    q, k, v = plug.qkv_heads(torch.randn(2, 50, 24, dtype=torch.float64))
    torch.testing.assert_close(plug.mix(q, k, v), softmax_attention(q, k, v), **F64_TOL)


# -- L²ViT ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens,prefix,grid", LAYOUTS)
@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_l2vit_linear_part_matches_the_quadratic_form(tokens: int, prefix: int, grid, scale: float) -> None:
    torch.manual_seed(9)
    plug = build("l2vit", prefix=prefix, layout=grid, min_denominator=2.0)
    q, k, v = (t * scale for t in plug.qkv_heads(torch.randn(2, tokens, 24, dtype=torch.float64)))
    a = F.relu(q) @ F.relu(k).transpose(-2, -1)
    bounded = a.sum(-1, keepdim=True).clamp_min(2.0)
    expected = plug.temperature.detach()[:, None, None] * (a @ v) / bounded
    torch.testing.assert_close(plug.mix(q, k, v), expected, **F64_TOL)
    clamped = (a.sum(-1) < 2.0).float().mean()
    assert (clamped < 0.1) if scale == 1.0 else (clamped > 0.5)  # both sides of the bound are exercised


@pytest.mark.parametrize("training", [False, True])
def test_l2vit_lcm_matches_a_conv2d_reference(training: bool) -> None:
    torch.manual_seed(10)
    plug = build("l2vit", prefix=5, layout=(6, 8))
    with torch.no_grad():
        plug.lcm.bn.running_mean.normal_()
        plug.lcm.bn.running_var.uniform_(0.5, 2.0)
    plug.train(training)
    x = torch.randn(2, 53, 24, dtype=torch.float64)
    mixed = torch.randn(2, 53, 24, dtype=torch.float64)
    lcm = plug.lcm
    y = F.linear(mixed, plug.proj.weight, plug.proj.bias)
    grid = y[:, 5:].transpose(1, 2).reshape(2, 24, 6, 8)
    z = F.conv2d(grid, lcm.conv1.weight, lcm.conv1.bias, padding=3, groups=24)
    z = F.batch_norm(F.gelu(z), lcm.bn.running_mean.clone(), lcm.bn.running_var.clone(), lcm.bn.weight,
                     lcm.bn.bias, training=training, eps=lcm.bn.eps)
    z = F.conv2d(z, lcm.conv2.weight, lcm.conv2.bias, padding=3, groups=24).flatten(2).transpose(1, 2)
    expected = torch.cat([y[:, :5], y[:, 5:] + z], dim=1)
    torch.testing.assert_close(plug.output(x, mixed), expected, **F64_TOL)


# -- all four plugs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SMALL))
def test_gradients_flow(name: str) -> None:
    torch.manual_seed(11)
    plug = build(name, **SMALL[name]).train()
    x = torch.randn(2, 50, 24, dtype=torch.float64, requires_grad=True)
    plug(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for param_name, param in plug.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
    assert plug.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bf16_forward_is_finite(name: str) -> None:
    torch.manual_seed(12)
    settings = {**SMALL[name], "grid": [14, 14]} if name == "linformer" else SMALL[name]
    plug = build(name, dim=64, heads=2, prefix=1, layout=(14, 14), dtype=torch.bfloat16, **settings)
    out = plug(torch.randn(2, 197, 64, dtype=torch.bfloat16) * 3)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_largest_tensor_probe_sees_a_quadratic_intermediate() -> None:
    """The control for the test below: softmax attention's N×N weights are seen."""
    q, k, v = torch.randn(3, 1, 1, 512, 8).unbind(0)
    with LargestTensor() as probe:
        softmax_attention(q, k, v)
    assert probe.largest >= 512 * 512


@pytest.mark.parametrize("name", sorted(SMALL))
def test_no_n_by_n_tensor_at_16k_tokens(name: str) -> None:
    plug_class = get_plug(name)
    assert plug_class.subquadratic
    side = 128
    tokens = side * side
    settings = {"grid": [side, side]} if name == "linformer" else {}
    plug = plug_class(8, 1, **settings).eval()
    plug.set_token_layout(0, (side, side))
    x = torch.randn(1, tokens, 8)
    with torch.no_grad(), LargestTensor() as probe:
        out = plug(x)
    assert torch.isfinite(out).all()
    assert probe.largest <= tokens * 256, f"largest tensor {probe.largest} elements at N={tokens}"  # N² / 64


@pytest.fixture(scope="module")
def vit_attention() -> torch.nn.Module:
    torch.manual_seed(13)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False).blocks[0].attn.eval()


def converted(name: str, attn: torch.nn.Module, **settings) -> torch.nn.Module:
    """``attn`` converted as linearize converts a ViT-S/16 at 224² (settings left to the model from its grid)."""
    plug_class = get_plug(name)
    plug = plug_class.from_softmax(attn, **plug_class.settings_for_model(settings, (14, 14)))
    plug.set_token_layout(1, (14, 14))
    return plug


@pytest.mark.parametrize("name,settings", [("nystrom", {"landmarks": 196}), ("linformer", {}),
                                           ("monarch", {"block_size": 197})])
def test_from_softmax_reproduces_softmax_where_the_approximation_is_exact(vit_attention, name, settings) -> None:
    """Every landmark a patch, E = F = identity (k capped at 196), one Monarch block: softmax attention exactly,
    so the copied weights and the layout are right."""
    x = torch.randn(1, 197, 192)
    with torch.no_grad():
        torch.testing.assert_close(converted(name, vit_attention, **settings)(x), vit_attention(x), **FP32_TOL)
        assert torch.isfinite(converted(name, vit_attention)(x)).all()  # the default settings


def test_from_softmax_l2vit_starts_as_its_linear_attention(vit_attention) -> None:
    """t = 1 and the LCM's last convolution zero: the converted block is ReLU linear attention through the copied
    projections, the LCM adding nothing yet."""
    plug = converted("l2vit", vit_attention)
    x = torch.randn(1, 197, 192)
    with torch.no_grad():
        q, k, v = plug.qkv_heads(x)
        a = F.relu(q) @ F.relu(k).transpose(-2, -1)
        mixed = (a @ v) / a.sum(-1, keepdim=True).clamp_min(100.0)
        expected = vit_attention.proj(mixed.transpose(1, 2).reshape(1, 197, 192))
        torch.testing.assert_close(plug(x), expected, **FP32_TOL)


NON_DEFAULT = {
    "nystrom": {"landmarks": 8, "pinv_iterations": 4},
    "linformer": {"k": 8, "grid": [7, 7]},
    "monarch": {"block_size": 5, "steps": 2},
    "l2vit": {"min_denominator": 3.0},
}


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_state_dict_round_trip_restores_settings(name: str) -> None:
    torch.manual_seed(14)
    trained = build(name, dim=32, heads=2, prefix=1, layout=(7, 7), **NON_DEFAULT[name])
    defaults = get_plug(name).settings_for_model({}, (3, 3))  # Linformer's laid out for another grid
    fresh = get_plug(name)(32, 2, qkv_bias=True, dtype=torch.float64, **defaults).eval()
    fresh.load_state_dict(trained.state_dict())
    assert fresh.settings == {**get_plug(name).defaults, **NON_DEFAULT[name]}
    assert fresh.num_prefix_tokens == 1
    x = torch.randn(2, 50, 32, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), trained(x), **F64_TOL)


@pytest.mark.parametrize("name,bad", [("nystrom", {"landmarks": 0}), ("linformer", {"grid": [7]}),
                                      ("monarch", {"steps": 1.5}), ("l2vit", {"min_denominator": -1})])
def test_bad_settings_stop_with_one_clear_error(name: str, bad: dict) -> None:
    known = ", ".join(sorted(get_plug(name).defaults))
    with pytest.raises(ValueError, match=f"has no setting bogus; its settings: {known}"):
        get_plug(name)(24, 3, bogus=1)
    with pytest.raises(ValueError, match=next(iter(bad))):
        get_plug(name)(24, 3, **bad)

"""The kernelized plugs (Hedgehog, LoLCATS, Performer, cosFormer) against independent references.

References: the explicit quadratic forms, written out here from the papers' equations (Hedgehog's φ(Q)φ(K)ᵀV / row
sums; LoLCATS query by query, its window listed from grid coordinates; cosFormer through the identity
q'_i·k'_j = relu(q_i)·relu(k_j) cos(θ_i − θ_j), not through the plug's sin/cos features), and the PyPI package
``performer-pytorch`` with the plug's projection copied in. All in float64, so agreement is to rounding (1e-10).
"""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from adala.attention import get_plug
from adala.attention.performer import PerformerAttention
from tests.tensor_probe import LargestTensor

PLUGS = ("cosformer", "hedgehog", "lolcats", "performer")
# (tokens, class + register tokens): ViT-B/16 at 224, the same with 4 registers, ViT-B/32 at 224.
LAYOUTS = [(197, 1), (201, 5), (50, 1)]
TOL = dict(rtol=1e-10, atol=1e-10)


def random_qkv(tokens: int, heads: int = 2, head_dim: int = 8, batch: int = 2) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, heads, tokens, head_dim, dtype=torch.float64) for _ in range(3))


def build(name: str, prefix: int, heads: int = 2, head_dim: int = 8, **settings) -> torch.nn.Module:
    """A float64 plug whose own parameters are random (not their initial values), so the references test them."""
    plug = get_plug(name)(heads * head_dim, heads, **settings).double()
    plug.set_token_layout(prefix)
    with torch.no_grad():
        for param_name, param in plug.named_parameters():
            if param_name.startswith(("feature_map", "window_factor")):
                param.normal_(0, 0.5)
    return plug


def hedgehog_features(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    projected = torch.einsum("bhnd,hdf->bhnf", x, weight)
    positive, negative = projected.exp(), (-projected).exp()
    return torch.cat([positive / positive.sum(-1, keepdim=True), negative / negative.sum(-1, keepdim=True)], -1)


def hedgehog_reference(plug, q, k, v) -> torch.Tensor:
    scores = hedgehog_features(q, plug.feature_map_q.weight) @ hedgehog_features(k, plug.feature_map_k.weight).mT
    return scores @ v / scores.sum(-1, keepdim=True)


def window_of(query: int, tokens: int, prefix: int, cols: int, side: int) -> list[int]:
    """The keys in a query's window: everything for class/register tokens, else the prefix tokens and the patches
    whose row and column offsets lie in −side//2 … side − 1 − side//2."""
    if query < prefix:
        return list(range(tokens))
    rows = (tokens - prefix) // cols
    row, col = divmod(query - prefix, cols)
    low = side // 2
    patches = [prefix + r * cols + c for r in range(max(0, row - low), min(rows, row - low + side))
               for c in range(max(0, col - low), min(cols, col - low + side))]
    return list(range(prefix)) + patches


def lolcats_reference(plug, q, k, v, cols: int) -> torch.Tensor:
    tokens, head_dim = q.shape[-2:]
    side = math.isqrt(plug.settings["window"])
    inside = torch.zeros(tokens, tokens, dtype=torch.bool)
    for i in range(tokens):
        inside[i, window_of(i, tokens, plug.num_prefix_tokens, cols, side)] = True
    scores = (q @ k.mT / math.sqrt(head_dim)).masked_fill(~inside, -math.inf)
    factor = torch.sigmoid(plug.window_factor)[None, :, None, None]
    soft = factor * torch.exp(scores - scores.amax(-1, keepdim=True))  # the max over the window only
    linear = hedgehog_features(q, plug.feature_map_q.weight) @ hedgehog_features(k, plug.feature_map_k.weight).mT
    weights = soft + linear * ~inside
    return weights @ v / weights.sum(-1, keepdim=True)


def cosformer_reference(q, k, v, theta: torch.Tensor) -> torch.Tensor:
    scores = F.relu(q) @ F.relu(k).mT * torch.cos(theta[:, None] - theta[None, :])
    return scores @ v / scores.sum(-1, keepdim=True).clamp_min(1e-6)


def cosformer_angles(tokens: int, prefix: int, position: str) -> torch.Tensor:
    if position == "sequence":
        return torch.arange(1, tokens + 1, dtype=torch.float64) * math.pi / (2 * tokens)
    patches = tokens - prefix
    return torch.cat([torch.full((prefix,), math.pi / 4, dtype=torch.float64),
                      torch.arange(1, patches + 1, dtype=torch.float64) * math.pi / (2 * patches)])


@pytest.mark.parametrize("tokens, prefix", LAYOUTS)
def test_hedgehog_matches_the_quadratic_form(tokens: int, prefix: int) -> None:
    plug = build("hedgehog", prefix, feature_dim=6)
    q, k, v = random_qkv(tokens)
    torch.testing.assert_close(plug.mix(q, k, v), hedgehog_reference(plug, q, k, v), **TOL)


@pytest.mark.parametrize("tokens, prefix, grid, window", [
    (197, 1, (14, 14), 64),
    (201, 5, (14, 14), 16),
    (50, 1, (7, 7), 64),  # the window is wider than some rows' reach, never the whole grid
    (197, 1, (14, 14), 25),  # odd side: a centred 5 × 5 window
    (59, 5, (6, 9), 9),  # a non-square grid, not a multiple of the tile side
    (17, 1, (4, 4), 1),  # each patch alone in its window
    (65, 1, (8, 8), 256),  # the window covers every patch: no linear part is left
])
def test_lolcats_matches_the_quadratic_form(tokens: int, prefix: int, grid: tuple[int, int], window: int) -> None:
    plug = build("lolcats", prefix, feature_dim=6, window=window)
    plug.set_token_layout(prefix, grid)
    q, k, v = random_qkv(tokens)
    expected = lolcats_reference(plug, q, k, v, cols=grid[1])
    torch.testing.assert_close(plug.mix(q, k, v), expected, **TOL)


@pytest.mark.parametrize("tokens, prefix", LAYOUTS)
@pytest.mark.parametrize("position", ["middle", "sequence"])
def test_cosformer_matches_the_quadratic_form(tokens: int, prefix: int, position: str) -> None:
    plug = build("cosformer", prefix, prefix_position=position)
    q, k, v = random_qkv(tokens)
    expected = cosformer_reference(q, k, v, cosformer_angles(tokens, prefix, position))
    torch.testing.assert_close(plug.mix(q, k, v), expected, **TOL)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the reference's own imports (distutils, torch.cuda.amp)
@pytest.mark.parametrize("tokens, prefix", LAYOUTS)
def test_performer_matches_performer_pytorch(tokens: int, prefix: int) -> None:
    from performer_pytorch.performer_pytorch import FastAttention

    plug = build("performer", prefix, head_dim=16)
    assert plug.num_features == int(16 * math.log(16))
    reference = FastAttention(16, nb_features=plug.num_features).double()
    reference.projection_matrix.copy_(plug.projection)
    q, k, v = random_qkv(tokens, head_dim=16)
    torch.testing.assert_close(plug.eval().mix(q, k, v), reference(q, k, v), **TOL)


@pytest.mark.parametrize("name", PLUGS)
def test_attention_weights_are_the_normalised_weights_of_mix(name: str) -> None:
    """What attention-score distillation compares with softmax: rows summing to 1 that reproduce mix (in training
    mode, where Performer counts forwards toward a redraw: reading the weights must not count)."""
    plug = build(name, 1).train()
    plug.set_token_layout(1, (7, 7))
    q, k, v = random_qkv(50)
    buffers = {buffer_name: buffer.clone() for buffer_name, buffer in plug.named_buffers()}
    weights = plug.attention_weights(q, k)
    assert all(torch.equal(buffer, plug.get_buffer(buffer_name)) for buffer_name, buffer in buffers.items())
    # cosFormer's queries with no positive entry have no features: they attend to nothing (output 0).
    live = F.relu(q).sum(-1) > 0 if name == "cosformer" else torch.ones(2, 2, 50, dtype=torch.bool)
    torch.testing.assert_close(weights.sum(-1), live.double(), **TOL)
    torch.testing.assert_close(weights @ v, plug.mix(q, k, v), **TOL)


def test_performer_projection_is_block_orthogonal_and_differs_by_layer() -> None:
    plug, other = PerformerAttention(16, 1, num_features=40), PerformerAttention(16, 1, num_features=40)
    rows = plug.projection.double()
    directions = rows / rows.norm(dim=1, keepdim=True)
    for block in (directions[:16], directions[16:32], directions[32:]):
        torch.testing.assert_close(block @ block.T, torch.eye(len(block), dtype=torch.float64), atol=1e-6, rtol=0)
    assert not torch.allclose(plug.projection, other.projection)


def test_performer_redraws_on_schedule_and_resumes_exactly() -> None:
    plug = PerformerAttention(16, 2, redraw_interval=3).train()
    x = torch.randn(1, 10, 16)
    projections, checkpoint = [plug.projection.clone()], None
    for step in range(8):
        if step == 4:
            checkpoint = copy.deepcopy(plug.state_dict())
        plug(x)
        projections.append(plug.projection.clone())
    changed = [not torch.equal(a, b) for a, b in zip(projections, projections[1:])]
    assert changed == [False, False, False, True, False, False, True, False]  # a draw before forwards 4 and 7
    plug.eval()(x)
    assert torch.equal(plug.projection, projections[-1])  # fixed in eval

    torch.manual_seed(99)  # another layer stream and interval: the checkpoint restores both
    resumed = PerformerAttention(16, 2, redraw_interval=1000).train()
    resumed.load_state_dict(checkpoint)
    assert resumed.settings["redraw_interval"] == 3 and torch.equal(resumed.projection, projections[4])
    for step in range(4, 8):
        resumed(x)
        assert torch.equal(resumed.projection, projections[step + 1])


@pytest.mark.parametrize("reentrant", [False, True])
def test_performer_activation_checkpointing_recomputes_with_the_same_projection(reentrant: bool) -> None:
    """With a redraw due at every forward, the recomputation in backward must neither count nor redraw."""
    plug = PerformerAttention(16, 2, redraw_interval=1).train()
    x = torch.randn(1, 10, 16, requires_grad=True)
    plain = copy.deepcopy(plug)
    plug(x), plain(x)  # the next forward redraws
    checkpoint(plug, x, use_reentrant=reentrant).square().sum().backward()
    plain(x).square().sum().backward()
    assert int(plug.forwards_since_draw) == 1 and int(plug.projection_draws) == 1
    torch.testing.assert_close(plug.qkv.weight.grad, plain.qkv.weight.grad)


@pytest.mark.parametrize("name", PLUGS)
def test_gradients_flow(name: str) -> None:
    plug = get_plug(name)(32, 2).train()
    plug.set_token_layout(1, (7, 7))
    x = torch.randn(2, 50, 32, requires_grad=True)
    plug(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for param_name, param in plug.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        if param_name.startswith(plug.stage1_trainable):
            assert param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", PLUGS)
def test_bf16_forward_is_finite_and_close_to_fp32(name: str) -> None:
    plug = get_plug(name)(64, 2).to(torch.bfloat16).eval()
    plug.set_token_layout(1, (14, 14))
    x = torch.randn(2, 197, 64, dtype=torch.bfloat16) * 3
    out = plug(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    expected = copy.deepcopy(plug).float()(x.float())  # the same rounded weights and inputs, in fp32
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def largest_tensor(plug_class: type, side: int) -> int:
    """The element count of the largest tensor in a forward at 1 + side² tokens (1 head, head_dim 8, defaults)."""
    plug = plug_class(8, 1).eval()
    plug.set_token_layout(1, (side, side))
    with torch.no_grad(), LargestTensor() as probe:
        out = plug(torch.randn(1, 1 + side * side, 8))
    assert torch.isfinite(out).all()
    return probe.largest


@pytest.mark.parametrize("name", PLUGS)
def test_no_n_by_n_tensor_at_16k_tokens(name: str) -> None:
    """Nothing near N×N at 16k tokens (N² = 2.7e8 elements), and the largest tensor grows linearly in N: 4× the
    tokens give at most 5× the elements (a quadratic one would give 16×)."""
    plug_class = get_plug(name)
    assert plug_class.subquadratic
    tokens = 1 + 128 * 128
    largest = largest_tensor(plug_class, 128)
    assert largest <= tokens**2 / 16, f"largest tensor {largest} elements at N={tokens}"
    assert largest <= 5 * largest_tensor(plug_class, 64)


@pytest.fixture(scope="module")
def vit_attention() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", depth=1).blocks[0].attn  # one block: ViT-Ti's attention


NON_DEFAULT = {
    "cosformer": {"prefix_position": "sequence"},
    "hedgehog": {"feature_dim": 16},
    "lolcats": {"feature_dim": 16, "window": 16},
    "performer": {"num_features": 32, "redraw_interval": 5, "seed": 3},
}


@pytest.mark.parametrize("name", PLUGS)
def test_from_softmax_and_state_dict_round_trip(vit_attention: torch.nn.Module, name: str) -> None:
    plug = get_plug(name).from_softmax(vit_attention, **NON_DEFAULT[name]).eval()
    plug.set_token_layout(1, (14, 14))
    state = plug.state_dict()
    for key, value in vit_attention.state_dict().items():
        assert torch.equal(state[key], value), key
    for prefix in plug.stage1_trainable:
        assert any(param_name.startswith(prefix) for param_name, _ in plug.named_parameters()), prefix
    if name in ("hedgehog", "lolcats"):  # the maps start at the identity, the window factor at 0.1
        eye = torch.eye(plug.head_dim, 16).expand(plug.num_heads, -1, -1)
        assert torch.equal(plug.feature_map_q.weight, eye) and torch.equal(plug.feature_map_k.weight, eye)
    if name == "lolcats":
        torch.testing.assert_close(torch.sigmoid(plug.window_factor), torch.full((3,), 0.1))
    x = torch.randn(2, 197, 192)
    expected = plug(x)

    restored = get_plug(name)(192, 3, qkv_bias=True).eval()  # the defaults: loading sets the settings and layout
    restored.load_state_dict(state)
    assert restored.settings == plug.settings and restored.num_prefix_tokens == 1
    torch.testing.assert_close(restored(x), expected)  # with other settings it would differ by O(1)


@pytest.mark.parametrize("name", PLUGS)
def test_an_unknown_setting_stops_with_one_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match="no setting bogus"):
        get_plug(name)(16, 2, bogus=1)


@pytest.mark.parametrize("name, settings", [
    ("cosformer", {"prefix_position": "first"}),
    ("hedgehog", {"feature_dim": 0}),
    ("lolcats", {"window": 50}),
    ("lolcats", {"window": 0}),
    ("performer", {"num_features": 0}),
    ("performer", {"redraw_interval": -1}),
])
def test_a_bad_setting_value_stops_with_one_clear_error(name: str, settings: dict) -> None:
    (setting,) = settings
    with pytest.raises(ValueError, match=f"setting {setting} must be"):
        get_plug(name)(16, 2, **settings)

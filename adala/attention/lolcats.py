"""LoLCATS attention (Zhang et al. 2024, "LoLCATs"): Hedgehog linear attention plus sliding-window softmax.

For a query i with window W(i), per head, with a learned factor w = sigmoid(λ) (λ starts at −2.197, w ≈ 0.1):

    a_ij = w · exp(q_i·k_j/√d − m_i)   for j in W(i)      (m_i: the maximum of those scores)
    a_ij = φ(q_i)·φ(k_j)               for j outside W(i)  (Hedgehog maps, :mod:`adala.attention.hedgehog`)
    O_i  = Σ_j a_ij v_j / Σ_j a_ij

as in the original's quadratic form (``linear_factor`` 1, max over the window only, not detached).

The window, adapted to ViTs: the original slides a 1-D causal window over the last 64 tokens of text. A ViT's
patches are neighbours in 2-D, and a 1-D window over raster order would wrap from one row's end to the next row's
start and cover a wide, thin band; so here the window is the side × side neighbourhood of a patch on the patch grid
(``window`` = side², 64 → 8 × 8; offsets −side//2 … side − 1 − side//2 in rows and columns, cut at the image
border). Class and register tokens (``num_prefix_tokens``) have no place on the grid and carry global context:
they are in every patch's window, and their own window is the whole sequence (their outputs are exact softmax
attention, at O(prefix · N) cost).

No N×N tensor: patch queries are processed in side × side tiles, each against the (2·side − 1)² keys around it
plus the prefix keys; the linear part is the Hedgehog state over all keys minus the window's share, so the cost is
O(N · (2·side)² · (d + features)) for the window and O(N · d · features) for the rest. LoLCATS trains the feature maps and the
window factors in its attention transfer, by MSE of the per-head outputs (:meth:`mix`) against softmax
attention's (Stage 1's defaults here: trains ``feature_map`` and ``window_factor``, objective ``head_outputs``),
then tunes rank-8 LoRA adapters (α 16) on ``qkv`` and ``proj``: the stages after Stage 1 default to them.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adala.attention.features import accumulation_dtype
from adala.attention.hedgehog import FeatureMapPlug
from adala.attention.linear import _autocast_off
from adala.attention.registry import register
from adala.attention.settings import positive_int

WINDOW_FACTOR_INIT = -2.1972245773362196  # logit of 0.1, the original's init_window_factor


@register
class LolcatsAttention(FeatureMapPlug):
    """LoLCATS attention (``attention=lolcats``); settings ``feature_dim`` (64) and ``window`` (64 patch tokens:
    an 8 × 8 neighbourhood; a square number)."""

    name = "lolcats"
    defaults = {"feature_dim": 64, "window": 64}
    stage1_trainable = ("feature_map", "window_factor")
    stage1_objective = "head_outputs"
    finetune_lora = (8, 16.0)
    subquadratic = True

    def build_plug_parameters(self, device: Any = None, dtype: Any = None) -> None:
        window_side(self.settings["window"], self.name)  # a bad window fails at construction
        super().build_plug_parameters(device=device, dtype=dtype)
        self.window_factor = nn.Parameter(torch.full((self.num_heads,), WINDOW_FACTOR_INIT, device=device, dtype=dtype))

    def reset_plug_parameters(self) -> None:
        super().reset_plug_parameters()
        with torch.no_grad():
            self.window_factor.fill_(WINDOW_FACTOR_INIT)

    @property
    def window_side(self) -> int:
        return window_side(self.settings["window"], self.name)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out_dtype = v.dtype
        with _autocast_off(q.device):
            dtype = accumulation_dtype(q, k, v)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            fq, fk = self.features(q, k)
            p = self.num_prefix_tokens
            prefix = torch.softmax(torch.matmul(q[:, :, :p], k.transpose(-2, -1)) * self.head_dim**-0.5, dim=-1)
            out = torch.matmul(prefix, v)
            if q.shape[-2] > p:  # a sequence of prefix tokens alone has no patch grid
                out = torch.cat([out, self._patch_outputs(q, k, v, fq, fk)], dim=2)
        return out.to(out_dtype)

    def _patch_outputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor,
                       fk: torch.Tensor) -> torch.Tensor:
        """The patch queries' outputs, tile by tile (see the module docstring)."""
        h, n = q.shape[1:3]
        p = self.num_prefix_tokens
        rows, cols = self.patch_grid(n)
        side = self.window_side
        tiling = _Tiling(rows, cols, side, q.device)
        prefix_keys = tiling.mask.new_ones(1, 1, p).expand(tiling.count, side * side, p)
        mask = torch.cat([tiling.window_mask(), prefix_keys], dim=-1)  # (tiles, side², halo² + p)

        q_tiles = tiling.query_tiles(q[:, :, p:])  # (b, h, tiles, side², d)
        fq_tiles = tiling.query_tiles(fq[:, :, p:])
        keys = tiling.with_prefix(tiling.key_tiles(k[:, :, p:]), k[:, :, :p])  # (b, h, tiles, halo² + p, d)
        key_features = tiling.with_prefix(tiling.key_tiles(fk[:, :, p:]), fk[:, :, :p])
        values = tiling.with_prefix(tiling.key_tiles(v[:, :, p:]), v[:, :, :p])

        scores = torch.matmul(q_tiles, keys.transpose(-2, -1)) * self.head_dim**-0.5
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # finite: padded rows stay NaN-free
        window = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * mask
        linear_in_window = torch.matmul(fq_tiles, key_features.transpose(-2, -1)) * mask
        # Window keys get the softmax weight instead of their linear one: add the first, take the second away.
        factor = torch.sigmoid(self.window_factor.to(q.dtype)).view(1, h, 1, 1, 1)
        weights = factor * window - linear_in_window
        state = torch.matmul(fk.transpose(-2, -1), v).unsqueeze(2)  # over all keys: (b, h, 1, features, d)
        numerator = torch.matmul(weights, values) + torch.matmul(fq_tiles, state)
        denominator = weights.sum(dim=-1, keepdim=True) + torch.matmul(fq_tiles, fk.sum(dim=-2)[:, :, None, :, None])
        # Padding queries may have no key at all; every real query has itself in its window, so a positive sum.
        out = numerator / denominator.clamp_min(torch.finfo(q.dtype).tiny)
        return tiling.untile(out)

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The normalised attention weights (batch, heads, N, N) in fp32 (fp64 for fp64 inputs), from the same q, k
        as :meth:`mix`. Quadratic: for inspection and attention-score losses on small inputs."""
        with _autocast_off(q.device):
            dtype = accumulation_dtype(q, k)
            q, k = q.to(dtype), k.to(dtype)
            fq, fk = self.features(q, k)
            inside = self.window_membership(q.shape[-2], q.device)
            scores = (torch.matmul(q, k.transpose(-2, -1)) * self.head_dim**-0.5).masked_fill(~inside, -math.inf)
            window = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
            factor = torch.sigmoid(self.window_factor.to(dtype)).view(1, -1, 1, 1)
            weights = factor * window + torch.matmul(fq, fk.transpose(-2, -1)) * ~inside
            return weights / weights.sum(dim=-1, keepdim=True)

    def window_membership(self, tokens: int, device: Any = None) -> torch.Tensor:
        """(N, N) bool: key j is in query i's window (the quadratic form of the module docstring's W)."""
        p = self.num_prefix_tokens
        rows, cols = self.patch_grid(tokens)
        side = self.window_side
        index = torch.arange(rows * cols, device=device)
        row, col = index // cols, index % cols
        d_row, d_col = row[None, :] - row[:, None], col[None, :] - col[:, None]
        low, high = -(side // 2), side - 1 - side // 2
        patches = (d_row >= low) & (d_row <= high) & (d_col >= low) & (d_col <= high)
        inside = torch.ones(tokens, tokens, dtype=torch.bool, device=device)
        inside[p:, p:] = patches
        return inside


def window_side(window: Any, plug: str) -> int:
    """The side of a square window of ``window`` patch tokens; ValueError unless it is a positive square number."""
    positive_int(plug, "window", window)
    side = math.isqrt(window)
    if side * side != window:
        raise ValueError(f"attention {plug!r}: setting window must be a square number of patch tokens (side × side "
                         f"on the patch grid, e.g. 64 for 8 × 8), got {window!r}")
    return side


class _Tiling:
    """The patch grid cut into side × side query tiles, each with the (2·side − 1)² key positions around it."""

    def __init__(self, rows: int, cols: int, side: int, device: torch.device) -> None:
        self.rows, self.cols, self.side = rows, cols, side
        self.tile_rows, self.tile_cols = -(-rows // side), -(-cols // side)
        self.count = self.tile_rows * self.tile_cols
        self.halo = 2 * side - 1
        self.before = side // 2  # window offsets: −before … side − 1 − before
        real = self.key_tiles(torch.ones(1, 1, rows * cols, 1, device=device)) > 0  # zero where padding
        self.mask = real[0, 0, :, None, :, 0]  # (tiles, 1, halo²)

    def window_mask(self) -> torch.Tensor:
        """(tiles, side², halo²) bool: which key positions of its tile's halo lie in each query's window."""
        device = self.mask.device
        offsets = torch.arange(self.halo, device=device)[None, :] - torch.arange(self.side, device=device)[:, None]
        in_1d = (offsets >= 0) & (offsets < self.side)  # (side query positions, halo key positions)
        in_2d = in_1d[:, None, :, None] & in_1d[None, :, None, :]  # (q row, q col, k row, k col)
        return in_2d.reshape(self.side**2, self.halo**2)[None] & self.mask

    def _grid(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:2], self.rows, self.cols, x.shape[-1])

    def query_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """(b, h, patches, c) -> (b, h, tiles, side², c), zero-padded to whole tiles."""
        s = self.side
        grid = F.pad(self._grid(x), (0, 0, 0, self.tile_cols * s - self.cols, 0, self.tile_rows * s - self.rows))
        grid = grid.reshape(*x.shape[:2], self.tile_rows, s, self.tile_cols, s, x.shape[-1])
        return grid.permute(0, 1, 2, 4, 3, 5, 6).reshape(*x.shape[:2], self.count, s * s, x.shape[-1])

    def key_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """(b, h, patches, c) -> (b, h, tiles, halo², c): each tile's keys, zero beyond the grid."""
        s, after = self.side, self.side - 1 - self.before
        padding = (0, 0, self.before, self.tile_cols * s - self.cols + after,
                   self.before, self.tile_rows * s - self.rows + after)
        grid = F.pad(self._grid(x), padding)
        tiles = grid.unfold(2, self.halo, s).unfold(3, self.halo, s)  # (b, h, tile rows, tile cols, c, halo, halo)
        return tiles.permute(0, 1, 2, 3, 5, 6, 4).reshape(*x.shape[:2], self.count, self.halo**2, x.shape[-1])

    def with_prefix(self, tiles: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Append the prefix tokens (b, h, p, c) to every tile's keys."""
        return torch.cat([tiles, prefix[:, :, None].expand(-1, -1, self.count, -1, -1)], dim=-2)

    def untile(self, x: torch.Tensor) -> torch.Tensor:
        """(b, h, tiles, side², c) -> (b, h, patches, c), the padding dropped."""
        s, (b, h) = self.side, x.shape[:2]
        grid = x.reshape(b, h, self.tile_rows, self.tile_cols, s, s, x.shape[-1]).permute(0, 1, 2, 4, 3, 5, 6)
        grid = grid.reshape(b, h, self.tile_rows * s, self.tile_cols * s, x.shape[-1])
        return grid[:, :, : self.rows, : self.cols].reshape(b, h, self.rows * self.cols, x.shape[-1])

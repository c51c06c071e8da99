"""Linformer attention (Wang et al. 2020): keys and values projected along the sequence, O(N·k·d).

    K' = E K,  V' = F V  (E, F learned, k × n),   out = softmax(Q K'ᵀ/√d) V'

As in the reference code, one E and one F serve all heads of a block. Settings: ``k`` (256, the paper's) and
``grid``, the patch grid (rows, columns) E and F are laid out for: by default (null) the model's grid at the
resolution it is converted at (:func:`adala.models.linearize` fills it in, and exports record it); a module built
directly, without a model, needs it given.

- Class/register tokens are never projected: they stay exact keys and values beside the k projected ones, so
  E and F cover the patch tokens only (n = rows × columns).
- ``k`` is capped at n (more rows than tokens add cost and nothing else).
- At another grid (another resolution), E and F are resampled over the patch grid: each row is viewed as a
  rows × columns image and resized bilinearly (antialiased when shrinking), then multiplied by n_old / n_new, so
  a row that averaged a region of the image still averages the same region. A state dict restores the settings
  and the parameter shapes it was trained with.
- Initialisation: E = F = segment averaging (row r averages the r-th of k contiguous runs of patch tokens in raster
  order), not the reference's uniform(±1/√k) noise, so a converted model starts as softmax attention over locally
  pooled keys and values; with k = n this is the identity and the plug starts as exact softmax attention.

Stage 1 trains ``qkv`` and E, F (``key_proj``, ``value_proj``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adala.attention.plug import AttentionPlug
from adala.attention.registry import register
from adala.attention.segments import segment_matrix
from adala.attention.settings import positive_int

PROJECTIONS = ("key_proj", "value_proj")


@register
class LinformerAttention(AttentionPlug):
    """Linformer attention over the patch tokens, class/register tokens kept exact (see the module docstring)."""

    name = "linformer"
    defaults = {"k": 256, "grid": None}
    stage1_trainable = ("qkv", *PROJECTIONS)
    subquadratic = True
    shapes_follow_settings = True  # E and F as trained: their k and grid come in plug_config

    @classmethod
    def settings_for_model(cls, settings: dict[str, Any], grid: tuple[int, int]) -> dict[str, Any]:
        if settings.get("grid") is None:
            return {**settings, "grid": [int(grid[0]), int(grid[1])]}
        return settings

    def build_plug_parameters(self, device: Any = None, dtype: Any = None) -> None:
        positive_int(self.name, "k", self.settings["k"])
        grid = self.settings["grid"]
        if grid is None:
            raise ValueError("attention 'linformer' needs the patch grid its projections are laid out for: convert "
                             "the model with adala.models.linearize (which takes the model's), or pass grid=[rows, "
                             "columns]")
        if not isinstance(grid, (list, tuple)) or len(grid) != 2:
            raise ValueError(f"attention 'linformer': setting grid must be [rows, columns], got {grid!r}")
        for side in grid:
            positive_int(self.name, "grid", side)
        patches = grid[0] * grid[1]
        for name in PROJECTIONS:
            setattr(self, name, nn.Parameter(torch.empty(min(self.settings["k"], patches), patches,
                                                         device=device, dtype=dtype)))
        self.reset_plug_parameters()

    def reset_plug_parameters(self) -> None:
        rows, patches = self.key_proj.shape
        with torch.no_grad():
            for name in PROJECTIONS:
                getattr(self, name).copy_(segment_matrix(patches, rows, device=self.key_proj.device))

    def projection(self, weight: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``weight`` (k × n over the stored grid) for patch tokens on ``grid``, resampled as documented."""
        stored = tuple(self.settings["grid"])
        if grid == stored:
            return weight
        rows = weight.shape[0]
        image = weight.reshape(1, rows, *stored)
        resized = F.interpolate(image, size=grid, mode="bilinear", align_corners=False,
                                antialias=grid[0] * grid[1] < stored[0] * stored[1])
        return resized.reshape(rows, grid[0] * grid[1]) * (stored[0] * stored[1] / (grid[0] * grid[1]))

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        prefix = self.num_prefix_tokens
        grid = self.patch_grid(q.shape[-2])
        e = self.projection(self.key_proj, grid).to(k.dtype)
        f = self.projection(self.value_proj, grid).to(v.dtype)
        keys = torch.cat([k[..., :prefix, :], e @ k[..., prefix:, :]], dim=-2)
        values = torch.cat([v[..., :prefix, :], f @ v[..., prefix:, :]], dim=-2)
        return F.scaled_dot_product_attention(q, keys, values, dropout_p=self.attn_drop if self.training else 0.0)

"""PCA maps of patch features (paper Figs. 6, 13, 14): the first three principal components as RGB.

The components are fitted on the teacher's patch tokens and applied unchanged to every student, so the same
colour means the same direction of the teacher's feature space in all panels. A principal direction has no sign
of its own (an SVD may return either), so each one is oriented to give the teacher's scores a positive third
moment, and the colours do not change when a component, or the features, change sign.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

COMPONENTS = 3
CLIP_QUANTILE = 0.01  # each colour channel spans the teacher's 1st to 99th percentile of its component


@torch.no_grad()
def patch_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The final patch features of a timm ViT (class and register tokens left out) as (batch, rows, cols, C)."""
    tokens = model.forward_features(images).float()[:, getattr(model, "num_prefix_tokens", 0):]
    patch = model.patch_embed.patch_size
    rows, cols = (math.ceil(size / p) for size, p in zip(images.shape[-2:], patch))
    if tokens.shape[1] != rows * cols:
        raise ValueError(f"{tokens.shape[1]} patch tokens do not fill a {rows}x{cols} grid")
    return tokens.reshape(tokens.shape[0], rows, cols, tokens.shape[-1])


def orient(components: torch.Tensor, centred: torch.Tensor) -> torch.Tensor:
    """``components`` (k, C), each with the sign that gives the scores of ``centred`` (n, C) a positive third
    moment (a tie keeps the sign that makes the largest loading positive)."""
    scores = centred @ components.T
    skew = scores.pow(3).sum(0)
    largest = components.gather(1, components.abs().argmax(1, keepdim=True)).squeeze(1)
    signs = torch.where(skew != 0, skew.sign(), largest.sign())
    return components * signs.unsqueeze(1)


@dataclass(frozen=True)
class PatchPCA:
    """Three principal directions of the teacher's patch features and the range each colour channel spans."""

    mean: torch.Tensor  # (C,)
    components: torch.Tensor  # (3, C), oriented
    low: torch.Tensor  # (3,)
    high: torch.Tensor  # (3,)

    @classmethod
    def fit(cls, features: torch.Tensor) -> "PatchPCA":
        """Fit on ``features`` (..., C): every patch of every image is one sample."""
        flat = features.reshape(-1, features.shape[-1]).double()
        if flat.shape[0] < COMPONENTS or flat.shape[1] < COMPONENTS:
            raise ValueError(f"PCA of {COMPONENTS} components needs at least {COMPONENTS} patches and channels")
        mean = flat.mean(0)
        centred = flat - mean
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        components = orient(vh[:COMPONENTS], centred)
        scores = centred @ components.T
        low = torch.quantile(scores, CLIP_QUANTILE, dim=0)
        high = torch.quantile(scores, 1 - CLIP_QUANTILE, dim=0)
        return cls(mean, components, low, high)

    def rgb(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` (..., C) as colours (..., 3) in [0, 1]."""
        scores = (features.double() - self.mean) @ self.components.T
        span = (self.high - self.low).clamp_min(1e-12)
        return ((scores - self.low) / span).clamp(0, 1).float()

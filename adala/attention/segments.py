"""Contiguous segments of a token sequence: Nyströmformer's landmarks and Linformer's initial projections."""
from __future__ import annotations

from typing import Optional

import torch


def segment_matrix(
    tokens: int, segments: int, *, device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """The (segments, tokens) matrix whose row r averages tokens ⌊r·n/m⌋ … ⌊(r+1)·n/m⌋ − 1.

    Segment sizes differ by at most one when ``tokens`` is not a multiple of ``segments``; when it is, the rows are
    the reference's equal segments, and with ``segments == tokens`` the matrix is the identity.
    """
    if not 1 <= segments <= tokens:
        raise ValueError(f"cannot split {tokens} tokens into {segments} non-empty segments")
    bounds = torch.arange(segments + 1, device=device) * tokens // segments
    position = torch.arange(tokens, device=device)
    member = (position >= bounds[:-1, None]) & (position < bounds[1:, None])
    sizes = (bounds[1:] - bounds[:-1]).unsqueeze(1)
    return member.to(dtype or torch.get_default_dtype()) / sizes.to(dtype or torch.get_default_dtype())

"""Performer attention, FAVOR+ (Choromanski et al. 2021): softmax attention estimated with positive random features.

    x' = x · d^-¼,   φ(x) = m^-½ (exp(ω x' − ‖x'‖²/2 − c) + eps),   O = φ(Q)(φ(K)ᵀV) / (φ(Q) Σ_j φ(k_j))

ω (m × d) holds block-orthogonal Gaussian rows: each block of d rows is the orthonormal factor of a d × d Gaussian
matrix, the last block cut to fit, and every row rescaled to the norm of an independent Gaussian d-vector
(``performer-pytorch``'s default ``ortho_scaling=0``). c is the stabilising maximum of ω x': per query token, and
one per (batch, head) over all keys; eps is 1e-4. m defaults to int(d · ln d) (266 for d = 64).

Random features: ω is redrawn every ``redraw_interval`` training-mode forwards (0: never) and stays fixed in eval.
It is a persistent buffer (``projection``), so checkpoints and exports hold the ω the weights were trained with,
and so are the redraw counters (``projection_draws``, ``forwards_since_draw``). Each draw is a pure function of the
``seed`` setting, the layer's ``projection_stream`` (a persistent buffer, drawn from torch's global generator when
the layer is built, so layers differ and a seeded build is reproducible) and the draw number: a run resumed from a
checkpoint draws exactly what the uninterrupted run would have. Forwards are counted per call in training mode
(every micro-batch of gradient accumulation counts; a forward recomputed in backward by activation checkpointing
does not, so it sees the ω of its original forward).
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Mapping

import torch

from adala.attention.features import accumulation_dtype, feature_attention, feature_weights
from adala.attention.linear import _autocast_off
from adala.attention.plug import AttentionPlug
from adala.attention.registry import register
from adala.attention.settings import positive_int

KERNEL_EPS = 1e-4  # performer-pytorch's softmax_kernel eps
STREAM_BITS = 62


def draw_seed(seed: int, stream: int, draw: int) -> int:
    """A 63-bit generator seed from (seed, stream, draw), hashed so that nearby inputs give unrelated draws."""
    digest = hashlib.sha256(f"{seed}:{stream}:{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def orthogonal_gaussian(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, cols) block-orthogonal Gaussian projection in fp64 on the CPU (see the module docstring)."""
    blocks = []
    for _ in range(-(-rows // cols)):
        gaussian = torch.randn(cols, cols, generator=generator, dtype=torch.float64, device="cpu")
        orthonormal, _ = torch.linalg.qr(gaussian)
        blocks.append(orthonormal.T)
    norms = torch.randn(rows, cols, generator=generator, dtype=torch.float64, device="cpu").norm(dim=1)
    return norms[:, None] * torch.cat(blocks)[:rows]


@register
class PerformerAttention(AttentionPlug):
    """Performer FAVOR+ attention (``attention=performer``); settings ``num_features`` (None: int(d · ln d)),
    ``redraw_interval`` (1000 training forwards; 0 never) and ``seed`` (0)."""

    name = "performer"
    defaults = {"num_features": None, "redraw_interval": 1000, "seed": 0}
    stage1_trainable = ("qkv",)
    subquadratic = True
    shapes_follow_settings = True  # weights with another num_features

    def build_plug_parameters(self, device: Any = None, dtype: Any = None) -> None:
        positive_int(self.name, "num_features", self.settings["num_features"], optional=True)
        for setting in ("redraw_interval", "seed"):
            value = self.settings[setting]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"attention {self.name!r}: setting {setting} must be an integer >= 0, got {value!r}")
        device = device if device is not None else torch.get_default_device()  # e.g. meta, under a device context
        stream = torch.randint(0, 2**STREAM_BITS, (), device="cpu")  # draws are made on the CPU
        self.register_buffer("projection_stream", stream.to(device))
        self.register_buffer("projection_draws", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("forwards_since_draw", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("projection", self._draw(int(stream), 0).to(device=device, dtype=dtype))
        self._draws, self._since = 0, 0  # host copies of the counters: no device sync per forward

    @property
    def num_features(self) -> int:
        return self.settings["num_features"] or max(1, int(self.head_dim * math.log(self.head_dim)))

    def _draw(self, stream: int, draw: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(draw_seed(self.settings["seed"], stream, draw))
        return orthogonal_gaussian(self.num_features, self.head_dim, generator)

    @torch.no_grad()
    def redraw(self) -> None:
        """Replace ω by the next draw of this layer's sequence."""
        self._draws += 1
        self.projection.copy_(self._draw(int(self.projection_stream), self._draws))
        self.projection_draws.fill_(self._draws)
        self._since = 0
        self.forwards_since_draw.zero_()

    def _count_forward(self) -> None:
        interval = self.settings["redraw_interval"]
        # A forward that activation checkpointing recomputes during backward is no new forward: it must reuse ω.
        in_backward = torch._C._current_graph_task_id() != -1
        if not self.training or interval == 0 or in_backward:
            return
        if self._since >= interval:
            self.redraw()
        self._since += 1
        self.forwards_since_draw.add_(1)

    def features(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        """φ(x) for queries or keys (batch, heads, tokens, head_dim), in fp32 (fp64 for fp64 inputs)."""
        dtype = accumulation_dtype(x, self.projection)
        x = x.to(dtype) * self.head_dim**-0.25
        projected = torch.matmul(x, self.projection.to(dtype).T)  # (b, h, tokens, m)
        shift = projected.detach().amax(dim=-1 if is_query else (-2, -1), keepdim=True)
        squared_norm = x.pow(2).sum(dim=-1, keepdim=True) / 2
        return (torch.exp(projected - squared_norm - shift) + KERNEL_EPS) * self.num_features**-0.5

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._count_forward()
        with _autocast_off(q.device):
            out = feature_attention(self.features(q, True), self.features(k, False), v)
        return out.to(v.dtype)

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The normalised weights φ(Q)φ(K)ᵀ / row sums (batch, heads, N, N) with the current ω, in fp32 (fp64 for
        fp64 inputs); unlike :meth:`mix` it counts no forward toward a redraw. Quadratic: small inputs only."""
        with _autocast_off(q.device):
            return feature_weights(self.features(q, True), self.features(k, False))

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        for name, host in (("projection_draws", "_draws"), ("forwards_since_draw", "_since")):
            stored = state_dict.get(prefix + name)
            if isinstance(stored, torch.Tensor) and not stored.is_meta:
                setattr(self, host, int(stored))

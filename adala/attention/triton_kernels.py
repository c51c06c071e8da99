"""Triton kernels of non-causal linear attention, forward and backward (imported only when the fast path runs).

Notation as in :mod:`adala.attention.linear`, per (batch, head), N tokens:

    S = (1/N) Σ_j φ(k_j) v_jᵀ,  z = (1/N) Σ_j φ(k_j),  den_i = φ(q_i)·z + eps,  o_i = φ(q_i)ᵀ S / den_i

Backward, with g_i = dL/do_i and (g·o)_i = g_i·o_i:

    dφ(q_i) = (S g_i − z (g·o)_i) / den_i
    dS = (1/N) Σ_i φ(q_i) (g_i / den_i)ᵀ,   dz = −(1/N) Σ_i φ(q_i) (g·o)_i / den_i
    dφ(k_j) = dS v_j + dz,   dv_j = dSᵀ φ(k_j)

and dq = dφ(q) ⊙ φ'(q), dk = dφ(k) ⊙ φ'(k). (The 1/N of S and z is folded into dS and dz here.)

Token reductions (S and z in the forward, dS and dz in the backward) are split over ``splits`` programs per
(batch, head), each writing an fp32 partial sum that torch adds up: at batch 1 a ViT has only ``heads`` (batch,
head) pairs, far too few programs to fill a GPU. Everything inside the kernels is fp32; inputs may be fp32, bf16
or fp16 and may be strided (e.g. the q, k, v views of a fused qkv projection). Set ``TRITON_INTERPRET=1`` before
this module is first imported to run the kernels on CPU tensors with Triton's interpreter (tests do).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# φ kernels the Triton path implements, as the compile-time id the kernels branch on.
KERNEL_IDS = {"elu1": 0, "relu": 1, "softplus": 2}
BLOCK_N = 64  # tokens per tile
MIN_PROGRAMS = 512  # split token reductions until about this many programs run (≈ 4 per SM on an H100)


@triton.jit
def _features(x, KERNEL: tl.constexpr):
    if KERNEL == 0:  # ELU + 1, positive in any precision (see adala.attention.kernels.elu1_features)
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif KERNEL == 1:
        return tl.maximum(x, 0.0)
    else:  # softplus as torch computes it (threshold 20); log1p(u) via Goldberg's log(w)·u/(w−1), w = 1+u
        u = tl.exp(-tl.abs(x))
        w = 1.0 + u
        log1p = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
        return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p)


@triton.jit
def _feature_grad(x, KERNEL: tl.constexpr):
    """dφ/dx, as torch's autograd computes it for the reference kernels."""
    if KERNEL == 0:
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif KERNEL == 1:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        return tl.where(x > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-x)))


@triton.jit
def _load_tile(ptr, stride_n, stride_d, offs_n, offs_d, n_end, dim):
    """A (BLOCK_N, BLOCK_D) tile as fp32; rows ≥ n_end and columns ≥ dim read as 0."""
    mask = (offs_n[:, None] < n_end) & (offs_d[None, :] < dim)
    return tl.load(ptr + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _masked_features(x, offs_n, offs_d, n_end, dim, KERNEL: tl.constexpr):
    """φ(x) with padding rows and columns zeroed (φ(0) is 1 for ELU+1, which must not enter the sums)."""
    mask = (offs_n[:, None] < n_end) & (offs_d[None, :] < dim)
    return tl.where(mask, _features(x, KERNEL), 0.0)


@triton.jit
def _matrix_offsets(bh, offs_d, offs_e, D, E):
    """Offsets and mask of a (D, E) fp32 matrix stored contiguously per (batch, head)."""
    return bh.to(tl.int64) * D * E + offs_d[:, None] * E + offs_e[None, :], (offs_d[:, None] < D) & (offs_e[None, :] < E)


@triton.jit
def _state_kernel(
    K, V, S_PART, Z_PART,
    N, H, D, E, tokens_per_split,
    skb, skh, skn, skd, svb, svh, svn, svd,
    KERNEL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial Σ φ(k_j) v_jᵀ and Σ φ(k_j) over one split of the tokens of one (batch, head)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    k_ptr = K + b * skb + h * skh
    v_ptr = V + b * svb + h * svh
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    s = tl.zeros((BLOCK_D, BLOCK_E), dtype=tl.float32)
    z = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        fk = _masked_features(_load_tile(k_ptr, skn, skd, offs_n, offs_d, end, D), offs_n, offs_d, end, D, KERNEL)
        v = _load_tile(v_ptr, svn, svd, offs_n, offs_e, end, E)
        s += tl.dot(tl.trans(fk), v, input_precision=PRECISION)
        z += tl.sum(fk, axis=0)
    part = bh * tl.num_programs(1) + split
    offs, mask = _matrix_offsets(part, offs_d, offs_e, D, E)
    tl.store(S_PART + offs, s, mask=mask)
    tl.store(Z_PART + part.to(tl.int64) * D + offs_d, z, mask=offs_d < D)


@triton.jit
def _output_kernel(
    Q, S, Z, O,
    N, H, D, E, eps,
    sqb, sqh, sqn, sqd, sob, soh, son, sod,
    KERNEL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """o_i = φ(q_i)ᵀ S / (φ(q_i)·z + eps) for one tile of query tokens."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    offs, mask = _matrix_offsets(bh, offs_d, offs_e, D, E)
    s = tl.load(S + offs, mask=mask, other=0.0)
    z = tl.load(Z + bh.to(tl.int64) * D + offs_d, mask=offs_d < D, other=0.0)
    q = _load_tile(Q + b * sqb + h * sqh, sqn, sqd, offs_n, offs_d, N, D)
    fq = _masked_features(q, offs_n, offs_d, N, D, KERNEL)
    den = tl.sum(fq * z[None, :], axis=1) + eps
    out = tl.dot(fq, s, input_precision=PRECISION) / den[:, None]
    o_mask = (offs_n[:, None] < N) & (offs_e[None, :] < E)
    o_offs = offs_n[:, None] * son + offs_e[None, :] * sod
    tl.store(O + b * sob + h * soh + o_offs, out.to(O.dtype.element_ty), mask=o_mask)


@triton.jit
def _query_grad_kernel(
    Q, G, S, Z, DQ, DS_PART, DZ_PART,
    N, H, D, E, eps, tokens_per_split,
    sqb, sqh, sqn, sqd, sgb, sgh, sgn, sgd, sdb, sdh, sdn, sdd,
    KERNEL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq for one split of the query tokens, and that split's partial Σ φ(q_i) (g_i/den_i)ᵀ and
    −Σ φ(q_i) (g·o)_i/den_i."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    offs, mask = _matrix_offsets(bh, offs_d, offs_e, D, E)
    s = tl.load(S + offs, mask=mask, other=0.0)
    z = tl.load(Z + bh.to(tl.int64) * D + offs_d, mask=offs_d < D, other=0.0)
    q_ptr = Q + b * sqb + h * sqh
    g_ptr = G + b * sgb + h * sgh
    dq_ptr = DQ + b * sdb + h * sdh
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    ds = tl.zeros((BLOCK_D, BLOCK_E), dtype=tl.float32)
    dz = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        q = _load_tile(q_ptr, sqn, sqd, offs_n, offs_d, end, D)
        fq = _masked_features(q, offs_n, offs_d, end, D, KERNEL)
        g = _load_tile(g_ptr, sgn, sgd, offs_n, offs_e, end, E)
        den = tl.sum(fq * z[None, :], axis=1) + eps
        num = tl.dot(fq, s, input_precision=PRECISION)
        g_dot_o = tl.sum(g * num, axis=1) / den
        gs = tl.dot(g, tl.trans(s), input_precision=PRECISION)
        dfq = (gs - g_dot_o[:, None] * z[None, :]) / den[:, None]
        dq = dfq * _feature_grad(q, KERNEL)
        dq_mask = (offs_n[:, None] < end) & (offs_d[None, :] < D)
        tl.store(dq_ptr + offs_n[:, None] * sdn + offs_d[None, :] * sdd, dq.to(DQ.dtype.element_ty), mask=dq_mask)
        ds += tl.dot(tl.trans(fq), g / den[:, None], input_precision=PRECISION)
        dz -= tl.sum(fq * (g_dot_o / den)[:, None], axis=0)
    part = bh * tl.num_programs(1) + split
    offs, mask = _matrix_offsets(part, offs_d, offs_e, D, E)
    tl.store(DS_PART + offs, ds, mask=mask)
    tl.store(DZ_PART + part.to(tl.int64) * D + offs_d, dz, mask=offs_d < D)


@triton.jit
def _key_value_grad_kernel(
    K, V, DS, DZ, DK, DV,
    N, H, D, E,
    skb, skh, skn, skd, svb, svh, svn, svd, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    KERNEL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk = (dS v_j + dz) ⊙ φ'(k_j) and dv = dSᵀ φ(k_j) for one tile of key tokens (dS, dz include 1/N)."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    offs, mask = _matrix_offsets(bh, offs_d, offs_e, D, E)
    ds = tl.load(DS + offs, mask=mask, other=0.0)
    dz = tl.load(DZ + bh.to(tl.int64) * D + offs_d, mask=offs_d < D, other=0.0)
    k = _load_tile(K + b * skb + h * skh, skn, skd, offs_n, offs_d, N, D)
    v = _load_tile(V + b * svb + h * svh, svn, svd, offs_n, offs_e, N, E)
    fk = _masked_features(k, offs_n, offs_d, N, D, KERNEL)
    dk = (tl.dot(v, tl.trans(ds), input_precision=PRECISION) + dz[None, :]) * _feature_grad(k, KERNEL)
    dv = tl.dot(fk, ds, input_precision=PRECISION)
    row = offs_n[:, None] < N
    dk_offs = offs_n[:, None] * sdkn + offs_d[None, :] * sdkd
    dv_offs = offs_n[:, None] * sdvn + offs_e[None, :] * sdvd
    tl.store(DK + b * sdkb + h * sdkh + dk_offs, dk.to(DK.dtype.element_ty), mask=row & (offs_d[None, :] < D))
    tl.store(DV + b * sdvb + h * sdvh + dv_offs, dv.to(DV.dtype.element_ty), mask=row & (offs_e[None, :] < E))


def _blocks(d: int, e: int) -> dict[str, int]:
    # tl.dot needs every dimension ≥ 16; masks cover the padding.
    return {"BLOCK_N": BLOCK_N, "BLOCK_D": max(16, triton.next_power_of_2(d)),
            "BLOCK_E": max(16, triton.next_power_of_2(e))}


def _splits(pairs: int, tokens: int) -> tuple[int, int]:
    """(splits, tokens per split): enough programs for the GPU, each split a whole number of tiles."""
    tiles = triton.cdiv(tokens, BLOCK_N)
    splits = max(1, min(tiles, triton.cdiv(MIN_PROGRAMS, pairs)))
    tiles_per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split * BLOCK_N


def _precision() -> str:
    """fp32 dot products as torch does fp32 matmuls: exact unless ``torch.set_float32_matmul_precision`` allows TF32."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output in v's dtype, S and z in fp32) for (batch, heads, tokens, dim) inputs."""
    b, h, n, d = q.shape
    e = v.shape[-1]
    blocks, kid, precision = _blocks(d, e), KERNEL_IDS[kernel], _precision()
    splits, per_split = _splits(b * h, n)
    f32 = dict(device=q.device, dtype=torch.float32)
    s_part = torch.empty(b, h, splits, d, e, **f32)
    z_part = torch.empty(b, h, splits, d, **f32)
    _state_kernel[(b * h, splits)](
        k, v, s_part, z_part, n, h, d, e, per_split, *k.stride(), *v.stride(),
        KERNEL=kid, PRECISION=precision, **blocks,
    )
    state = s_part.sum(dim=2) / n
    normaliser = z_part.sum(dim=2) / n
    out = torch.empty(b, h, n, e, device=q.device, dtype=v.dtype)
    _output_kernel[(b * h, triton.cdiv(n, BLOCK_N))](
        q, state, normaliser, out, n, h, d, e, eps, *q.stride(), *out.stride(),
        KERNEL=kid, PRECISION=precision, **blocks,
    )
    return out, state, normaliser


def backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    state: torch.Tensor, normaliser: torch.Tensor, kernel: str, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. q, k, v (in their dtypes) from the output's gradient and the forward's S and z."""
    b, h, n, d = q.shape
    e = v.shape[-1]
    blocks, kid, precision = _blocks(d, e), KERNEL_IDS[kernel], _precision()
    splits, per_split = _splits(b * h, n)
    f32 = dict(device=q.device, dtype=torch.float32)
    ds_part = torch.empty(b, h, splits, d, e, **f32)
    dz_part = torch.empty(b, h, splits, d, **f32)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    _query_grad_kernel[(b * h, splits)](
        q, grad, state, normaliser, dq, ds_part, dz_part, n, h, d, e, eps, per_split,
        *q.stride(), *grad.stride(), *dq.stride(), KERNEL=kid, PRECISION=precision, **blocks,
    )
    ds = ds_part.sum(dim=2) / n
    dz = dz_part.sum(dim=2) / n
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    _key_value_grad_kernel[(b * h, triton.cdiv(n, BLOCK_N))](
        k, v, ds, dz, dk, dv, n, h, d, e, *k.stride(), *v.stride(), *dk.stride(), *dv.stride(),
        KERNEL=kid, PRECISION=precision, **blocks,
    )
    return dq, dk, dv

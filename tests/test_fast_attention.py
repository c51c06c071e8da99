"""The Triton fast path of linear attention against the reference ``linear_attention``, forward and gradients.

On CPU the Triton kernels run under Triton's interpreter. It must be switched on (``TRITON_INTERPRET=1``) before
triton is first imported, and it would also interpret any kernel torch.compile generates, so one child process
(this file run as a script) computes every fast-path result and the tests compare them here, case by case, with
the reference computed in this process. CI so checks the very kernels a GPU runs; tests marked ``gpu`` repeat the
comparison with the compiled kernels on CUDA at ViT sizes.

Tolerances: both paths compute in fp32 and round only their results. fp32 (the kernels' dot products in IEEE
fp32, as torch's fp32 matmuls): rtol 1e-4, atol 1e-5, the reductions over ≤ 257 tokens differ by ≈ 1e-7.
bf16/fp16: the results may round to neighbouring values, one ulp apart (2**-8 relative): torch's bf16 defaults,
rtol 1.6e-2, atol 1e-5 (fp16: rtol 1e-3).
"""
from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from adala.attention import FAST_KERNELS, LinearAttention, attention, fast_linear_attention, linear_attention
from adala.attention.fast import IMPL_ENV, resolve_impl, uses_fast_path

pytest.importorskip("triton")

REPO_ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
       torch.float16: dict(rtol=1e-3, atol=1e-5)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# (batch, heads, tokens, head_dim, value_dim): a single token, odd counts that leave partial tiles, batch 1, a
# value width unlike the head dim, and ViT-L/16's 257 tokens at 224² (5 tiles of 64: the token reduction is split
# over several programs). fused_qkv adds ViT-B/16's 197.
SHAPES = [(1, 1, 1, 8, 8), (1, 2, 37, 16, 16), (2, 3, 65, 16, 24), (1, 2, 257, 32, 32)]
# The kernels differ only in φ and φ': the default elu1 runs every shape, the others two (the interpreter is slow).
KERNEL_SHAPES = {kernel: SHAPES if kernel == "elu1" else SHAPES[1::2] for kernel in FAST_KERNELS}
CASES = {f"{kernel}-{shape}-{name}": (kernel, shape, dtype)
         for kernel, shapes in KERNEL_SHAPES.items() for shape in shapes for name, dtype in DTYPES.items()}


def random_qkv(shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    """q, k, v and an output cotangent."""
    b, h, n, d, e = shape
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, dim, generator=g).to(device=device, dtype=dtype) for dim in (d, d, e, e)]


def output_and_grads(fn: Callable[..., torch.Tensor], shape: tuple[int, ...], kernel: str, dtype: torch.dtype,
                     device: str = "cpu") -> list[torch.Tensor]:
    *inputs, cotangent = random_qkv(shape, dtype, device)
    leaves = [t.requires_grad_() for t in inputs]
    out = fn(*leaves, kernel=kernel)
    return [out.detach(), *torch.autograd.grad(out, leaves, cotangent)]


def fused_qkv(fn: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
    """q, k, v as the strided views of a fused qkv projection, shifted so that ELU+1 sees large negative inputs
    (a bf16 ``elu(x) + 1`` gives zero features and a zero normaliser there)."""
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(1, 197, 3, 2, 16, generator=g) * 4 - 8).to(torch.bfloat16).permute(2, 0, 3, 1, 4)
    q, k, v = (t.requires_grad_() for t in qkv.unbind(0))
    assert not q.is_contiguous()
    out = fn(q, k, v)
    cotangent = torch.randn(out.shape, generator=g).to(out.dtype)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), cotangent)]


def module_and_input() -> tuple[LinearAttention, torch.Tensor]:
    torch.manual_seed(0)
    return LinearAttention(32, 2, impl="reference"), torch.randn(1, 37, 32, requires_grad=True)


def compiled_fast_module() -> list[Any]:
    """Output and input gradient of a torch.compile'd LinearAttention on the fast path, and its graph breaks."""
    module, x = module_and_input()
    module.impl = "triton"
    breaks = torch._dynamo.explain(module)(x).graph_break_count
    out = torch.compile(module, backend="aot_eager", fullgraph=True)(x)
    return [out.detach(), *torch.autograd.grad(out.sum(), x), breaks]


def opcheck() -> str:
    """Schema, fake (meta) implementation and autograd registration of the custom op, checked by torch."""
    q, k, v, _ = random_qkv((1, 2, 37, 16, 16), torch.float32)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    try:
        torch.library.opcheck(torch.ops.adala.linear_attention_forward.default, (*inputs, "elu1", 1e-6))
    except Exception:  # reported by the test in the parent process
        return traceback.format_exc()
    return "ok"


def interpreted_results() -> dict[str, Any]:
    """Everything the fast path computes for these tests; run under TRITON_INTERPRET=1."""
    results: dict[str, Any] = {case: output_and_grads(fast_linear_attention, shape, kernel, dtype)
                               for case, (kernel, shape, dtype) in CASES.items()}
    results["fused_qkv"] = fused_qkv(fast_linear_attention)
    results["compiled_module"] = compiled_fast_module()
    results["opcheck"] = opcheck()
    return results


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("interpreted") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


def assert_all_close(got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype) -> None:
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", CASES)
def test_interpreted_kernels_match_reference(interpreted: dict[str, Any], case: str) -> None:
    kernel, shape, dtype = CASES[case]
    assert_all_close(interpreted[case], output_and_grads(linear_attention, shape, kernel, dtype), dtype)


def test_strided_inputs_and_negative_features(interpreted: dict[str, Any]) -> None:
    assert torch.isfinite(interpreted["fused_qkv"][0]).all()
    assert_all_close(interpreted["fused_qkv"], fused_qkv(linear_attention), torch.bfloat16)


def test_custom_op_passes_opcheck(interpreted: dict[str, Any]) -> None:
    assert interpreted["opcheck"] == "ok", interpreted["opcheck"]


def test_compiled_module_with_fast_path(interpreted: dict[str, Any]) -> None:
    """torch.compile(fullgraph=True) traces the custom op; output and input gradient equal the reference module."""
    *got, breaks = interpreted["compiled_module"]
    assert breaks == 0
    module, x = module_and_input()
    out = module(x)
    for a, b in zip(got, [out.detach(), *torch.autograd.grad(out.sum(), x)]):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_reference_path_compiles_without_graph_break() -> None:
    module = LinearAttention(32, 2, impl="reference")
    explanation = torch._dynamo.explain(module)(torch.randn(2, 37, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_path_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not uses_fast_path("auto", "elu1", cpu)
    assert uses_fast_path("auto", "relu", cuda)
    assert not uses_fast_path("auto", "exp", cuda)  # the exp kernel's shift needs the reference path
    assert not uses_fast_path("reference", "elu1", cuda)
    assert uses_fast_path("triton", "elu1", cpu)
    monkeypatch.setenv(IMPL_ENV, "reference")
    assert LinearAttention(16, 2).impl == "reference"
    assert LinearAttention(16, 2, impl="auto").impl == "auto"
    monkeypatch.setenv(IMPL_ENV, "fast")
    with pytest.raises(ValueError, match=IMPL_ENV):
        resolve_impl()


def test_auto_on_cpu_is_the_reference() -> None:
    q, k, v, _ = random_qkv((1, 2, 9, 8, 8), torch.float32)
    assert torch.equal(attention(q, k, v, kernel="elu1"), linear_attention(q, k, v, kernel="elu1"))


def test_fast_path_rejects_exp_kernel() -> None:
    q, k, v, _ = random_qkv((1, 1, 4, 8, 8), torch.float32)
    with pytest.raises(ValueError, match="exp"):
        fast_linear_attention(q, k, v, kernel="exp")


# ---------------------------------------------------------------- CUDA, compiled kernels

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 16, 257, 64, 64), (1, 16, 5477, 64, 64), (3, 12, 197, 64, 64), (2, 4, 1, 32, 32),
                                   (1, 6, 1031, 48, 80)], ids=str)
@pytest.mark.parametrize("kernel", FAST_KERNELS)
def test_cuda_kernels_match_reference(kernel: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    got = output_and_grads(fast_linear_attention, shape, kernel, dtype, "cuda")
    assert_all_close(got, output_and_grads(linear_attention, shape, kernel, dtype, "cuda"), dtype)


@pytest.mark.gpu
@cuda
def test_cuda_module_uses_fast_path_and_compiles() -> None:
    module = LinearAttention(1024, 16, impl="auto").cuda()
    x = torch.randn(2, 1025, 1024, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = module(x)
    assert any("_output_kernel" in e.name for e in prof.events())
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(x), out, **TOL[torch.float32])
    module.impl = "reference"
    torch.testing.assert_close(module(x), out, **TOL[torch.float32])


if __name__ == "__main__":
    torch.save(interpreted_results(), sys.argv[1])

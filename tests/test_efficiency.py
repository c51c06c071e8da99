"""Efficiency measurement (adala.eval.efficiency), the user command (adala.eval.bench) and the table driver
(bench.efficiency) on tiny models on CPU. Timings are not asserted, only their consistency."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from adala.eval import bench
from adala.eval.efficiency import attention_flops, count_flops, measure, peak_memory_gb
from adala.models import attention_config, build_vfm, save_export
from bench import efficiency as driver

DEMO = dict(tokens=8 * 8 + 1, width=64, head_dim=16, depth=4)  # demo_tiny at 32²: 4×4 patches, 4 heads of 16


@pytest.mark.parametrize("kind", ["softmax", "linear"])
def test_counted_attention_flops_match_the_formula(kind: str) -> None:
    flops = count_flops(lambda: build_vfm("demo_tiny", attention={"kind": kind}), 32)
    assert flops["attention"] == attention_flops(kind, **DEMO)
    # fvcore counts multiply-accumulates and skips SDPA, but sees linear attention's matmuls.
    without = flops["total"] - (flops["attention"] if kind == "softmax" else 0)
    assert flops["fvcore_style"] == without / 2


def test_linear_attention_saves_flops_at_high_resolution() -> None:
    softmax, linear = (count_flops(lambda: build_vfm("demo_tiny", img_size=256, attention={"kind": kind}), 256)
                       for kind in ("softmax", "linear"))
    assert softmax["total"] - linear["total"] == softmax["attention"] - linear["attention"] > 0


class Scratch(nn.Module):
    """Allocates and writes a temporary of ``nbytes`` in its forward."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4))
        self.numel = nbytes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.ones(self.numel).sum()


def test_cpu_peak_memory_sees_a_temporary() -> None:
    small, large = (peak_memory_gb(Scratch(nbytes), torch.zeros(4)) for nbytes in (0, 300_000_000))
    if small is None:
        pytest.skip("no /proc resident-set accounting here")
    assert 0.28 < large - small < 0.4


def test_measure_reports_consistent_rates() -> None:
    model = build_vfm("demo_tiny")
    flops = count_flops(lambda: build_vfm("demo_tiny"), 32)
    result = measure(model, img_size=32, dtype="float32", device=torch.device("cpu"), flops=flops, batches=[1, 2],
                     min_time_s=0.0, peak_tflops=1.0)
    assert [row["batch"] for row in result["batches"]] == [1, 2]
    assert result["params"] == sum(p.numel() for p in model.parameters())
    weights_gb = result["params"] * 4 / 1e9
    assert result["peak_gb_batch1"] is None or result["peak_gb_batch1"] > weights_gb
    for row in result["batches"]:
        assert row["images_per_s"] == pytest.approx(row["batch"] / (row["step_ms"] / 1e3))
        assert row["tflops_per_s"] == pytest.approx(row["images_per_s"] * flops["total"] / 1e12)
        assert row["mfu"] == pytest.approx(row["tflops_per_s"] / 1.0)
    assert result["best"]["images_per_s"] == max(row["images_per_s"] for row in result["batches"])


@pytest.fixture()
def linear_export(tmp_path: Path) -> Path:
    model = build_vfm("demo_tiny", attention={"kind": "linear", "kernel": "relu"})
    metadata = {"model": "demo_tiny", "img_size": 32, "attention": attention_config(model)}
    return save_export(model.state_dict(), tmp_path / "export" / "model.safetensors", metadata)


def test_user_command_measures_an_export(linear_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    assert bench.main([str(linear_export), "--img-size", "16", "--batch", "1", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["attention"] == {"kind": "linear", "kernel": "relu", "eps": 1e-6}
    assert result["img_size"] == 16 and [row["batch"] for row in result["batches"]] == [1, 2]
    expected = count_flops(lambda: build_vfm("demo_tiny", img_size=16, attention=result["attention"]), 16)
    assert result["flops"] == expected


@pytest.mark.parametrize("args, fix", [
    (["missing.safetensors"], "pass the path of an export"),
    (["{export}", "--dtype", "fp8"], "use one of float32, bfloat16, float16"),
    (["{export}", "--img-size", "-4"], "not a positive number of pixels; use e.g. 32"),
])
def test_user_command_bad_input_is_one_line(linear_export: Path, capsys, args: list[str], fix: str) -> None:
    assert bench.main([a.format(export=linear_export) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fix in err


def test_driver_report_from_measured_cases(tmp_path: Path) -> None:
    """Worker results of a tiny ViT feed the markdown table, the linear-vs-softmax ratios and the plot."""
    args = driver.parse_args(["--models", "vit_tiny_patch16", "--sizes", "40", "--dtypes", "float32", "--modes",
                              "eager", "--max-batch", "1", "--min-time-s", "0", "--device", "cpu"])
    report = {**driver.header(args, ["--models", "vit_tiny_patch16"]), "load_average": {"start": 0.0, "end": 0.0}}
    report["results"] = [{**case, **driver.worker(case)} for case in driver.cases(args)]
    softmax, linear = report["results"]
    assert softmax["img_size"] == 48 and softmax["tokens"] == 3 * 3 + 1  # 40 px rounded up to whole 16-px patches
    text = driver.markdown(report)
    assert "H100 results pending" in text and report["command"] in text
    speedup = linear["batch1"]["images_per_s"] / softmax["batch1"]["images_per_s"]
    assert f"{speedup:.2f}×" in text
    driver.plot(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_driver_skips_a_case_that_would_be_too_slow() -> None:
    case = driver.cases(driver.parse_args(["--models", "vit_tiny_patch16", "--sizes", "224", "--dtypes", "float32",
                                           "--modes", "eager", "--attentions", "softmax", "--device", "cpu"]))[0]
    slow = {**case, "batch1": {"tflops_per_s": 1e-6}}
    assert "skipped" in driver.too_slow(case, [slow], timeout=60)
    assert driver.too_slow(case, [{**slow, "batch1": {"tflops_per_s": 1e3}}], timeout=60) is None

"""Strategy options in one process: activation checkpointing, torch.compile, bf16, and the memory budget."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import distributed_run
from adala.config import StrategyConfig, override
from adala.engine.strategies import Strategy
from adala.models import build_vfm
from adala.models.weights import read_state_dict
from adala.stages.align_features import FeatureAlignment
from adala.stages.common import all_parameters


def stage2(run_dir: Path, shards: dict[str, str], teacher: str, *extra: str) -> list[str]:
    return ["stage=align_features", override("run_dir", run_dir), override("model.weights", teacher),
            "data=demo", override("data.train", shards["pretrain"]), "train.log_every=1", "train.progress=false",
            "train.max_steps=3", "train.save_every=3", *extra]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def prepared(cfg: StrategyConfig) -> FeatureAlignment:
    model = FeatureAlignment(build_vfm("demo_tiny", attention={"kind": "linear"}), alpha=1.0)
    strategy = Strategy(cfg, device="cpu")
    placed, _ = strategy.prepare(model, all_parameters("student"), lr=1e-3, weight_decay=0.0, max_grad_norm=None)
    return placed


def test_activation_checkpointing_recomputes_and_changes_nothing(
    tmp_path: Path, demo_shards: dict[str, str], random_teacher: str
) -> None:
    assert prepared(StrategyConfig(activation_checkpointing=True)).student.grad_checkpointing
    assert not prepared(StrategyConfig()).student.grad_checkpointing
    distributed_run.main(stage2(tmp_path / "plain", demo_shards, random_teacher))
    distributed_run.main(stage2(tmp_path / "ckpt", demo_shards, random_teacher, "strategy.activation_checkpointing=true"))
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)


@pytest.mark.slow
def test_compiled_blocks_give_the_same_outputs() -> None:
    torch.manual_seed(0)
    eager = FeatureAlignment(build_vfm("demo_tiny", attention={"kind": "linear"}), alpha=1.0)
    compiled = prepared(StrategyConfig(compile=True))
    compiled.load_state_dict(eager.state_dict())
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in compiled.student.blocks)
    images = torch.randn(2, 3, 32, 32)
    target = torch.randn(2, 65, 64)
    expected = eager({"image": images, "target": target})
    actual = compiled({"image": images, "target": target})
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-4, atol=1e-6)


def test_fsdp_bf16_tracks_fp32_and_exports_fp32(tmp_path: Path, demo_shards: dict[str, str], random_teacher: str) -> None:
    """FSDP2 with bf16 parameters (one rank): the losses follow the fp32 run to bf16 accuracy, the master
    weights and the export stay fp32."""
    distributed_run.main(stage2(tmp_path / "fp32", demo_shards, random_teacher))
    distributed_run.main(stage2(tmp_path / "bf16", demo_shards, random_teacher, "strategy=fsdp", "train.precision=bf16"))
    reference, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert bf16 != reference, "bf16 should round somewhere"
    assert bf16 == pytest.approx(reference, rel=0.1, abs=1e-4)
    export = read_state_dict(tmp_path / "bf16" / "export" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in export.values() if v.is_floating_point())


def test_memory_budget_is_logged_and_teacher_mode_chosen(
    tmp_path: Path, demo_shards: dict[str, str], random_teacher: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    distributed_run.main(stage2(tmp_path, demo_shards, random_teacher, "train.max_steps=1"))
    (line,) = [r.getMessage() for r in caplog.records if "memory budget" in r.getMessage()]
    for part in ("student params", "student grads", "optimizer state", "teacher (replicate)", "activations (estimate)"):
        assert part in line

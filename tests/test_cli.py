"""The command line: one clear error line for bad input, before any work; the README's commands stay true."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from adala.__main__ import main

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=nope"], "unknown model 'nope'; choose one of: clip_l, demo_small, demo_tiny"),
        (["stage=nope"], "unknown stage 'nope'; choose one of: align_attention"),
        (["attention=nope"], "unknown attention 'nope'; choose one of: elu1, exp, relu, softmax, softplus"),
        (["train.nope=1"], "unknown config key 'train.nope'"),
        (["train.max_steps=abc"], "train.max_steps: Value 'abc'"),
        (["stage=align_attention", "model=dinov2_s", "model.img_size=500"], "not a multiple of dinov2_s's patch size 14"),
        (["stage=align_attention", "model.weights=/nonexistent.pth"], "model.weights=/nonexistent.pth: file not found"),
        (["stage=align_attention", "attention.kernel=cosh"], "unknown linear-attention kernel 'cosh'"),
        (["stage=finetune_cls", "data.train=/nonexistent/x.tar"], "shard /nonexistent/x.tar not found"),
        (["stage=align_features", "data.train=/x.tar"], "set model.weights=PATH"),
        (["stage.batch_size=4"], "select it first"),
        (["stage=finetune_cls", "stage.optim.schedule=cosine"], "unknown lr schedule 'cosine'"),
        (["stage=finetune_cls", "data.eval_transform=nope"], "unknown eval_transform 'nope'"),
        (["strategy=nope"], "unknown strategy 'nope'; choose one of: ddp, deepspeed, fsdp, single"),
        (["stage=finetune_cls", "strategy.teacher=half"], "unknown strategy.teacher 'half'"),
        (["stage=finetune_cls", "strategy=fsdp", "strategy.cpu_offload=true", "train.device=cpu"], "needs CUDA"),
        (["stage=finetune_cls", "strategy=deepspeed", "strategy.zero_stage=1"], "strategy.zero_stage=1: use 2 or 3"),
        (["stage=finetune_cls", "strategy=deepspeed", "strategy.deepspeed_config=/nonexistent.json"],
         "strategy.deepspeed_config=/nonexistent.json"),
        (["stage=finetune_cls", "train.precision=fp8"], "unknown precision 'fp8'"),
    ],
)
def test_bad_input_gives_one_line(args: list[str], expected: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main([*args, f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adala: error: ") and expected in err
    assert "\n" not in err
    assert not (tmp_path / "run").exists(), "nothing may be written before the input is checked"


def test_mismatched_weights_error_before_training(tmp_path: Path, demo_shards: dict[str, str], capsys) -> None:
    from adala.models import build_vfm

    import torch

    weights = tmp_path / "dinov2_s.pth"
    torch.save(build_vfm("dinov2_s", img_size=56).state_dict(), weights)
    code = main(["stage=align_attention", f"model.weights={weights}", f'data.train="{demo_shards["pretrain"]}"',
                 "train.max_steps=2", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "do not fit demo_tiny" in err and "model=" in err
    assert not (tmp_path / "run").exists()


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = "bash scripts/test.sh"
    assert f"\n{command}\n" in readme and any(line.endswith(command) for line in ci.splitlines())


def test_help_and_cfg() -> None:
    out = subprocess.run([sys.executable, "-m", "adala", "--cfg", "stage=align_features", "model=clip_l"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "name: clip_l" in out and "name: align_features" in out and "lr: 0.001" in out


def test_attention_and_models_import_with_torch_and_timm_only() -> None:
    code = (
        "import sys, adala.attention, adala.models\n"
        "heavy = {'hydra', 'omegaconf', 'webdataset', 'tensorboard', 'deepspeed', 'ray', 'submitit'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)

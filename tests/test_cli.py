"""The command line: one clear error line for bad input, before any work; the README's commands stay true."""
from __future__ import annotations

import os
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
        (["attention=nope"], "unknown attention 'nope'; choose one of: "),
        (["attention.nope=1"], "attention.nope is not a setting of the chosen attention"),
        (["stage=finetune_cls", "+attention.nope=1"], "attention 'linear' has no setting nope; its settings: eps, kernel"),
        (["stage=finetune_cls", "attention.softmax_blocks=[x]"], "attention.softmax_blocks must be a list of block"),
        (["train.nope=1"], "unknown config key 'train.nope'"),
        (["train.max_steps=abc"], "train.max_steps: Value 'abc'"),
        (["stage=align_attention", "model=dinov2_s", "model.img_size=-14"], "resolution -14 is not a positive number"),
        (["stage=align_attention", "model=timm"], "model.timm_id is not set"),
        (["stage=align_attention", "model=timm", "model.timm_id=resnet50"], "resnet50 is a timm ResNet, not a VisionTransformer"),
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
    code = main(["stage=align_attention", f"model.weights={weights}", "data=demo", f'data.train="{demo_shards["pretrain"]}"',
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


STAGES = "stage=align_attention|align_features|finetune_cls|finetune_seg"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=dinov2_l"], f"no stage chosen for model=dinov2_l: add {STAGES}"),
        (["demo.teacher_steps=800", "run_dir=runs/demo2"], "no stage chosen for run_dir=runs/demo2: add stage="),
        (["--cfg", "train.max_steps=5"], "no stage chosen for train.max_steps=5"),
        (["--check", "strategy=fsdp"], "no stage chosen for strategy=fsdp"),
        (["hydra.run.dir=outputs"], "hydra.run.dir=outputs: hydra.* overrides are not supported"),
        (["stage=align_attention", "hydra/launcher=basic"], "hydra/launcher=basic: hydra.* overrides"),
        (["+hydra.job.chdir=true", "stage=align_attention"], "+hydra.job.chdir=true: hydra.* overrides"),
        (["--multirun", "stage=align_attention"], "unknown option --multirun; adala takes --cfg, --check"),
        (["slurm-script", "stage4"], "slurm-script takes one name: stage1, stage2, stage3"),
        (["slurm-script"], "slurm-script takes one name"),
    ],
)
def test_surprises_are_refused(args: list[str], expected: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Arguments that would start the 10-minute demo, or be silently ignored: one line, exit code 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADALA_CACHE", str(tmp_path / "cache"))
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("adala: error: ") and expected in err and "\n" not in err, err
    assert captured.out == ""
    assert not any(tmp_path.iterdir()), "nothing may be written"


def test_demo_takes_demo_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cfg", "demo.run_dir=runs/demo2", "demo.teacher_steps=800"]) == 0
    demo = capsys.readouterr().out.split("\ndemo:\n", 1)[1]
    assert "  run_dir: runs/demo2\n" in demo and "  teacher_steps: 800\n" in demo


def test_help_lists_the_options_of_the_config_directory(tmp_path: Path) -> None:
    """--help reads every group's options from the config directory: a model or data set added there is listed."""
    import shutil

    from adala.__main__ import GROUPS
    from adala.config import options

    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "model" / "my_vit.yaml").write_text((conf / "model" / "demo_tiny.yaml").read_text())
    (conf / "data" / "my_data.yaml").write_text((conf / "data" / "demo.yaml").read_text())
    env = {**os.environ, "ADALA_CONFIG_DIR": str(conf)}
    out = subprocess.run([sys.executable, "-m", "adala", "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True).stdout
    listed: dict[str, str] = {}  # group -> the options on its lines of the help text
    for line in out.split("\nconfig groups", 1)[1].split("\n\n", 1)[0].splitlines()[1:]:
        if line.startswith("   "):  # a continuation line
            listed[group] += " " + line.strip()
        else:
            group, _, first = line.strip().partition("=")
            listed[group] = first
    parsed = {group: [o.strip() for o in text.split(",")] for group, text in listed.items()}
    added = {"model": ["my_vit"], "data": ["my_data"]}
    assert parsed == {group: sorted([*options(group), *added.get(group, [])]) for group in GROUPS}
    assert "slurm-script" in out and "--check" in out and "--cfg" in out


def test_slurm_script_prints_the_sbatch_script(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("stage1", "stage2", "stage3"):
        assert main(["slurm-script", name]) == 0
        assert capsys.readouterr().out == (REPO / "slurm" / f"{name}.sh").read_text()


@pytest.mark.parametrize(("script", "usage"), [("submit.py", "--gpus-per-node"), ("ray_sweep.py", "--workers")])
def test_launchers_run_from_a_checkout(script: str, usage: str) -> None:
    out = subprocess.run([sys.executable, f"launchers/{script}", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith(f"usage: python launchers/{script}") and usage in out


def test_attention_and_models_import_with_torch_and_timm_only() -> None:
    code = (
        "import sys, adala.attention, adala.models\n"
        "heavy = {'hydra', 'omegaconf', 'webdataset', 'tensorboard', 'deepspeed', 'ray', 'submitit'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)

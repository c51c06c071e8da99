"""The training loop, checkpoints, resume and the data stream, on real tar shards with the tiny demo ViT."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adala.config import compose, override
from adala.engine.checkpoint import COMPLETE_MARKER, CheckpointManager
from adala.engine.loop import NonFiniteLossError
from adala.engine.state import TrainState
from adala.models.weights import read_state_dict
from adala.run import run_stage

REPO = Path(__file__).resolve().parent.parent


def stage_overrides(run_dir: Path, shards: dict[str, str], teacher: str, *extra: str) -> list[str]:
    return [
        "stage=align_features", override("run_dir", run_dir), override("model.weights", teacher), override("data.train", shards['pretrain']),
        "stage.batch_size=8", "train.log_every=1", "train.progress=false", *extra,
    ]


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_checkpoint_manager_keeps_last_and_skips_incomplete(tmp_path: Path) -> None:
    state = TrainState()
    manager = CheckpointManager(tmp_path, {"train": state}, keep_last=2)
    for step in (1, 2, 3):
        state.step = step
        manager.save(step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3"]
    (tmp_path / "step-3" / COMPLETE_MARKER).unlink()  # as if killed before the marker was written
    assert manager.latest() == tmp_path / "step-2"
    restored = TrainState()
    CheckpointManager(tmp_path, {"train": restored}).load(manager.latest())
    assert restored.step == 2
    with pytest.raises(FileNotFoundError):
        manager.load(tmp_path / "step-3")


def test_kill_and_resume_matches_uninterrupted_run(tmp_path: Path, demo_shards: dict[str, str], random_teacher: str) -> None:
    steps = ["train.max_steps=60", "train.save_every=5"]
    reference = run_stage(compose(stage_overrides(tmp_path / "reference", demo_shards, random_teacher, *steps)))

    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "adala", *stage_overrides(run_dir, demo_shards, random_teacher, *steps)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "step-10" / COMPLETE_MARKER).exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_dir / "export").exists(), "the run finished before the kill; the test proves nothing"

    resumed = run_stage(compose(stage_overrides(run_dir, demo_shards, random_teacher, *steps, "resume=auto")))
    assert resumed.steps == 60
    expected, actual = read_state_dict(reference.export), read_state_dict(resumed.export)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert logged_steps(run_dir) == list(range(1, 61))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(
    tmp_path: Path, demo_shards: dict[str, str], random_teacher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    mse_loss = torch.nn.functional.mse_loss

    def nan_on_sixth_call(*args, **kwargs) -> torch.Tensor:  # the loss of step 6 becomes NaN
        calls["n"] += 1
        loss = mse_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(torch.nn.functional, "mse_loss", nan_on_sixth_call)
    run_dir = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"at step 6\b.*step-4"):
        run_stage(compose(stage_overrides(run_dir, demo_shards, random_teacher, "train.max_steps=8", "train.save_every=2")))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert torch.load(run_dir / "checkpoints" / "step-4" / "state.pt", weights_only=False)["train"]["step"] == 4
    assert not (run_dir / "export").exists()

"""The training loop, checkpoints, resume and the data stream, on real tar shards with the tiny demo ViT."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adala.config import StrategyConfig, compose, override
from adala.engine.checkpoint import COMPLETE_MARKER, CheckpointManager
from adala.engine.loop import NonFiniteLossError
from adala.engine.preemption import REQUEUE_EXIT_CODE
from adala.engine.state import TrainState
from adala.engine.strategies import Strategy
from adala.errors import UserError
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


def manager(directory: Path, model: torch.nn.Module, state: TrainState, keep_last: int = 2) -> CheckpointManager:
    strategy = Strategy(StrategyConfig(), device="cpu")
    optimizer = torch.optim.AdamW(model.parameters())
    return CheckpointManager(directory, strategy=strategy, model=model, optimizer=optimizer, states={"train": state},
                             meta={"stage": "test"}, keep_last=keep_last)


def test_checkpoint_manager_keeps_last_and_skips_incomplete(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, state = torch.nn.Linear(4, 4), TrainState()
    checkpoints = manager(tmp_path, model, state)
    for step in (1, 2, 3):
        state.step = step
        checkpoints.save(step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3"]

    (tmp_path / "step-3" / COMPLETE_MARKER).unlink()  # as if killed before the marker was written
    assert checkpoints.latest() == tmp_path / "step-2"
    assert "skipping incomplete checkpoint" in caplog.text and "step-3" in caplog.text
    restored = TrainState()
    torch.nn.init.zeros_(model.weight)
    assert manager(tmp_path, model, restored).load(checkpoints.latest()) == 2
    assert restored.step == 2 and model.weight.abs().sum() > 0
    with pytest.raises(UserError, match="not a complete checkpoint"):
        checkpoints.load(tmp_path / "step-3")

    shard = next((tmp_path / "step-2" / "model").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])  # a truncated shard: the manifest's size no longer matches
    with pytest.raises(UserError, match="no usable checkpoint.*2 incomplete"):
        checkpoints.latest()
    shard.unlink()  # a missing shard
    with pytest.raises(UserError, match="no usable checkpoint"):
        checkpoints.latest()


def test_checkpoint_of_another_stage_is_refused(tmp_path: Path) -> None:
    model, state = torch.nn.Linear(4, 4), TrainState()
    manager(tmp_path, model, state).save(1)
    other = manager(tmp_path, model, state)
    other.meta = {"stage": "other"}
    with pytest.raises(UserError, match="belongs to stage 'test', not 'other'"):
        other.load(tmp_path / "step-1")


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


def nan_losses(monkeypatch: pytest.MonkeyPatch, calls: set[int]) -> None:
    """Make the loss of the given forward passes (counted from 1) NaN."""
    count = {"n": 0}
    mse_loss = torch.nn.functional.mse_loss

    def sometimes_nan(*args, **kwargs) -> torch.Tensor:
        count["n"] += 1
        loss = mse_loss(*args, **kwargs)
        return loss * float("nan") if count["n"] in calls else loss

    monkeypatch.setattr(torch.nn.functional, "mse_loss", sometimes_nan)


def test_non_finite_loss_skips_the_step_and_counts_it(
    tmp_path: Path, demo_shards: dict[str, str], random_teacher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    nan_losses(monkeypatch, {3, 6, 7})
    run_dir = tmp_path / "nan"
    result = run_stage(compose(stage_overrides(run_dir, demo_shards, random_teacher, "train.max_steps=8")))
    assert result.steps == 8
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["nonfinite_skipped"] == 3
    saved = torch.load(run_dir / "checkpoints" / "step-8" / "ranks" / "rank-0.pt", weights_only=False)
    assert saved["train"]["nonfinite_skipped"] == 3
    assert all(torch.isfinite(v).all() for v in read_state_dict(result.export).values())


def test_non_finite_loss_in_a_row_stops_and_keeps_last_checkpoint(
    tmp_path: Path, demo_shards: dict[str, str], random_teacher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    nan_losses(monkeypatch, set(range(6, 100)))
    run_dir = tmp_path / "nan"
    overrides = stage_overrides(run_dir, demo_shards, random_teacher, "train.max_steps=8", "train.save_every=2",
                                "train.max_nonfinite_steps=3")
    with pytest.raises(NonFiniteLossError, match=r"not finite for 3 steps in a row \(at step 6\).*step-4"):
        run_stage(compose(overrides))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert not (run_dir / "export").exists()


def test_sigterm_saves_and_exits_for_requeue(tmp_path: Path, demo_shards: dict[str, str], random_teacher: str) -> None:
    run_dir = tmp_path / "preempted"
    overrides = stage_overrides(run_dir, demo_shards, random_teacher, "train.max_steps=200", "train.save_every=1000")
    process = subprocess.Popen([sys.executable, "-m", "adala", *overrides], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    log = run_dir / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be signalled"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == REQUEUE_EXIT_CODE
    assert "resume=auto" in process.stderr.read()
    (saved,) = (run_dir / "checkpoints").glob("step-*")
    step = int(saved.name.split("-")[1])
    assert 2 <= step < 200 and logged_steps(run_dir)[-1] == step

    resumed = run_stage(compose([*overrides[:-2], "train.max_steps=" + str(step + 3), "resume=auto"]))
    assert resumed.steps == step + 3
    assert logged_steps(run_dir) == list(range(1, step + 4))

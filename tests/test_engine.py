"""The training loop, checkpoints, resume and the data stream, on real tar shards with the tiny demo ViT."""
from __future__ import annotations

import json
import math
import os
import shutil
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
        "stage=align_features", override("run_dir", run_dir), override("model.weights", teacher), "data=demo",
        override("data.train", shards['pretrain']),
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


def test_checkpoints_past_a_rewound_run_are_removed_not_kept(tmp_path: Path) -> None:
    """A run resumed from an earlier checkpoint (resume=PATH) replaces the later ones as it passes them; keep-last
    never keeps an abandoned run's later checkpoints in place of this run's, where resume=auto would pick them."""
    model, state = torch.nn.Linear(4, 4), TrainState()
    checkpoints = manager(tmp_path, model, state, keep_last=4)
    for step in (1, 2, 3, 4):
        state.step = step
        checkpoints.save(step)
    rewound_state = TrainState()
    rewound = manager(tmp_path, model, rewound_state)
    assert rewound.load(tmp_path / "step-2") == 2
    rewound_state.step = 3
    rewound.save(3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3"]
    assert rewound.latest() == tmp_path / "step-3"


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


def test_periodic_work_runs_on_its_steps_and_leaves_training_exactly_as_it_was(tmp_path: Path) -> None:
    """Work between steps that draws on the RNG (as a DataLoader's seed does) leaves a model with dropout trained
    exactly as without it; its scalars are logged with its steps."""
    from adala.engine.loop import LoopConfig, Periodic, StageParts, StepOutput, fit

    class Noisy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear, self.dropout = torch.nn.Linear(8, 1), torch.nn.Dropout(0.5)

        def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
            return StepOutput(loss=self.linear(self.dropout(batch["image"])).pow(2).mean())

    def train(run_dir: Path, periodic: list[Periodic]) -> torch.Tensor:
        torch.manual_seed(0)
        parts = StageParts(model=Noisy(), param_groups=lambda model: [{"params": list(model.parameters())}],
                           export=lambda state, path, **metadata: path)
        batches = ({"image": torch.randn(4, 8, generator=torch.Generator().manual_seed(i))} for i in range(100))
        trainer = fit(parts, batches, LoopConfig(max_steps=6, lr=0.1, log_every=100, progress=False),
                      strategy=Strategy(StrategyConfig(), device="cpu"), run_dir=run_dir, periodic=periodic)
        return trainer.model.linear.weight.detach().clone()

    calls: list[int] = []

    def draw(model: torch.nn.Module, step: int) -> dict[str, float]:
        calls.append(step)
        return {"drawn": float(torch.rand(()))}

    with_work = train(tmp_path / "with", [Periodic("draw", 4, draw, at_end=True)])
    assert calls == [4, 6]
    assert torch.equal(with_work, train(tmp_path / "without", []))
    assert [(r["step"], "drawn" in r) for r in map(json.loads, (tmp_path / "with" / "log.jsonl").read_text().splitlines())] \
        == [(4, True), (6, True)]


def finetune_overrides(run_dir: Path, shards: dict[str, str], teacher: str, *extra: str) -> list[str]:
    return [
        "stage=finetune_cls", "data=demo", override("run_dir", run_dir), override("model.weights", teacher),
        override("data.train", shards["finetune"]), override("data.val", shards["val"]), "stage.batch_size=8",
        "train.max_steps=6", "train.log_every=1", "train.progress=false", *extra,
    ]


def tensorboard_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_evaluation_while_training_logs_keeps_best_and_leaves_training_alone(
    tmp_path: Path, demo_shards: dict[str, str], random_teacher: str
) -> None:
    from adala.models.weights import read_export_metadata

    run_dir = tmp_path / "eval"
    # Training draws on the torch RNG (drop-path), and so does each evaluation (its DataLoader's worker seed).
    randomness = ("data.workers=1", "+model.timm_kwargs.drop_path_rate=0.2")
    result = run_stage(compose(finetune_overrides(run_dir, demo_shards, random_teacher, "train.eval_every=2",
                                                  "train.export_every=2", "train.save_every=3", *randomness)))
    records = {r["step"]: r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())}
    evaluated = {step: r["val/top1"] for step, r in records.items() if "val/top1" in r}
    assert sorted(evaluated) == [2, 4, 6] and sorted(records) == list(range(1, 7))
    assert tensorboard_scalars(run_dir, "val/top1") == pytest.approx(evaluated)
    assert result.metrics["top1"] == pytest.approx(evaluated[6])

    exports = run_dir / "export"
    assert sorted(p.name for p in exports.iterdir()) == [
        "best.safetensors", "model.safetensors", "step-2.safetensors", "step-4.safetensors", "step-6.safetensors"]
    best_step = max(evaluated, key=lambda step: (evaluated[step], -step))  # the first of equal values stays best
    best = read_export_metadata(exports / "best.safetensors")
    assert best["step"] == best_step and best["top1"] == pytest.approx(evaluated[best_step])
    assert_same_weights(read_state_dict(exports / "best.safetensors"), read_state_dict(exports / f"step-{best_step}.safetensors"))
    assert read_export_metadata(exports / "step-4.safetensors")["step"] == 4
    assert json.loads((run_dir / "metrics.json").read_text())["best"] == {"step": best_step, "top1": best["top1"]}

    # Evaluation and exports do not change training: the same final weights as a run without them.
    plain = run_stage(compose(finetune_overrides(tmp_path / "plain", demo_shards, random_teacher, "train.save_every=3",
                                                 *randomness)))
    assert_same_weights(read_state_dict(result.export), read_state_dict(plain.export))

    # A run resumed from the middle (step 3) evaluates again at 4 and 6 and ends exactly where the whole run did.
    final, best_before = read_state_dict(result.export), best
    shutil.rmtree(run_dir / "checkpoints" / "step-6")
    for name in ("best.safetensors", "model.safetensors", "step-4.safetensors", "step-6.safetensors"):
        (exports / name).unlink()
    resumed = run_stage(compose(finetune_overrides(run_dir, demo_shards, random_teacher, "train.eval_every=2",
                                                   "train.export_every=2", "train.save_every=3", *randomness, "resume=auto")))
    assert_same_weights(read_state_dict(resumed.export), final)
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {r["step"]: r["val/top1"] for r in records if "val/top1" in r} == pytest.approx(evaluated)
    if best_step > 3:  # the best is rewritten only by an evaluation after the checkpoint it resumed from
        assert read_export_metadata(exports / "best.safetensors") == best_before
    else:
        assert not (exports / "best.safetensors").exists()


@pytest.mark.multiprocess
def test_evaluation_and_exports_are_collectives_under_fsdp(
    tmp_path: Path, demo_shards: dict[str, str], random_teacher: str
) -> None:
    """Two ranks evaluate and export together (the one val shard gives rank 1 no batches of its own), rank 0
    writes; log lines name their rank and rank 1 logs no INFO."""
    from adala.models.weights import read_export_metadata

    run_dir = tmp_path / "fsdp"
    overrides = [*finetune_overrides(run_dir, demo_shards, random_teacher, "strategy=fsdp", "train.max_steps=4",
                                     "train.eval_every=2", "train.export_every=2", "stage.batch_size=4"),
                 override("data.train", demo_shards["pretrain"])]  # 3 shards: one per rank at least
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "adala", *overrides], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/top1" in r] == [2, 4]
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == [
        "best.safetensors", "model.safetensors", "step-2.safetensors", "step-4.safetensors"]
    assert read_export_metadata(run_dir / "export" / "best.safetensors")["step"] in (2, 4)
    assert json.loads((run_dir / "metrics.json").read_text())["val_images"] == 96
    assert "[rank 0] INFO" in done.stderr and "[rank 1] INFO" not in done.stderr
    assert "\r" not in done.stderr

"""Through the real engine: a Stage-3 run reading with 2 DataLoader workers, resumed from a mid-epoch
checkpoint, ends with exactly the weights of the uninterrupted run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adala.config import compose, override
from adala.models.weights import read_state_dict
from adala.run import run_stage


@pytest.mark.slow
def test_resume_with_workers_matches_the_uninterrupted_run(tmp_path: Path, demo_shards: dict[str, str], random_teacher: str) -> None:
    def run(run_dir: Path, *extra: str):
        return run_stage(compose([
            "stage=finetune_cls", override("run_dir", run_dir), override("model.weights", random_teacher),
            "data=demo", override("data.train", demo_shards["pretrain"]), "data.workers=2", "data.shuffle_buffer=64",
            "stage.batch_size=16", "train.max_steps=30", "train.save_every=13", "train.keep_last=3", "train.progress=false", *extra,
        ]))

    # 384 samples, 2 readers x 16: 24 batches an epoch. Step 13 is mid-epoch and the second worker's turn.
    reference = run(tmp_path / "reference")
    resumed = run(tmp_path / "resumed", override("resume", tmp_path / "reference" / "checkpoints" / "step-13"))
    assert resumed.steps == 30
    expected, actual = read_state_dict(reference.export), read_state_dict(resumed.export)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)

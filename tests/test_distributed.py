"""Several processes for real: torchrun with gloo on CPU, for every strategy; kills, signals and resumes."""
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

import distributed_run
from adala.config import compose, override
from adala.engine.checkpoint import COMPLETE_MARKER, read_manifest
from adala.models.weights import read_state_dict
from adala.run import run_stage

pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(Path(__file__).resolve().parent / "distributed_run.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def stage2(run_dir: Path, shards: dict[str, str], teacher: str, *extra: str) -> list[str]:
    return ["stage=align_features", override("run_dir", run_dir), override("model.weights", teacher),
            "data=demo", override("data.train", shards["pretrain"]), "train.log_every=1", "train.progress=false", *extra]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def assert_same_weights(actual: Path, expected: Path, atol: float) -> None:
    a, e = read_state_dict(actual), read_state_dict(expected)
    assert a.keys() == e.keys()
    for key in e:
        torch.testing.assert_close(a[key], e[key], rtol=0, atol=atol, msg=key)


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


STEPS = ("train.max_steps=4", "train.save_every=2")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, demo_shards: dict[str, str], random_teacher: str) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    distributed_run.main(stage2(run_dir, demo_shards, random_teacher, *STEPS))
    return run_dir


@pytest.mark.parametrize(
    "strategy",
    [("strategy=ddp",), ("strategy=fsdp",), ("strategy=fsdp", "strategy.teacher=shard"),
     ("strategy=deepspeed", "strategy.zero_stage=2"), ("strategy=deepspeed", "strategy.zero_stage=3")],
    ids=["ddp", "fsdp", "fsdp-sharded-teacher", "zero2", "zero3"],
)
def test_two_processes_match_one(
    strategy: tuple[str, ...], one_process: Path, tmp_path: Path, demo_shards: dict[str, str], random_teacher: str
) -> None:
    """Same global batch (8 = 1 × 8 = 2 × 4), same images: the losses agree to fp32 rounding. Tolerance 1e-5
    relative: the only difference is the order in which gradients are summed across ranks (~1e-7 per step),
    which Adam's normalised update can magnify a little over the steps."""
    run(torchrun(2, SCRIPT, *stage2(tmp_path, demo_shards, random_teacher, *STEPS, *strategy)))
    expected = losses(one_process)
    assert len(expected) == 4 and expected[-1] != expected[0]
    torch.testing.assert_close(torch.tensor(losses(tmp_path)), torch.tensor(expected), rtol=1e-5, atol=0)
    assert_same_weights(tmp_path / "export" / "model.safetensors", one_process / "export" / "model.safetensors", 1e-5)
    manifest = read_manifest(tmp_path / "checkpoints" / "step-4")
    assert manifest is not None and manifest["world_size"] == 2


def find_rank(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of a torchrun worker with ``RANK=rank`` (read from its environment)."""
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    raise LookupError(f"no worker with RANK={rank}")


def test_fsdp_kill_one_rank_then_resume_and_reshard_to_one_rank(
    tmp_path: Path, demo_shards: dict[str, str], random_teacher: str
) -> None:
    steps = ("strategy=fsdp", "stage.batch_size=4", "train.max_steps=30", "train.save_every=5")
    reference = tmp_path / "reference"
    run(torchrun(2, "-m", "adala", *stage2(reference, demo_shards, random_teacher, *steps)))

    killed = tmp_path / "killed"
    launcher = subprocess.Popen(torchrun(2, "-m", "adala", *stage2(killed, demo_shards, random_teacher, *steps)),
                                cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (killed / "checkpoints" / "step-10" / COMPLETE_MARKER).exists(), launcher, "step 10 was saved")
    os.kill(find_rank(launcher, 1), signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    assert not (killed / "export").exists(), "the run finished before the kill; the test proves nothing"

    run(torchrun(2, "-m", "adala", *stage2(killed, demo_shards, random_teacher, *steps, "resume=auto")))
    assert_same_weights(killed / "export" / "model.safetensors", reference / "export" / "model.safetensors", 1e-6)
    assert logged_steps(killed) == list(range(1, 31))

    # The 2-rank checkpoint, resharded onto one process: the weights it restores are exactly the 2-rank run's.
    one_rank = tmp_path / "one-rank"
    cfg = compose(stage2(one_rank, demo_shards, random_teacher, *steps,
                         override("resume", reference / "checkpoints" / "step-30")))
    assert run_stage(cfg).steps == 30
    assert_same_weights(one_rank / "export" / "model.safetensors", reference / "export" / "model.safetensors", 0)
    cfg = compose(stage2(one_rank, demo_shards, random_teacher, *steps[:2], "train.max_steps=32",
                         override("resume", reference / "checkpoints" / "step-30")))
    assert run_stage(cfg).steps == 32
    assert logged_steps(one_rank) == [31, 32]


def test_sigterm_saves_then_resume_matches_uninterrupted_zero3(
    tmp_path: Path, demo_shards: dict[str, str], random_teacher: str
) -> None:
    steps = ("strategy=deepspeed", "strategy.zero_stage=3", "stage.batch_size=4", "train.max_steps=25",
             "train.save_every=1000")
    reference = tmp_path / "reference"
    run(torchrun(2, "-m", "adala", *stage2(reference, demo_shards, random_teacher, *steps)))

    stopped = tmp_path / "stopped"
    launcher = subprocess.Popen(torchrun(2, "-m", "adala", *stage2(stopped, demo_shards, random_teacher, *steps)),
                                cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = stopped / "log.jsonl"
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, launcher, "step 3")
    launcher.send_signal(signal.SIGTERM)  # torchrun forwards it to every worker, as SLURM does to a job step
    launcher.wait(timeout=120)
    saved = sorted((stopped / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and read_manifest(saved[0]) is not None, launcher.stderr.read()[-3000:]
    assert 3 <= int(saved[0].name.split("-")[1]) < 25
    assert not (stopped / "export").exists()

    run(torchrun(2, "-m", "adala", *stage2(stopped, demo_shards, random_teacher, *steps, "resume=auto")))
    assert logged_steps(stopped) == list(range(1, 26))
    assert_same_weights(stopped / "export" / "model.safetensors", reference / "export" / "model.safetensors", 1e-6)


def test_deepspeed_checkpoint_on_other_world_size_is_refused_up_front(tmp_path: Path, demo_shards: dict[str, str],
                                                                      random_teacher: str) -> None:
    steps = ("strategy=deepspeed", "stage.batch_size=4", "train.max_steps=2", "train.save_every=2")
    run(torchrun(2, "-m", "adala", *stage2(tmp_path, demo_shards, random_teacher, *steps)))
    done = subprocess.run([sys.executable, "-m", "adala", *stage2(tmp_path, demo_shards, random_teacher, *steps,
                                                                   "train.max_steps=4", "resume=auto")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "DeepSpeed checkpoint from 2 ranks and this run has 1" in done.stderr
    assert "ds_to_universal" in done.stderr


def test_evaluation_over_two_ranks_counts_every_sample_once(tmp_path: Path, random_teacher: str) -> None:
    """Stage 3 on 2 FSDP ranks, then the same export evaluated in one process: the same top-1 over the same
    number of images (96 validation images in 3 shards, batches of 5, so the ranks' shares are uneven)."""
    from adala.data.demo_data import ensure_demo_shards

    demo_shards = ensure_demo_shards(tmp_path / "shards", {"finetune": 128, "val": 96}, per_shard=32)
    common = ["stage=finetune_cls", "data=demo", override("data.train", demo_shards["finetune"]), override("data.val", demo_shards["val"]),
              "data.num_classes=12", "stage.batch_size=5", "train.progress=false", "train.save_every=1000"]
    two = tmp_path / "two"
    run(torchrun(2, "-m", "adala", *common, "strategy=fsdp", override("run_dir", two),
                 override("stage.init", random_teacher), "train.max_steps=3"))
    metrics = json.loads((two / "metrics.json").read_text())
    one = run_stage(compose([*common, override("run_dir", tmp_path / "one"), override("stage.init", two / "export" / "model.safetensors"),
                             "train.max_steps=1", "stage.optim.lr=0"]))  # lr 0: evaluates the 2-rank weights unchanged
    assert metrics["val_images"] == one.metrics["val_images"] == 96
    assert metrics["top1"] == pytest.approx(one.metrics["top1"], abs=1e-9)

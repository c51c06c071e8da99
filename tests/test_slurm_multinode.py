"""``sbatch --nodes=2 slurm/stage2.sh`` on a real two-node SLURM cluster (``scripts/local_slurm.sh up --nodes 2``):
one torchrun per node with a c10d rendezvous at the first node's address, FSDP over both nodes, requeued by the
operator and by the time-limit warning; its checkpoint resumed on one node; a DeepSpeed checkpoint refused there.

The ranks run ``tests/distributed_run.py`` (``ADALA_ENTRY``): every step's global batch is the same whatever the
number of ranks, so the two-node run must end with the weights of one process training on the whole batch."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import distributed_run
from adala.engine.checkpoint import latest_checkpoint, read_manifest
from adala.launch.slurm import job_state
from test_distributed import assert_same_weights, logged_steps, stage2
from tests.slurm_cluster import REPO, job_env, require_cluster, wait_done, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.multiprocess]

ONE_RANK_PER_NODE = ["--gpus-per-node=1", "--cpus-per-gpu=1", "--mem=2G"]  # stand-in GPUs; ranks run on CPU
STEPS, MORE = 60, 4
TRAIN = ["strategy=fsdp", f"train.max_steps={STEPS}", "train.save_every=10"]


@pytest.fixture(scope="module")
def two_nodes() -> None:
    require_cluster(nodes=2)


def sbatch(out_dir: Path, nodes: str, overrides: list[str], *, entry: bool = True) -> str:
    """The README's ``sbatch --nodes=2 --gpus-per-node=1 --cpus-per-gpu=1 --mem=2G slurm/stage2.sh ...``."""
    env = {**job_env(), **({"ADALA_ENTRY": str(Path(distributed_run.__file__))} if entry else {})}
    done = subprocess.run(
        ["sbatch", "--parsable", nodes, *ONE_RANK_PER_NODE, f"--output={out_dir}/slurm-%j.out",
         str(REPO / "slurm/stage2.sh"), *overrides],
        env=env, cwd=out_dir, capture_output=True, text=True, check=True,
    )
    return done.stdout.strip().split(";")[0]


def job_log(out_dir: Path, job: str) -> str:
    return (out_dir / f"slurm-{job}.out").read_text()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, demo_shards: dict[str, str], random_teacher: str) -> Path:
    """The reference: one process, the whole global batch every step."""
    run_dir = tmp_path_factory.mktemp("one-process")
    distributed_run.main(stage2(run_dir, demo_shards, random_teacher, *TRAIN))
    return run_dir


@pytest.fixture(scope="module")
def two_node_run(two_nodes, tmp_path_factory: pytest.TempPathFactory, demo_shards: dict[str, str],
                 random_teacher: str) -> tuple[Path, str, str]:
    """A two-node Stage-2 job, requeued by the operator once and by the time-limit warning once; its run
    directory, job id and SLURM log."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    run_dir, checkpoints = tmp / "run", tmp / "run" / "checkpoints"
    job = sbatch(tmp, "--nodes=2", stage2(run_dir, demo_shards, random_teacher, *TRAIN))

    # 1. `scontrol requeue`: SLURM sends SIGTERM to the steps on both nodes, the ranks save, the job runs again.
    wait_for(lambda: (checkpoints / "step-10" / "COMPLETE").is_file(), 300, "the first checkpoint")
    nodes = job_state(job).get("NodeList")
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for(lambda: job_state(job).get("Restarts") == "1" and job_state(job).get("JobState") == "RUNNING", 300,
             "the job to run again after the requeue")
    first_stop = latest_checkpoint(checkpoints)
    assert first_stop is not None

    # 2. The time-limit warning, as `#SBATCH --signal=B:USR2@...` delivers it: to the batch shell on the first node,
    # once the resumed ranks train again.
    resumed_at = int(first_stop.name.split("-")[1])
    wait_for(lambda: logged_steps(run_dir)[-1] > resumed_at, 300, "a step after the resume")
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True)
    info = wait_done(job, timeout=400)
    log = job_log(tmp, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", log[-3000:]
    assert nodes == "node[0-1]" and info["NumNodes"] == "2", info
    return run_dir, job, log


def test_two_nodes_requeued_twice_end_with_the_weights_of_one_process(two_node_run, one_process: Path) -> None:
    """Same global batch (8 = 1 × 8 = 2 nodes × 4); tolerance as for 2 ranks on one node (test_distributed)."""
    run_dir, job, log = two_node_run
    assert log.count(f"job {job} (restart") == 3 and "on 2 node(s) x 1 process(es), rendezvous at 127.0.0.1:" in log
    assert "time limit close" in log
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # every step once, over three starts
    manifest = read_manifest(run_dir / "checkpoints" / f"step-{STEPS}")
    assert manifest is not None and manifest["world_size"] == 2
    assert_same_weights(run_dir / "export" / "model.safetensors", one_process / "export" / "model.safetensors", 1e-5)


def test_the_two_node_checkpoint_resumes_on_one_node(two_node_run, one_process: Path, demo_shards: dict[str, str],
                                                      random_teacher: str, tmp_path: Path) -> None:
    """``sbatch --nodes=1`` with the same run directory continues the two-node run (DCP reshards) exactly as the
    one process continues its own."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_node_run[0], run_dir)
    more = [*TRAIN, f"train.max_steps={STEPS + MORE}"]
    job = sbatch(tmp_path, "--nodes=1", stage2(run_dir, demo_shards, random_teacher, *more))
    info = wait_done(job, timeout=300)
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "1", job_log(tmp_path, job)[-3000:]
    assert logged_steps(run_dir) == list(range(1, STEPS + MORE + 1))

    reference = tmp_path / "one-process"
    shutil.copytree(one_process, reference)
    distributed_run.main(stage2(reference, demo_shards, random_teacher, *more, "resume=auto"))
    assert logged_steps(reference)[-MORE:] == list(range(STEPS + 1, STEPS + MORE + 1))
    assert_same_weights(run_dir / "export" / "model.safetensors", reference / "export" / "model.safetensors", 1e-5)


def test_a_two_node_deepspeed_checkpoint_is_refused_on_one_node(two_nodes, demo_shards: dict[str, str],
                                                                random_teacher: str, tmp_path: Path) -> None:
    """``python -m adala`` on both nodes with DeepSpeed; the one-node job then stops before any rank starts."""
    run_dir = tmp_path / "run"
    steps = ["strategy=deepspeed", "stage.batch_size=4", "train.max_steps=2", "train.save_every=2"]
    job = sbatch(tmp_path, "--nodes=2", stage2(run_dir, demo_shards, random_teacher, *steps), entry=False)
    info = wait_done(job, timeout=300)
    assert info["JobState"] == "COMPLETED", job_log(tmp_path, job)[-3000:]
    assert read_manifest(run_dir / "checkpoints" / "step-2")["world_size"] == 2

    job = sbatch(tmp_path, "--nodes=1", stage2(run_dir, demo_shards, random_teacher, *steps[:3], "train.max_steps=4"),
                 entry=False)
    info = wait_done(job, timeout=120)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:") and info["Restarts"] == "0", log
    assert "DeepSpeed checkpoint from 2 ranks and this run has 1" in log and "ds_to_universal" in log
    assert "torch.distributed.run" not in log

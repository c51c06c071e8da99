"""``sbatch slurm/stage2.sh`` on a real one-node SLURM cluster: a complete run, a requeue by the operator and a
requeue by the time-limit warning, each ending with the weights of an uninterrupted run."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from adala.engine.checkpoint import latest_checkpoint
from adala.models.weights import read_state_dict
from adala.launch.slurm import job_state
from tests.slurm_cluster import REPO, job_env, require_cluster, wait_done, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

RESOURCES = ["--gpus-per-node=2", "--cpus-per-gpu=1", "--mem=4G"]  # the local cluster's stand-in GPUs; ranks run on CPU
STEPS = 60


@pytest.fixture(scope="module")
def cluster() -> None:
    require_cluster()


def stage2_overrides(demo_shards: dict[str, str], teacher: str, run_dir: Path) -> list[str]:
    return [
        "model=demo_tiny", f"model.weights={teacher}", "data=demo", f'data.train="{demo_shards["pretrain"]}"',
        f"train.max_steps={STEPS}", "train.save_every=10", "stage.batch_size=8", "strategy=fsdp",
        f"run_dir={run_dir}", "train.progress=false",
    ]


def sbatch(tmp_path: Path, overrides: list[str], *options: str) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", *RESOURCES, f"--output={tmp_path}/slurm-%j.out", *options,
         str(REPO / "slurm" / "stage2.sh"), *overrides],
        env=job_env(), cwd=tmp_path, capture_output=True, text=True, check=True,
    )
    return out.stdout.strip().split(";")[0]


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(cluster, demo_shards, random_teacher, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sbatch")
    run_dir = tmp / "run"
    job = sbatch(tmp, stage2_overrides(demo_shards, random_teacher, run_dir))
    info = wait_done(job, timeout=300)
    assert info["JobState"] == "COMPLETED", (tmp / f"slurm-{job}.out").read_text()[-3000:]
    return run_dir


def test_sbatch_stage2_leaves_a_complete_checkpoint_and_an_export(uninterrupted: Path) -> None:
    last = latest_checkpoint(uninterrupted / "checkpoints")
    assert last is not None and last.name == f"step-{STEPS}" and (last / "COMPLETE").is_file()
    export = read_state_dict(uninterrupted / "export" / "model.safetensors")
    assert export and all(torch.isfinite(v).all() for v in export.values())
    assert logged_steps(uninterrupted)[-1] == STEPS


def test_requeue_and_time_limit_warning_resume_to_the_same_weights(uninterrupted, demo_shards, random_teacher,
                                                                    tmp_path) -> None:
    run_dir = tmp_path / "run"
    job = sbatch(tmp_path, stage2_overrides(demo_shards, random_teacher, run_dir))
    checkpoints = run_dir / "checkpoints"

    # 1. The operator requeues the running job: SLURM sends SIGTERM, the ranks save, the job starts again.
    wait_for(lambda: (checkpoints / "step-10" / "COMPLETE").is_file(), 300, "the first checkpoint")
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for(lambda: job_state(job).get("Restarts") == "1" and job_state(job).get("JobState") == "RUNNING", 300,
             "the job to run again after the requeue")
    first_stop = latest_checkpoint(checkpoints)
    assert first_stop is not None

    # 2. The time-limit warning, delivered as `#SBATCH --signal=B:USR2@...` delivers it: to the batch shell only.
    wait_for(lambda: (latest := latest_checkpoint(checkpoints)) is not None and latest != first_stop, 300,
             "a checkpoint after the resume")
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True)
    info = wait_done(job, timeout=400)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", log[-3000:]
    assert "time limit close" in log and log.count("resumed from") >= 2  # rank 0 logs both resumes (other ranks log warnings only)

    assert logged_steps(run_dir) == logged_steps(uninterrupted)  # every step once
    final = read_state_dict(run_dir / "export" / "model.safetensors")
    reference = read_state_dict(uninterrupted / "export" / "model.safetensors")
    assert final.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], atol=1e-6, rtol=0, msg=key)


def test_bad_override_fails_the_job_at_once_without_requeue(cluster, tmp_path) -> None:
    job = sbatch(tmp_path, ["model=demo_tiny", "train.nope=1"])
    info = wait_done(job, timeout=120)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:") and info["Restarts"] == "0"
    assert "adala: error:" in log and "train.nope" in log and "torch.distributed.run" not in log


def test_more_gpus_than_the_partition_has_is_refused_at_submission(cluster, tmp_path) -> None:
    out = subprocess.run(["sbatch", "--gpus-per-node=64", str(REPO / "slurm" / "stage2.sh")], env=job_env(),
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0 and "not available" in out.stderr


def test_submitit_job_saves_and_requeues_through_checkpoint(uninterrupted, demo_shards, random_teacher,
                                                            tmp_path) -> None:
    """The signal submitit asks SLURM for (``--signal=USR2@...``, to every task): the ranks save, submitit calls
    ``StageJob.checkpoint()`` and requeues, and the requeued job ends with the uninterrupted run's weights."""
    import submitit

    from adala.launch.submitit_job import StageJob

    run_dir = tmp_path / "run"
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(nodes=1, tasks_per_node=2, gpus_per_node=2, cpus_per_task=1, mem_gb=4, timeout_min=30,
                               slurm_additional_parameters={"requeue": True})
    with pytest.MonkeyPatch.context() as env:
        for key, value in job_env().items():
            env.setenv(key, value)
        job = executor.submit(StageJob(stage2_overrides(demo_shards, random_teacher, run_dir)
                                       + ["stage=align_features", "resume=auto"]))
    wait_for(lambda: (run_dir / "checkpoints" / "step-10" / "COMPLETE").is_file(), 300, "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    result = job.results()[0]  # rank 0's; waits, and raises if the job failed
    info = wait_done(job.job_id, timeout=120)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1"
    assert "resumed from" in Path(job.paths.stderr).read_text()
    assert Path(result["export"]) == run_dir / "export" / "model.safetensors" and result["steps"] == STEPS
    assert logged_steps(run_dir) == logged_steps(uninterrupted)
    final = read_state_dict(run_dir / "export" / "model.safetensors")
    reference = read_state_dict(uninterrupted / "export" / "model.safetensors")
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], atol=1e-6, rtol=0, msg=key)

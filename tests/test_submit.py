"""``launchers/submit.py`` on a real SLURM cluster: the demo pipeline with its Stage-3 fan-out, every job on two
nodes, the job dependencies as SLURM shows them, the status command, and bad input refused before anything is
submitted."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adala.launch.slurm import job_state
from tests.slurm_cluster import REPO, job_env, require_cluster, wait_done

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SUBMIT = str(REPO / "launchers" / "submit.py")
RESOURCES = ["--gpus-per-node", "2", "--cpus-per-task", "1", "--mem-gb", "4"]
TWO_NODES = ["--nodes", "2", "--gpus-per-node", "1", "--cpus-per-task", "1", "--mem-gb", "2"]  # one rank per node
TINY_DEMO = [
    "demo.pretrain_samples=256", "demo.finetune_samples=128", "demo.val_samples=64", "demo.samples_per_shard=16",
    "demo.teacher_steps=20", "demo.align_attention_steps=10", "demo.align_features_steps=10",
    "demo.finetune_steps=10", "demo.align_batch_size=8", "demo.finetune_batch_size=8", "demo.teacher_batch_size=8",
    "train.progress=false",
]


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    require_cluster()


def submit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**job_env(), "ADALA_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, SUBMIT, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


def queued() -> set[str]:
    return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split())


def test_demo_pipeline_on_two_nodes_fans_out_stage3_after_stage2(tmp_path) -> None:
    require_cluster(nodes=2)
    root = tmp_path / "pipeline"
    out = submit(tmp_path, "--demo", "--models", "demo_tiny", "--root", str(root), *TWO_NODES, *TINY_DEMO)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((root / "pipeline.json").read_text())
    assert record["resources"].startswith("2 node(s) x 1 rank(s)")
    jobs = {job["name"]: job for job in record["jobs"]}
    assert list(jobs) == ["demo_tiny/teacher", "demo_tiny/s1", "demo_tiny/s2", "demo_tiny/cls", "demo_tiny/seg"]
    ids = {name: job["id"] for name, job in jobs.items()}

    # While it runs, SLURM itself shows the graph: Stage 1 after the teacher, Stage 2 after Stage 1, both
    # Stage-3 tasks after Stage 2.
    expected = {"demo_tiny/s1": "demo_tiny/teacher", "demo_tiny/s2": "demo_tiny/s1",
                "demo_tiny/cls": "demo_tiny/s2", "demo_tiny/seg": "demo_tiny/s2"}
    for name, parent in expected.items():
        info = job_state(ids[name])
        assert info["JobState"] == "PENDING" and re.fullmatch(rf"afterok:{ids[parent]}(\(\w+\))?", info["Dependency"]), info
    status = submit(tmp_path, "status", "--root", str(root))
    assert status.returncode == 0 and "PENDING (Dependency)" in status.stdout

    for name in jobs:
        info = wait_done(ids[name], timeout=400)
        assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "2", (name, info)
    for task, metric in (("cls", "top1"), ("seg", "miou")):
        run_dir = Path(jobs[f"demo_tiny/{task}"]["run_dir"])
        assert (run_dir / "export" / "model.safetensors").is_file()
        assert 0.0 <= json.loads((run_dir / "metrics.json").read_text())[metric] <= 1.0
        config = (run_dir / "config.yaml").read_text()
        assert str(Path(jobs["demo_tiny/s2"]["run_dir"]) / "export" / "model.safetensors") in config  # its stage.init
    status = submit(tmp_path, "status", "--root", str(root))
    rows = [line for line in status.stdout.splitlines() if line.startswith("demo_tiny/")]
    assert len(rows) == 5 and all("COMPLETED" in row and row.rstrip().endswith("yes") for row in rows), status.stdout
    assert "step-10" in next(row for row in rows if row.startswith("demo_tiny/s2"))


def test_dry_run_prints_the_graph_and_submits_nothing(tmp_path) -> None:
    before = queued()
    out = submit(tmp_path, "--demo", "--dry-run", "--root", str(tmp_path / "p"), "--tasks", "seg", *RESOURCES,
                 *TINY_DEMO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "nothing submitted" in lines[0] and "1 node(s) x 2 rank(s)" in lines[0]
    assert any(line.startswith("demo_small/seg") and "demo_small/s2" in line and "s3_seg" in line for line in lines)
    assert queued() == before and not (tmp_path / "p" / "pipeline.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--models", "dinov3_xxl"], "unknown model 'dinov3_xxl'"),
    (["--demo", "--nodes", "4"], "4 nodes requested, but partition"),
    (["--demo", "--gpus-per-node", "16"], "16 GPUs per node requested"),
    (["--demo", "s2:train.nope=1"], "train.nope"),
    (["--demo", "cls:data.val=/nowhere/val.tar"], "/nowhere/val.tar"),
    (["--models", "dinov2_l"], "model.weights"),
])
def test_bad_input_is_refused_before_anything_is_submitted(tmp_path, args, message) -> None:
    before = queued()
    out = submit(tmp_path, *RESOURCES, *args, *TINY_DEMO, "--root", str(tmp_path / "p"))
    assert out.returncode == 2
    assert out.stderr.startswith("submit: error:") and message in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert queued() == before and not (tmp_path / "p").exists()

"""launchers/ray_sweep.py on a real Ray cluster of two nodes on this machine: two demo VFMs with FSDP on 2 workers
each, every run's workers spread over both nodes, a killed worker on the second node resumed from its checkpoint,
the results table; and bad input refused before anything starts."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest
import yaml


REPO = Path(__file__).resolve().parent.parent
SWEEP = str(REPO / "launchers" / "ray_sweep.py")
RAY = str(Path(sys.executable).with_name("ray"))
TEACHER_STEPS = 24
TINY = [
    "demo.pretrain_samples=256", "demo.finetune_samples=128", "demo.val_samples=64", "demo.samples_per_shard=16",
    f"demo.teacher_steps={TEACHER_STEPS}", "demo.align_attention_steps=10", "demo.align_features_steps=10",
    "demo.finetune_steps=10", "demo.align_batch_size=8", "demo.finetune_batch_size=8", "demo.teacher_batch_size=8",
    "teacher:train.save_every=4", "train.log_every=1", "train.progress=false",
]
NODE_CPUS = 2
CLUSTER_CPUS = 2 * NODE_CPUS


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One thread per process, this checkout on the path, a demo cache of its own; for the private test cluster no
    Ray token, no preemption watcher (one process less per run; nothing preempts here) and a short drain at stop."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "ADALA_CACHE": str(tmp_path_factory.mktemp("cache")), "RAY_AUTH_MODE": "disabled",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Iterator[str]:
    """A Ray cluster of two nodes with 2 CPUs each: a head and a second node joined with ``ray start --address``,
    each started by ``ray start --block`` and stopped through that process (it drains the node and stops what it
    started): only this cluster, whatever else runs on the machine."""
    port = free_port()
    logs = tmp_path_factory.mktemp("ray_start")
    nodes: list[subprocess.Popen] = []
    try:
        for role in (["--head", f"--port={port}", f"--ray-client-server-port={free_port()}",
                      "--include-dashboard=false", f"--temp-dir={tmp_path_factory.mktemp('ray')}"],
                     [f"--address=127.0.0.1:{port}"]):
            log = logs / f"node{len(nodes)}.log"
            with log.open("w") as out:
                nodes.append(subprocess.Popen(
                    [RAY, "start", "--block", *role, f"--num-cpus={NODE_CPUS}", "--num-gpus=0",
                     f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"],
                    stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True))
            wait_for(lambda: "Ray runtime started" in log.read_text(), nodes[-1], "a Ray node to start", timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        for node in reversed(nodes):
            stop_group(node)


@pytest.fixture
def ray_state(cluster: str, env: dict[str, str]) -> Iterator[Callable[[], tuple[dict[str, bool], list[dict]]]]:
    """Reads the cluster's state from its GCS, as this test's own Ray driver: the alive nodes (node id -> is the
    head) and the alive Ray Train workers (pid, node id, and the address of the actor that created them, one per
    run)."""
    import ray
    from ray._private.state import actors

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", env["RAY_AUTH_MODE"])
        ray.init(address=cluster, logging_level="ERROR", log_to_driver=False)

    def read() -> tuple[dict[str, bool], list[dict]]:
        nodes = {n["NodeID"]: "node:__internal_head__" in n["Resources"] for n in ray.nodes() if n["Alive"]}
        workers = [{"pid": a["Pid"], "node": a["Address"]["NodeID"],
                    "owner": (a["OwnerAddress"]["IPAddress"], a["OwnerAddress"]["Port"])}
                   for a in actors().values() if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]
        return nodes, workers

    try:
        yield read
    finally:
        ray.shutdown()


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to ``process``, then SIGKILL to whatever is left in the process group it leads."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the process ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def sweep_command(root: Path, *args: str) -> list[str]:
    return [sys.executable, SWEEP, "--root", str(root), *args]


def rank0_worker(run_dir: Path) -> psutil.Process:
    """The Ray Train worker process that writes ``run_dir``'s log (rank 0 of that run)."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(process.info["cmdline"] or ()) and any(
                    f.path.startswith(str(run_dir)) for f in process.open_files()):
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no RayTrainWorker process has a file of {run_dir} open")


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.ray
@pytest.mark.slow
def test_demo_sweep_spreads_over_two_nodes_resumes_a_killed_worker_and_writes_results(
        cluster: str, ray_state, env: dict[str, str], tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with stdout.open("w") as out, stderr.open("w") as err:
        sweep = subprocess.Popen(sweep_command(root, "--demo", "--address", cluster, "--workers", "2",
                                               "--placement", "SPREAD", "--strategy", "fsdp", "--max-failures", "2",
                                               *TINY),
                                 cwd=REPO, env=env, stdout=out, stderr=err)
    try:
        teacher = root / "demo_tiny" / "teacher"
        wait_for(lambda: (teacher / "log.jsonl").is_file(), sweep, "the teacher's first step")
        # From Ray's state: the teacher run's workers (those created by the actor that created its rank 0) are on
        # both nodes; the one on the second node is killed once the first checkpoint is written.
        nodes, workers = ray_state()
        rank0 = next(w for w in workers if w["pid"] == rank0_worker(teacher).pid)
        run_workers = [w for w in workers if w["owner"] == rank0["owner"]]
        assert len(nodes) == 2 and {w["node"] for w in run_workers} == set(nodes), (nodes, run_workers)
        second = next(w for w in run_workers if not nodes[w["node"]])
        wait_for(lambda: any((teacher / "checkpoints").glob("step-*")), sweep, "the teacher's first checkpoint")
        os.kill(second["pid"], signal.SIGKILL)  # no chance to save or clean up
        assert sweep.wait(timeout=900) == 0, stderr.read_text()[-4000:]
    finally:
        if sweep.poll() is None:
            sweep.kill()
    log, output = stderr.read_text(), stdout.read_text()

    # Ray Train restarted the worker group, and the stage continued from its last complete checkpoint.
    resumed = re.findall(rf"resumed from {re.escape(str(teacher))}/checkpoints/step-(\d+) at step (\d+)", log)
    assert resumed and all(0 < int(step) < TEACHER_STEPS for _, step in resumed), log[-4000:]
    assert logged_steps(teacher) == list(range(1, TEACHER_STEPS + 1))  # every step exactly once
    assert (teacher / "export" / "model.safetensors").is_file()

    # The two models ran side by side, and each used 2 FSDP workers.
    assert output.index("demo_small/teacher: started") < output.index("demo_tiny/teacher: completed")
    assert "2 workers per run (CPU, SPREAD), strategy=fsdp, 2 node(s)" in output
    for model in ("demo_tiny", "demo_small"):
        config = yaml.safe_load((root / model / "s2_align_features" / "config.yaml").read_text())
        assert config["strategy"]["name"] == "fsdp"

    results = json.loads((root / "results.json").read_text())["models"]
    assert [r["model"] for r in results] == ["demo_tiny", "demo_small"]
    for row in results:
        assert row["status"] == "completed"
        assert set(row["losses"]) == {"teacher", "s1", "s2", "cls", "seg"}
        assert all(math.isfinite(loss) for loss in row["losses"].values()), row
        assert 0.0 <= row["metrics"]["cls"]["top1"] <= 1.0 and 0.0 <= row["metrics"]["seg"]["miou"] <= 1.0
    table = (root / "results.md").read_text()
    assert table in output and f"results written to {root / 'results.md'}" in output
    assert re.search(r"^\| `demo_tiny` \|.*\| completed \|$", table, re.M)
    assert re.search(r"^\| `demo_small` \|.*\| completed \|$", table, re.M)


@pytest.mark.ray
@pytest.mark.slow
def test_attention_comparison_runs_on_the_cluster_and_writes_its_report(cluster: str, env: dict[str, str],
                                                                        tmp_path: Path) -> None:
    """``--attentions``: the softmax reference and each plug's jobs as Ray Train runs with FSDP on 2 workers, each
    in the run directory of its attention, then the results with their attention column and the comparison's
    Table-1-shaped report, written by the sweep itself."""
    root = tmp_path / "compare"
    done = subprocess.run(sweep_command(root, "--demo", "--models", "demo_tiny", "--attentions", "elu1", "--tasks",
                                        "cls", "--address", cluster, "--workers", "2", "--strategy", "fsdp", *TINY),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((root / "results.json").read_text())["models"]
    assert [(r["attention"], r["status"]) for r in results] == [("softmax", "completed"), ("elu1", "completed")]
    for step in ("s1_align_attention", "s2_align_features", "s3_cls", "s3_baseline_cls"):
        config = yaml.safe_load((root / "elu1" / "demo_tiny" / step / "config.yaml").read_text())
        assert config["strategy"]["name"] == "fsdp" and config["attention"]["kind"] == "linear", step
    summary = json.loads((root / "compare.json").read_text())
    assert [(r["attention"], r["variant"]) for r in summary["rows"]] == [
        ("softmax", "teacher"), ("elu1", "adala"), ("elu1", "baseline")]
    assert all(0 <= r["top1"] <= 1 for r in summary["rows"])
    assert set(summary["block_errors"]) == {"elu1 AdaLA S1+S2", "elu1 linearized"}
    assert (root / "per_block_error.png").is_file() and (root / "compare.md").read_text() in done.stdout


def refused(command: list[str], env: dict[str, str]) -> str:
    """Run a sweep that must stop on bad input: exit code 2 and one line on stderr, which is returned."""
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("ray_sweep:")]
    assert len(lines) == 1 and lines[0].startswith("ray_sweep: error: "), done.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_unknown_vfm_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    line = refused(sweep_command(tmp_path / "sweep", "--models", "dinov2_l", "dinov3_xl"), env)
    assert "unknown model 'dinov3_xl'" in line
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_missing_data_is_refused_before_any_job(env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "train-{000..003}.tar"
    line = refused(sweep_command(tmp_path / "sweep", "--demo", *TINY, f's1:data.train="{missing}"'), env)
    assert "demo_tiny/s1:" in line and str(tmp_path / "nowhere" / "train-000.tar") in line and "not found" in line
    assert not (tmp_path / "sweep").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_more_workers_than_the_cluster_has_is_refused(cluster: str, env: dict[str, str], tmp_path: Path) -> None:
    line = refused(sweep_command(tmp_path / "sweep", "--demo", "--address", cluster, "--workers", "8", *TINY), env)
    assert f"8 workers need 8 CPU (1 each) but the Ray cluster has {CLUSTER_CPUS}" in line
    assert not (tmp_path / "sweep").exists()


def test_no_arguments_print_a_hint(env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, SWEEP], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--demo" in done.stderr and "dinov2_l:model.weights=PATH" in done.stderr


@pytest.mark.slow
def test_missing_weights_name_every_model(env: dict[str, str], tmp_path: Path) -> None:
    line = refused(sweep_command(tmp_path / "sweep", "--models", "dinov2_l", "clip_l"), env)
    assert "no pretrained weights for dinov2_l, clip_l" in line and "MODEL:model.weights=PATH" in line


def test_a_failed_model_skips_its_later_jobs_and_the_others_go_on(tmp_path: Path) -> None:
    """The sweep's bookkeeping with a plain runner in place of Ray Train: one model's Stage 2 fails."""
    from adala.launch.pipeline import plan
    from adala.launch.ray_train import run_models
    from adala.launch.results import collect, write_results

    jobs = plan(["demo_tiny", "demo_small"], tmp_path, tasks=["in1k", "ade20k"])

    def runner(job) -> None:  # writes what a stage run writes
        if job.name == "demo_tiny/s2":
            raise RuntimeError("Invalid learning rate: nan")
        job.run_dir.mkdir(parents=True)
        records = (json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in (1, 2, 4))
        (job.run_dir / "log.jsonl").write_text("".join(records))
        if job.step in ("in1k", "ade20k"):
            metric = "top1" if job.step == "in1k" else "miou"
            (job.run_dir / "metrics.json").write_text(json.dumps({"step": 4, metric: 0.5}))

    reports: list[str] = []
    outcomes = run_models(jobs, runner, parallel=2, report=reports.append)
    assert [j.status for j in outcomes["demo_tiny"].jobs] == ["completed", "failed", "skipped", "skipped"]
    assert outcomes["demo_tiny"].status == "failed: demo_tiny/s2: RuntimeError: Invalid learning rate: nan"
    assert outcomes["demo_small"].status == "completed"
    assert "demo_tiny/in1k: skipped: needs demo_tiny/s2, which did not complete" in reports

    results = collect(jobs, {model: outcome.status for model, outcome in outcomes.items()})
    table, data = write_results(tmp_path, results)
    rows = {r["model"]: r for r in json.loads(data.read_text())["models"]}
    assert rows["demo_small"]["losses"] == {"s1": 0.25, "s2": 0.25, "in1k": 0.25, "ade20k": 0.25}
    assert rows["demo_small"]["metrics"] == {"in1k": {"top1": 0.5}, "ade20k": {"miou": 0.5}}
    assert rows["demo_tiny"]["losses"] == {"s1": 0.25, "s2": None, "in1k": None, "ade20k": None}
    assert rows["demo_tiny"]["metrics"] == {"in1k": {"top1": None}, "ade20k": {"miou": None}}
    lines = table.read_text().splitlines()
    assert lines[0] == "| VFM | s1 loss | s2 loss | in1k loss | ade20k loss | in1k top-1 | ade20k mIoU | status |"
    assert lines[2] == ("| `demo_tiny` | 0.25 | – | – | – | – | – | "
                        "failed: demo_tiny/s2: RuntimeError: Invalid learning rate: nan |")
    assert lines[3] == "| `demo_small` | 0.25 | 0.25 | 0.25 | 0.25 | 50.0% | 50.0% | completed |"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["results.json", "results.md"]  # no temporaries

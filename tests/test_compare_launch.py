"""The attention comparison through the cluster launchers (``--attentions``): its plan as the launchers' jobs, their
names and run directories, bad input, the sweep's bookkeeping across the comparison's pipelines and the report's
refusal of unfinished runs. The real tiny run (submitit's local executor) is the README's, in tests/test_docs.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adala.__main__ import main as cli
from adala.config import override
from adala.errors import UserError
from adala.launch import ray_sweep, submit
from adala.launch.comparison import comparison_jobs, plan_launch, read_record, write_record
from adala.launch.pipeline import Job
from adala.launch.ray_train import run_models
from adala.launch.results import collect, write_results

TINY = ["demo.pretrain_samples=128", "demo.finetune_samples=64", "demo.val_samples=32", "demo.samples_per_shard=64"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's shards, written once for the module."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def jobs(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Job]:
    """The demo comparison of two plugs as a launcher plans it: the teacher, the reference and each plug's jobs,
    under a root of the test's own."""
    root = tmp_path_factory.mktemp("runs")
    return comparison_jobs(plan_launch(["demo_tiny"], ["elu1", "hedgehog"], root, tasks=None,
                                       overrides=[*TINY, f"demo.cache_dir={cache}"], demo=True))


def test_every_job_is_named_and_placed_by_its_attention(jobs: list[Job]) -> None:
    names = [job.name for job in jobs]
    assert len(set(names)) == len(names) and len({job.run_dir for job in jobs}) == len(jobs)
    assert names[:3] == ["demo_tiny/softmax/teacher", "demo_tiny/softmax/teacher_cls", "demo_tiny/softmax/teacher_seg"]
    root = jobs[0].run_dir.parents[2]
    for job in jobs:
        assert job.name == f"demo_tiny/{job.attention}/{job.step}"
        assert job.run_dir.is_relative_to(root / job.attention / "demo_tiny")
        if job.attention != "softmax":
            assert f"attention={job.attention}" in job.overrides
    by_name = {job.name: job for job in jobs}
    teacher = by_name["demo_tiny/softmax/teacher"]
    # one teacher for every plug: the jobs that start from it wait for it and read its export
    for name in ("demo_tiny/elu1/s1", "demo_tiny/elu1/baseline_cls", "demo_tiny/hedgehog/s1"):
        assert by_name[name].after == [teacher]
        assert override("model.weights", teacher.export) in by_name[name].overrides
    assert by_name["demo_tiny/hedgehog/baseline_cls"].after == [by_name["demo_tiny/hedgehog/s1"]]
    assert by_name["demo_tiny/elu1/cls"].after == [by_name["demo_tiny/elu1/s2"]]


def test_the_record_gives_the_plan_back(jobs: list[Job], tmp_path: Path) -> None:
    write_record(tmp_path, jobs)
    planned, teacher = read_record(tmp_path)
    assert teacher == jobs[0].export
    assert list(planned) == ["softmax", "elu1", "hedgehog"]
    assert [(j.name, j.run_dir, j.variant, j.task) for j in comparison_jobs(planned)] == [
        (j.name, j.run_dir, j.variant, j.task) for j in jobs]


def test_bookkeeping_waits_across_pipelines_and_adds_the_attention_column(jobs: list[Job], tmp_path: Path) -> None:
    """The Ray sweep's driver threads with a plain runner in place of Ray Train: every plug's pipeline waits for
    the reference's teacher; one plug's Stage 2 fails, which skips its AdaLA row only."""
    def runner(job: Job) -> None:  # what a stage run writes
        if job.name == "demo_tiny/elu1/s2":
            raise RuntimeError("loss is nan")
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
        if job.task is not None:
            metric = "top1" if job.task == "cls" else "miou"
            (job.run_dir / "metrics.json").write_text(json.dumps({"step": 1, metric: 0.25}))

    reports: list[str] = []
    outcomes = run_models(jobs, runner, parallel=3, report=reports.append)
    assert list(outcomes) == ["demo_tiny/softmax", "demo_tiny/elu1", "demo_tiny/hedgehog"]
    teacher_done = reports.index("demo_tiny/softmax/teacher: completed")
    assert all(reports.index(f"demo_tiny/{a}/s1: started") > teacher_done for a in ("elu1", "hedgehog"))
    assert "demo_tiny/elu1/cls: skipped: needs demo_tiny/elu1/s2, which did not complete" in reports
    assert "demo_tiny/elu1/baseline_cls: completed" in reports
    assert outcomes["demo_tiny/hedgehog"].status == "completed"

    results = collect(jobs, {name: outcome.status for name, outcome in outcomes.items()})
    table, data = write_results(tmp_path, results)
    rows = json.loads(data.read_text())["models"]
    assert [(r["model"], r["attention"]) for r in rows] == [("demo_tiny", "softmax"), ("demo_tiny", "elu1"),
                                                            ("demo_tiny", "hedgehog")]
    assert rows[1]["metrics"]["baseline_cls"] == {"top1": 0.25} and rows[1]["metrics"]["cls"] == {"top1": None}
    lines = table.read_text().splitlines()
    assert lines[0].startswith("| VFM | attention | teacher loss |") and lines[1].startswith("|---|---|---:|")
    assert lines[3].startswith("| `demo_tiny` | elu1 |")
    assert "failed: demo_tiny/elu1/s2: RuntimeError: loss is nan" in lines[3]


@pytest.mark.parametrize("launcher", [submit.main, ray_sweep.main], ids=["submit", "ray_sweep"])
@pytest.mark.parametrize("args, message", [
    (["--attentions", "elu1,nope"], "unknown attention 'nope'; choose one of: cosformer, elu1,"),
    (["--attentions", "softmax"], "reference row"),
    (["--models", "demo_tiny", "demo_small", "--attentions", "elu1"], "on one model, not 2"),
])
def test_bad_attentions_are_one_error_before_anything_starts(launcher, args: list[str], message: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    assert launcher(["--demo", "--local" if launcher is submit.main else "--dry-run", "--root", str(root), *args,
                     *TINY, f"demo.cache_dir={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not root.exists()


def test_the_report_waits_for_every_job(jobs: list[Job], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["compare", "--runs", str(tmp_path)]) == 2
    assert "comparison.json not found" in capsys.readouterr().err
    write_record(tmp_path, jobs)
    assert cli(["compare", "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{len(jobs)} job(s) of the comparison in {tmp_path} have not finished: demo_tiny/softmax/teacher" in err
    assert not (tmp_path / "compare.md").exists()


def test_local_jobs_start_after_what_they_need_and_a_failure_skips_its_dependents(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--local``'s order with submitit's real local executor and plain callables as the jobs: the teacher and one
    plug's Stage 1 complete, the other plug's Stage 1 fails, and its Stage 2 is never started."""
    import submitit

    from adala.launch.submit import _run_in_order

    def job(step: str, after: list[Job]) -> Job:
        return Job(model="demo_tiny", step=step, stage="align_attention", run_dir=tmp_path / step, overrides=[],
                   after=after, attention=step.split("_")[0])

    teacher = job("softmax_teacher", [])
    elu1, performer = job("elu1_s1", [teacher]), job("performer_s1", [teacher])
    jobs = [teacher, elu1, performer, job("performer_s2", [performer])]

    def start(planned: Job):
        executor = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j", cluster="local")
        executor.update_parameters(timeout_min=5)
        return executor.submit(int, "nan" if planned is performer else "0")  # int("nan"): a ValueError

    changes: list[tuple[str, str]] = []
    ended = _run_in_order(jobs, start, 2, lambda name, state: changes.append((name, state)))
    assert dict(changes) == ended  # each job's last change is how it ended ...
    assert [state for name, state in changes if name == elu1.name] == ["started", "completed"]
    assert [state for name, state in changes if name == jobs[3].name] == [ended[jobs[3].name]]  # ... never started
    assert [ended[j.name] for j in jobs[:2]] == ["completed", "completed"]
    assert ended[performer.name].startswith("failed: ValueError: invalid literal for int()")
    assert ended[jobs[3].name] == f"skipped: needs {performer.name}, which did not complete"
    printed = capsys.readouterr().out.splitlines()
    assert printed.index(f"{teacher.name}: completed") < printed.index(f"{elu1.name}: started")
    assert f"{jobs[3].name}: started" not in printed


def test_status_of_a_local_run_reads_its_record_and_a_running_launcher_refuses_a_second(
        jobs: list[Job], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The record a ``--local`` launcher keeps: ``status`` shows each job's state from it, and says when the launcher
    is gone while jobs never ended; a second run into the root is refused only while the launcher lives."""
    import subprocess
    import sys

    from adala.launch.submit import _refuse_if_running, _write_record, status

    states = {job.name: "pending" for job in jobs}
    states[jobs[0].name], states[jobs[1].name] = "completed", "failed: ValueError: boom"
    states[jobs[2].name] = "running"
    _write_record(tmp_path, jobs, "1 node(s)", "2026-01-01T00:00:00", {jobs[0].name: "123"}, states)
    with pytest.raises(UserError, match="a --local run of the pipeline in .* is still going"):
        _refuse_if_running(tmp_path)  # this process is the launcher of the record
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = json.loads((tmp_path / "pipeline.json").read_text())
    record["local"]["pid"] = int(finished.stdout)  # a launcher that has exited
    (tmp_path / "pipeline.json").write_text(json.dumps(record))
    _refuse_if_running(tmp_path)
    assert status(tmp_path) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "run here (--local), its launcher has exited 2026-01-01T00:00:00" in lines[0]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == [job.name for job in jobs]
    assert "123  COMPLETED" in rows[jobs[0].name] and "FAILED (ValueError: boom)" in rows[jobs[1].name]
    assert "RUNNING (launcher exited)" in rows[jobs[2].name]
    assert "PENDING (launcher exited)" in rows[jobs[3].name]

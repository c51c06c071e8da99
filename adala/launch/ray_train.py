"""Ray Train: every stage job of a pipeline as one ``TorchTrainer`` run; several models' pipelines at once.

A job's workers run :func:`train_worker`, an ordinary stage run (``run_stage``) inside the process group Ray Train
set up. The job's overrides carry ``resume=auto``, so when a worker dies and Ray Train restarts the worker group
(``FailureConfig(max_failures)``), the new workers continue from the latest complete checkpoint in the job's run
directory: adala's own checkpoints, not Ray's.

Each pipeline's jobs (a model's, or one attention's in an attention comparison) run one after another in a driver
thread of their own; the threads share the cluster, and a pipeline whose job fails skips the jobs that need it
without stopping the others. A job may need a job of an earlier pipeline (a comparison's demo teacher); its thread
waits for that one to end. Ray is imported inside the functions that use it.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from adala.errors import UserError
from adala.launch.pipeline import Job

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Workers:
    """The workers of every trainer: how many, and what each holds."""

    count: int
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement: str = "PACK"  # Ray's placement strategy for a run's workers: PACK or SPREAD

    @property
    def per_worker(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {})}

    def runs_that_fit(self, cluster: dict[str, float]) -> int:
        """How many trainers the cluster holds at once; 0 when not even one fits."""
        return int(min(cluster.get(key, 0.0) // (amount * self.count) for key, amount in self.per_worker.items()))


@dataclass
class JobOutcome:
    job: str
    status: str  # completed | failed | skipped
    error: Optional[str] = None


@dataclass
class ModelOutcome:
    model: str  # the pipeline (:attr:`Job.pipeline`): a model, or MODEL/ATTENTION in a comparison
    jobs: list[JobOutcome] = field(default_factory=list)

    @property
    def failure(self) -> Optional[JobOutcome]:
        """The first job that failed (its dependents are skipped), or None when every job completed."""
        return next((j for j in self.jobs if j.status == "failed"), None)

    @property
    def status(self) -> str:
        failed = self.failure
        return "completed" if failed is None else f"failed: {failed.job}: {failed.error}"


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of one stage job: the stage run, then the final metrics to Ray Train.

    Ray Train starts the workers in its own directory; relative paths in the overrides are the launcher's, so
    the worker moves to the launcher's directory first.
    """
    import ray.train

    from adala.config import compose
    from adala.logs import configure_logging
    from adala.run import run_stage

    configure_logging()
    if os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])
    result = run_stage(compose(config["overrides"]))
    ray.train.report({"steps": result.steps, **result.metrics})


@contextmanager
def connect(address: Optional[str]) -> Iterator[dict[str, float]]:
    """Join the Ray cluster at ``address`` (``auto``: the one running on this machine), or start a local one with
    this machine's CPUs and GPUs when None; yields its resources and disconnects (stopping a local one) at exit."""
    import ray

    try:
        ray.init(address=address or "local")
    except ConnectionError as err:
        raise UserError(f"--address {address}: cannot connect to a Ray cluster there ({one_line(err)}; a cluster "
                        "with token authentication also needs RAY_AUTH_MODE=token here)") from None
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


def check_capacity(workers: Workers, cluster: dict[str, float]) -> None:
    """Refuse a trainer the connected cluster can never place (``cluster``: ``ray.cluster_resources()``)."""
    for key, amount in workers.per_worker.items():
        needed, present = amount * workers.count, cluster.get(key, 0.0)
        if needed > present:
            raise UserError(f"{workers.count} workers need {needed:g} {key} ({amount:g} each) but the Ray cluster "
                            f"has {present:g}; lower --workers or add nodes")


def cluster_has_gpus(cluster: dict[str, float]) -> bool:
    return cluster.get("GPU", 0.0) > 0


def alive_nodes() -> int:
    """How many nodes the connected Ray cluster has up."""
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"])


def run_job(job: Job, workers: Workers, *, storage: Path, max_failures: int) -> None:
    """Train one job as a ``TorchTrainer`` run; raises when it still fails after ``max_failures`` restarts."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    overrides = job.overrides if workers.use_gpu else ["train.device=cpu", *job.overrides]  # later overrides win
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"overrides": overrides, "cwd": os.getcwd()},
        scaling_config=ScalingConfig(num_workers=workers.count, use_gpu=workers.use_gpu,
                                     resources_per_worker=workers.per_worker, placement_strategy=workers.placement),
        run_config=RunConfig(name=job.name.replace("/", "-"), storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    trainer.fit()


Runner = Callable[[Job], None]


def run_model(jobs: Sequence[Job], runner: Runner, report: Callable[[str], None] = print,
              ended: Optional[dict[str, threading.Event]] = None, done: Optional[set[str]] = None) -> ModelOutcome:
    """One pipeline's jobs in order; a job whose dependency did not complete is skipped, the others still run.

    ``ended`` and ``done`` are shared with the other pipelines' threads: the event of every job, set when it has
    ended, and the names of the jobs that completed; a dependency of another pipeline is waited for.
    """
    outcome = ModelOutcome(model=jobs[0].pipeline)
    done = set() if done is None else done
    for job in jobs:
        try:
            for dep in job.after:
                if ended is not None and dep.name in ended:
                    ended[dep.name].wait()
            _run_one(job, runner, report, outcome, done)
        finally:
            if ended is not None:
                ended[job.name].set()
    return outcome


def _run_one(job: Job, runner: Runner, report: Callable[[str], None], outcome: ModelOutcome, done: set[str]) -> None:
    missing = [dep.name for dep in job.after if dep.name not in done]
    if missing:
        reason = f"needs {missing[0]}, which did not complete"
        report(f"{job.name}: skipped: {reason}")
        outcome.jobs.append(JobOutcome(job.name, "skipped", reason))
        return
    report(f"{job.name}: started")
    try:
        runner(job)
    except Exception as err:  # a failed job is reported in the results, and the other pipelines go on
        reason = one_line(err)
        report(f"{job.name}: failed: {reason}")
        outcome.jobs.append(JobOutcome(job.name, "failed", reason))
        return
    report(f"{job.name}: completed")
    done.add(job.name)
    outcome.jobs.append(JobOutcome(job.name, "completed"))


def run_models(jobs: Sequence[Job], runner: Runner, *, parallel: int,
               report: Callable[[str], None] = print) -> dict[str, ModelOutcome]:
    """Every pipeline, ``parallel`` at a time (one driver thread each, started in the order of ``jobs``, so a
    dependency on an earlier pipeline is always running or done); keyed by :attr:`Job.pipeline`."""
    by_model: dict[str, list[Job]] = {}
    for job in jobs:
        by_model.setdefault(job.pipeline, []).append(job)
    ended = {job.name: threading.Event() for job in jobs}
    done: set[str] = set()
    lock = threading.Lock()

    def locked_report(line: str) -> None:
        with lock:
            report(line)

    pool = ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="ray-sweep")
    try:
        futures = {model: pool.submit(run_model, model_jobs, runner, locked_report, ended, done)
                   for model, model_jobs in by_model.items()}
        return {model: future.result() for model, future in futures.items()}
    finally:  # on Ctrl-C, return at once: disconnecting from Ray then ends the running trainers
        pool.shutdown(wait=False, cancel_futures=True)


def one_line(err: BaseException) -> str:
    """A failure in one line: the workers' own error when Ray Train wraps one, else the error's last line."""
    failures = getattr(err, "worker_failures", None)  # ray.train.WorkerGroupError: rank -> the worker's error
    if failures:
        err = failures[min(failures)]
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[-1] if lines else type(err).__name__
    if type(err).__name__ not in text:
        text = f"{type(err).__name__}: {text}"
    return text[:300]

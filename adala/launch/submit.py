"""``adala-submit`` (from a checkout: ``python launchers/submit.py``): submit the whole method for one or several
models to SLURM with submitit, and show how it is going.

    adala-submit --models dinov2_l clip_l --nodes 2 --gpus-per-node 8 \\
        dinov2_l:model.weights=/weights/dinov2_l.safetensors clip_l:model.weights=/weights/clip_l.safetensors \\
        's1:data.train="/data/coco/train-{000000..000118}.tar"' 's2:data.train="/data/in22k/train-{000000..014197}.tar"' \\
        'in1k:data.train="/data/in1k/train-{0000..1023}.tar"' 'in1k:data.val="/data/in1k/val-{0000..0063}.tar"' ...
    adala-submit --demo                  # the built-in demo pipeline, for two demo models
    adala-submit --models dinov2_l --attentions elu1,performer ...   # the attention comparison on one model
    adala-submit --local ...             # run the jobs on this machine (submitit's local executor) and wait
    adala-submit ... --dry-run           # print the job graph; submit nothing
    adala-submit status [--root DIR]     # each job's state and latest checkpoint

Per model: Stage 1 → Stage 2 (after Stage 1 succeeds) → the Stage-3 tasks (after Stage 2), each a job with its
own run directory under ``--root``; Stage 1 reads COCO and Stage 2 ImageNet-22K unless told otherwise. Overrides
apply to every job; ``SCOPE:key=value`` to one model's jobs or one step's (s1, s2, s3, or a task: in1k, ade20k,
cityscapes); ``MODEL:STEP:key=value`` to one step of one model (dinov2_l:s2:...); more scopes win. Every job is
validated before anything is submitted.

With ``--attentions a,b,...`` the jobs are the attention comparison on one model (:mod:`adala.launch.comparison`):
every plug's pipeline and the softmax reference, under ``--root/<attention>/``, with the plan left in the root for
``adala compare --runs ROOT``, which writes the Table-1-shaped ``compare.md`` once the jobs are done. With
``--local`` the jobs run on this machine through submitit's local executor, each as soon as the jobs it needs have
completed; the command waits for them and writes ``results.md`` (and, for a comparison, ``compare.md``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from adala.errors import UserError, require_extra
from adala.files import write_text_atomic
from adala.launch import pipeline, slurm
from adala.launch.comparison import attention_list, check_attentions, comparison_jobs, plan_launch, write_record

DEFAULT_MINUTES = {"teacher": 60, "s1": 8 * 60, "s2": 24 * 60, "s3": 12 * 60}
RECORD = "pipeline.json"
COMMAND = "adala-submit"  # the console entry point; a checkout runs python launchers/submit.py


def parse(argv: Sequence[str], command: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=command, description="Submit the whole method for one or several models to SLURM with submitit, and "
                                  "show how it is going.",
        epilog="overrides: key=value for every job, SCOPE:key=value for one model (dinov2_l:), one step (s1: s2: s3:) "
               "or one Stage-3 task (in1k: ade20k: cityscapes:), MODEL:STEP:key=value for one step of one model "
               "(dinov2_l:s2:); more scopes win. Stage 1 reads COCO and Stage 2 ImageNet-22K unless told otherwise "
               "(s1:data.train=... s2:data.train=...)")
    parser.add_argument("--models", nargs="+", help=f"default: {' '.join(pipeline.DEFAULT_MODELS)} (demo: the demo models)")
    parser.add_argument("--tasks", nargs="+", help=f"Stage-3 tasks, default: {' '.join(pipeline.DEFAULT_TASKS)} "
                        "(with --demo: cls seg; mask2former is seg with a Mask2Former head)")
    parser.add_argument("--root", default="runs/pipeline", help="run directories and submitit logs go here")
    parser.add_argument("--demo", action="store_true", help="the built-in demo data, a teacher job and demo sizes")
    parser.add_argument("--attentions", type=attention_list, metavar="A,B,...",
                        help="the attention comparison on one model: these plugs' protocols and the softmax reference")
    parser.add_argument("--local", action="store_true",
                        help="run the jobs on this machine (submitit's local executor, one node), wait for them and "
                             "write the results")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the job graph; submit nothing")
    parser.add_argument("--partition", help="default: the cluster's default partition")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--tasks-per-node", type=int, help="ranks per node, default: one per GPU")
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--mem-gb", type=int, default=0, help="memory per node; 0 (default) takes the whole node")
    parser.add_argument("--time", nargs="+", default=[], metavar="STEP=MIN",
                        help=f"time limits in minutes, default {' '.join(f'{k}={v}' for k, v in DEFAULT_MINUTES.items())}")
    parser.add_argument("--signal-delay", type=int, default=300, help="seconds before the time limit to save and requeue")
    parser.add_argument("overrides", nargs="*", help="[MODEL:][STEP:]key=value Hydra overrides")
    args = parser.parse_args(argv)
    for option in ("models", "tasks"):  # `--models a b key=value`: the overrides after a list are not names
        names = getattr(args, option) or []
        setattr(args, option, [n for n in names if "=" not in n] or None)
        args.overrides = [n for n in names if "=" in n] + args.overrides
    return args


def main(argv: Optional[Sequence[str]] = None, command: str = COMMAND) -> int:
    """``command`` is how the user runs this (``adala-submit``, ``python launchers/submit.py``), for usage and hints."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["status"]:
            status_args = argparse.ArgumentParser(prog=f"{command} status")
            status_args.add_argument("--root", default="runs/pipeline")
            return status(Path(status_args.parse_args(args[1:]).root))
        return submit(parse(args, command), command)
    except UserError as err:
        print(f"submit: error: {err}", file=sys.stderr)
        return 2


def submit(args: argparse.Namespace, command: str) -> int:
    root = Path(args.root).absolute()
    models = args.models or (pipeline.DEMO_MODELS if args.demo else pipeline.DEFAULT_MODELS)
    minutes = _minutes(args.time)
    tasks_per_node = args.tasks_per_node or max(1, args.gpus_per_node)
    if args.attentions is not None:
        check_attentions(args.attentions)
    if not args.dry_run:
        require_extra("submitit", "submitting the pipeline")
    if args.local:
        if args.nodes != 1:
            raise UserError(f"--local runs every job on this machine: one node, not --nodes {args.nodes}")
    elif slurm.available():
        part = slurm.partition(args.partition)
        slurm.check_request(part, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                            cpus_per_node=tasks_per_node * args.cpus_per_task)
    elif not args.dry_run:
        raise UserError("no SLURM commands here (sinfo not found); submit from a login node, run here with --local, "
                        "or use --dry-run")
    _refuse_if_running(root)
    if args.attentions is not None:
        jobs = comparison_jobs(plan_launch(args.models or models[:1], args.attentions, root, tasks=args.tasks,
                                           overrides=args.overrides, demo=args.demo))
    else:
        jobs = pipeline.plan(models, root, tasks=args.tasks, overrides=args.overrides, demo=args.demo)
    pipeline.validate_jobs(jobs, world_size=args.nodes * tasks_per_node)
    resources = (f"{args.nodes} node(s) x {tasks_per_node} rank(s), {args.gpus_per_node} GPU(s) and "
                 f"{args.cpus_per_task * tasks_per_node} CPUs per node")
    if args.dry_run:
        print(f"dry run: {len(jobs)} jobs, each on {resources}; nothing submitted")
        print(_graph(jobs, minutes))
        return 0
    if args.attentions is not None:
        write_record(root, jobs)
    if args.local:
        return _run_local(jobs, root, args, tasks_per_node, minutes, resources)
    ids = _submit_all(jobs, root, args, tasks_per_node, minutes)
    _write_record(root, jobs, resources, _now(), ids)
    print(_graph(jobs, minutes, ids))
    print(f"submitted {len(jobs)} jobs; follow them with: {command} status --root {args.root}")
    if args.attentions is not None:
        print(f"when they are done, the comparison's report: adala compare --runs {args.root}")
    return 0


def _submit_all(jobs, root: Path, args: argparse.Namespace, tasks_per_node: int, minutes: dict[str, int]) -> dict[str, str]:
    from adala.launch.submitit_job import StageJob

    ids: dict[str, str] = {}
    for job in jobs:
        dependency = {"slurm_dependency": "afterok:" + ":".join(ids[a.name] for a in job.after)} if job.after else {}
        executor = _executor(job, root, args, tasks_per_node, minutes, cluster=None, **dependency)
        ids[job.name] = executor.submit(StageJob(job.overrides)).job_id
    return ids


def _write_record(root: Path, jobs, resources: str, submitted: str, ids: dict[str, str],
                  local: Optional[dict[str, str]] = None) -> None:
    """The pipeline's record, read by ``status``: each job's id, stage, run dir and the jobs it waits for. A
    ``--local`` run also records its launcher's pid and host and each job's state, since no scheduler keeps them
    (``local``: job name -> pending | running | completed | failed: why | skipped: why)."""
    record = {"submitted": submitted, "resources": resources,
              "jobs": [{"name": j.name, "id": ids.get(j.name, "-"), "stage": j.stage, "run_dir": str(j.run_dir),
                        "after": [a.name for a in j.after], **({"state": local[j.name]} if local else {})}
                       for j in jobs]}
    if local is not None:
        record["local"] = {"pid": os.getpid(), "host": socket.gethostname()}
    write_text_atomic(root / RECORD, json.dumps(record, indent=2) + "\n")


def _executor(job, root: Path, args: argparse.Namespace, tasks_per_node: int, minutes: dict[str, int], *,
              cluster: Optional[str], **extra: str):
    """A submitit executor for ``job``: SLURM's (``cluster`` None, where SLURM is) or the ``local`` one."""
    import submitit

    executor = submitit.AutoExecutor(folder=root / "submitit" / "%j", cluster=cluster, slurm_max_num_timeout=100)
    executor.update_parameters(
        name="adala-" + job.name.replace("/", "-"), nodes=args.nodes, tasks_per_node=tasks_per_node,
        gpus_per_node=args.gpus_per_node or None, cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
        timeout_min=_limit(minutes, job.step), slurm_partition=args.partition,
        slurm_signal_delay_s=args.signal_delay, slurm_additional_parameters={"requeue": True}, **extra,
    )
    return executor


def _run_local(jobs, root: Path, args: argparse.Namespace, tasks_per_node: int, minutes: dict[str, int],
               resources: str) -> int:
    """Run ``jobs`` through submitit's local executor, each once the jobs it needs have completed, as many at once
    as this machine's CPUs hold, keeping the pipeline's record (``status``) current; then the results (and the
    comparison's report). 0 when every job completed."""
    from adala.launch.results import collect, markdown_table, write_results
    from adala.launch.submitit_job import StageJob

    at_once = max(1, (os.cpu_count() or 1) // (args.cpus_per_task * tasks_per_node))
    ids: dict[str, str] = {}
    states = {job.name: "pending" for job in jobs}

    def start(job):
        handle = _executor(job, root, args, tasks_per_node, minutes, cluster="local").submit(StageJob(job.overrides))
        ids[job.name] = str(handle.job_id)
        return handle

    def changed(name: str, state: str) -> None:
        states[name] = "running" if state == "started" else state
        _write_record(root, jobs, resources, started, ids, states)

    started = _now()
    _write_record(root, jobs, resources, started, ids, states)
    ended = _run_in_order(jobs, start, at_once, changed)
    statuses = {job.pipeline: "completed" for job in jobs}  # or the first job that did not complete, and why
    for job in reversed(jobs):
        if ended[job.name] != "completed":
            kind, why = ended[job.name].split(": ", 1)
            statuses[job.pipeline] = f"{kind}: {job.name}: {why}"
    results = collect(jobs, statuses)
    table, data = write_results(root, results)
    print(markdown_table(results), flush=True)
    print(f"results written to {table} and {data}", flush=True)
    completed = all(state == "completed" for state in ended.values())
    if args.attentions is not None and completed:
        from adala.compare import report_runs

        report_runs(root)
    return 0 if completed else 1


def _run_in_order(jobs, start, at_once: int, changed: Callable[[str, str], None]) -> dict[str, str]:
    """Start each job (``start``: its submitit job) once the jobs it needs have completed, at most ``at_once`` at a
    time, and wait for all; each job's name -> "completed", "failed: why" or "skipped: why". Each change is printed
    and passed to ``changed`` (name, "started" or the end state). Ctrl-C cancels the running jobs."""
    ended: dict[str, str] = {}
    running: dict[str, object] = {}  # job name -> its submitit job

    def note(name: str, state: str) -> None:
        print(f"{name}: {state}", flush=True)
        changed(name, state)

    waiting = list(jobs)
    try:
        while waiting or running:
            for name, handle in list(running.items()):
                if handle.done():
                    error = handle.exception()
                    ended[name] = "completed" if error is None else f"failed: {_failure(error)}"
                    note(name, ended[name])
                    del running[name]
            for job in list(waiting):
                states = [ended.get(dep.name) for dep in job.after]
                if None in states or len(running) >= at_once:
                    continue
                waiting.remove(job)
                failed = [dep.name for dep, state in zip(job.after, states) if state != "completed"]
                if failed:
                    ended[job.name] = f"skipped: needs {failed[0]}, which did not complete"
                    note(job.name, ended[job.name])
                    continue
                running[job.name] = start(job)
                note(job.name, "started")
            time.sleep(0.5)
    except KeyboardInterrupt:
        for handle in running.values():
            handle.cancel(check=False)
        raise
    return ended


def _failure(error: BaseException) -> str:
    """A failed submitit job in one line: the job's own error (the last line of the trace submitit passes on) and
    where its log is."""
    text = str(error)
    parts = text.split("-" * 22)  # submitit's message: a header, the job's trace, the paths of its logs
    lines = [line.strip() for line in (parts[1] if len(parts) > 2 else text).splitlines() if line.strip()]
    logs = re.findall(r"- (\S+_log\.err)", text)
    return (lines[-1] if lines else type(error).__name__) + (f" (log: {logs[0]})" if logs else "")


def status(root: Path) -> int:
    from adala.engine.checkpoint import latest_checkpoint

    record_path = root / RECORD
    if not record_path.is_file():
        raise UserError(f"no submitted pipeline in {root} ({RECORD} not found); pass --root")
    record = json.loads(record_path.read_text())
    launcher = record.get("local")
    gone = launcher is not None and not _launcher_alive(launcher)
    where = "run here (--local)" + (", its launcher has exited" if gone else "") if launcher else "submitted"
    print(f"pipeline {where} {record['submitted']} ({record['resources']})")
    print(f"{'job':<26}{'id':>8}  {'state':<24}{'latest checkpoint':<20}export")
    for job in record["jobs"]:
        run_dir = Path(job["run_dir"])
        export = (run_dir / "export" / "model.safetensors").is_file()
        if launcher is not None:
            kind, _, why = job["state"].partition(": ")
            state = kind.upper() + (f" ({why})" if why else "")
            if gone and kind in ("pending", "running"):
                state += " (launcher exited)"
        else:
            info = slurm.job_state(job["id"]) if slurm.available() else {}
            state = info.get("JobState", "COMPLETED?" if export else "unknown")
            if info.get("Reason", "None") != "None":
                state += f" ({info['Reason']})"
        latest = latest_checkpoint(run_dir / "checkpoints")
        print(f"{job['name']:<26}{job['id']:>8}  {state:<24}{latest.name if latest else '-':<20}"
              f"{'yes' if export else '-'}")
    return 0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _launcher_alive(launcher: dict) -> bool:
    """Whether the ``--local`` launcher of a record still runs (a record from another host is taken as running)."""
    if launcher["host"] != socket.gethostname():
        return True
    try:
        os.kill(launcher["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _graph(jobs, minutes: dict[str, int], ids: Optional[dict[str, str]] = None) -> str:
    return pipeline.job_table(jobs, {"id": lambda job: (ids or {}).get(job.name, "-"),
                                     "time": lambda job: f"{_limit(minutes, job.step)}m"})


def _limit(minutes: dict[str, int], step: str) -> int:
    return minutes.get(step, minutes["s3"])


def _minutes(items: Sequence[str]) -> dict[str, int]:
    limits = dict(DEFAULT_MINUTES)
    for item in items:
        step, _, value = item.partition("=")
        if step not in limits or not value.isdigit():
            raise UserError(f"--time {item!r}: use STEP=MINUTES with STEP one of {', '.join(limits)}")
        limits[step] = int(value)
    return limits


def _refuse_if_running(root: Path) -> None:
    """A second submission into the same root while the first is queued or running would race on its run dirs."""
    record = root / RECORD
    if not record.is_file():
        return
    launcher = json.loads(record.read_text()).get("local")
    if launcher is not None and _launcher_alive(launcher):
        raise UserError(f"a --local run of the pipeline in {root} is still going (pid {launcher['pid']} on "
                        f"{launcher['host']}); wait for it, stop it, or choose another --root")
    if launcher is not None or not slurm.available():
        return
    for job in json.loads(record.read_text())["jobs"]:
        if slurm.job_state(job["id"]).get("JobState") in slurm.ACTIVE_STATES:
            raise UserError(f"job {job['id']} ({job['name']}) of the pipeline in {root} is still queued or running; "
                            f"wait for it, scancel it, or choose another --root")


if __name__ == "__main__":
    sys.exit(main())

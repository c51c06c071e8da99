"""``adala-ray-sweep`` (from a checkout: ``python launchers/ray_sweep.py``): run the whole pipeline
(Stage 1 → 2 → 3) for several VFMs with Ray Train, then print one results table.

    adala-ray-sweep --demo                         # the two demo models, on a local Ray cluster
    adala-ray-sweep --models dinov2_l clip_l --address auto \\
        dinov2_l:model.weights=/weights/dinov2_vitl14.pth clip_l:model.weights=/weights/clip_vitl14.bin
    adala-ray-sweep --demo --models demo_tiny --attentions elu1,performer   # the attention comparison

With ``--attentions`` the sweep is the attention comparison on one model (:mod:`adala.launch.comparison`): every
plug's pipeline (its paper protocol and AdaLA's stages) and the softmax reference, one pipeline each, and it ends
with the Table-1-shaped ``compare.md`` / ``compare.json`` of :mod:`adala.compare` in the root.

Every stage job is a Ray Train ``TorchTrainer`` run with ``--workers`` workers; models run side by side where the
cluster has room. Overrides (``key=value``, ``SCOPE:key=value``, ``MODEL:STEP:key=value``) may appear anywhere on the
line. Everything is
validated before a cluster is started; bad input stops with one line and exit code 2. Exit code 1: a model failed.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from adala.errors import UserError, require_extra

if TYPE_CHECKING:
    from adala.launch.pipeline import Job

PROG = "ray_sweep"  # the prefix of its messages
COMMAND = "adala-ray-sweep"  # the console entry point; a checkout runs python launchers/ray_sweep.py
HINT = """{prog}: nothing to run; try the built-in demo, or name models with their pretrained weights:
  {command} --demo
  {command} --models dinov2_l clip_l dinov2_l:model.weights=PATH clip_l:model.weights=PATH
(--help lists the options)
"""


def parser(command: str = COMMAND) -> argparse.ArgumentParser:
    from adala.launch.comparison import attention_list
    from adala.launch.pipeline import DEFAULT_MODELS, DEMO_MODELS

    p = argparse.ArgumentParser(
        prog=command, description="Ray Train runs of the whole pipeline for several VFMs, and one results table.",
        epilog="overrides: key=value for every job, or SCOPE:key=value for one model (dinov2_l:), one step "
               "(s1: s2: s3: teacher:) or one Stage-3 task (in1k: ade20k: ...), or MODEL:STEP:key=value for one "
               "step of one model (dinov2_l:s2:); more scopes win; anywhere on the line. Stage 1 reads COCO and "
               "Stage 2 ImageNet-22K unless told otherwise (s1:data.train=... s2:data.train=...)")
    p.add_argument("--models", nargs="+", metavar="M", help=f"VFMs (default: {' '.join(DEFAULT_MODELS)}; "
                                                           f"with --demo: {' '.join(DEMO_MODELS)})")
    p.add_argument("--tasks", nargs="+", metavar="T", help="Stage-3 tasks (default: in1k ade20k cityscapes; "
                                                          "with --demo: cls seg; mask2former is seg with a "
                                                          "Mask2Former head)")
    p.add_argument("--root", default="runs/sweep", help="run directories, Ray's storage and the results (%(default)s)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers per stage run (%(default)s)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each worker reserves (%(default)s)")
    p.add_argument("--placement", choices=("PACK", "SPREAD"), default="PACK",
                   help="where a run's workers go: PACK fills as few nodes as possible, SPREAD puts them on as many "
                        "nodes as it can (%(default)s)")
    p.add_argument("--strategy", choices=("fsdp", "deepspeed"), default="fsdp", help="(%(default)s)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="one GPU per worker (default: when the cluster has GPUs)")
    p.add_argument("--address", help="join the Ray cluster at HOST:PORT (auto: the one on this machine); "
                                     "default: start a local one")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts per stage run (%(default)s)")
    p.add_argument("--parallel", type=int, help="pipelines (models, or a comparison's attentions) at a time "
                                                   "(default: as many as the cluster holds)")
    p.add_argument("--attentions", type=attention_list, metavar="A,B,...",
                   help="the attention comparison on one model: these plugs' protocols and the softmax reference, "
                        "then compare.md in the root")
    p.add_argument("--demo", action="store_true", help="the built-in demo's data, teacher and recipe")
    p.add_argument("--dry-run", action="store_true", help="validate every job and print the job graph; start nothing")
    return p


def parse(argv: Sequence[str], command: str = COMMAND) -> tuple[argparse.Namespace, list[str]]:
    """Options and overrides; an override is any argument that is not an option and holds ``=``."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser(command).parse_args([a for a in argv if a not in overrides])
    if args.workers < 1 or args.max_failures < 0 or (args.parallel is not None and args.parallel < 1):
        raise UserError("--workers and --parallel must be at least 1, --max-failures at least 0")
    return args, overrides


def plan_sweep(args: argparse.Namespace, overrides: list[str]) -> list[Job]:
    """Every job of every model's pipeline (or of the attention comparison), composed and validated; nothing has
    started yet."""
    from adala.launch.comparison import comparison_jobs, plan_launch
    from adala.launch.pipeline import DEFAULT_MODELS, DEMO_MODELS, plan, validate_jobs

    models = args.models or (DEMO_MODELS if args.demo else DEFAULT_MODELS)
    root, overrides = Path(args.root).resolve(), [f"strategy={args.strategy}", *overrides]
    if args.attentions is not None:
        jobs = comparison_jobs(plan_launch(args.models or models[:1], args.attentions, root, tasks=args.tasks,
                                           overrides=overrides, demo=args.demo))
    else:
        jobs = plan(models, root, tasks=args.tasks, overrides=overrides, demo=args.demo)
    validate_jobs(jobs, world_size=args.workers)
    return jobs


def sweep(args: argparse.Namespace, jobs: list[Job]) -> bool:
    """Run every model's pipeline on the cluster, write and print the results; True when all completed."""
    from adala.launch.ray_train import (Workers, alive_nodes, check_capacity, cluster_has_gpus, connect, run_job,
                                        run_models)
    from adala.launch.comparison import write_record
    from adala.launch.results import collect, markdown_table, write_results

    root = Path(args.root).resolve()
    if args.attentions is not None:
        write_record(root, jobs)
    with connect(args.address) as cluster:
        use_gpu = cluster_has_gpus(cluster) if args.gpu is None else args.gpu
        workers = Workers(args.workers, use_gpu=use_gpu, cpus_per_worker=args.cpus_per_worker,
                          placement=args.placement)
        check_capacity(workers, cluster)
        pipelines = len({j.pipeline for j in jobs})
        parallel = args.parallel or max(1, min(pipelines, workers.runs_that_fit(cluster)))
        say(f"{pipelines} pipeline(s), {parallel} at a time; {workers.count} workers per run "
            f"({'GPU' if use_gpu else 'CPU'}, {args.placement}), strategy={args.strategy}, {alive_nodes()} node(s)")
        runner = partial(run_job, workers=workers, storage=root / "ray", max_failures=args.max_failures)
        outcomes = run_models(jobs, runner, parallel=parallel, report=say)
    results = collect(jobs, {model: outcome.status for model, outcome in outcomes.items()})
    table, data = write_results(root, results)
    print(markdown_table(results), flush=True)
    say(f"results written to {table} and {data}")
    completed = all(o.failure is None for o in outcomes.values())
    if args.attentions is not None and completed:
        from adala.compare import report_runs

        report_runs(root)
    return completed


def say(line: str) -> None:
    print(f"{PROG}: {line}", flush=True)


def main(argv: Optional[Sequence[str]] = None, command: str = COMMAND) -> int:
    """``command`` is how the user runs this (``adala-ray-sweep``, ``python launchers/ray_sweep.py``), for usage
    and hints."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(HINT.format(prog=PROG, command=command), end="", file=sys.stderr)
        return 2
    try:
        args, overrides = parse(argv, command)
        require_extra("ray", "the Ray sweep")
        jobs = plan_sweep(args, overrides)
        if args.dry_run:
            from adala.launch.pipeline import job_table

            print(f"dry run: {len(jobs)} jobs, {args.workers} workers each; nothing started")
            print(job_table(jobs))
            return 0
        return 0 if sweep(args, jobs) else 1
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to continue from the checkpoints", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

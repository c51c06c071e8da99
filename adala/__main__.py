"""Command line: ``adala`` (or ``python -m adala``).

``adala stage=STAGE [group=option ...] [key=value ...]`` trains one stage; ``adala`` with no stage runs the built-in
demo, which takes only ``demo.*`` keys; ``adala slurm-script stage2`` prints an sbatch script; ``adala report
RUN_DIR ...`` draws runs' figures (``adala.eval.report``); ``adala sweep-kernels`` runs Stage 1 per φ kernel. ``--cfg`` prints
the composed config and exits; ``--check`` validates a stage's config (data, weights, checkpoints, strategy; for
``WORLD_SIZE`` processes) without building anything.
"""
from __future__ import annotations

import sys
import textwrap
from importlib import import_module
from typing import Optional, Sequence

from adala.engine.preemption import REQUEUE_EXIT_CODE, Preempted
from adala.errors import UserError
from adala.logs import configure_logging

FLAGS = ("--cfg", "--check")
GROUPS = ("stage", "model", "data", "attention", "strategy")  # in the order --help lists them
SUBCOMMANDS = {"report": "adala.eval.report", "sweep-kernels": "adala.launch.kernel_sweep"}  # modules with main(args)


def usage() -> str:
    """The ``--help`` text; the choices of every config group are read from the config directory."""
    from adala.config import CONFIG_DIR, options

    groups = "\n".join(
        textwrap.fill(", ".join(options(group)), width=110, initial_indent=f"  {group + '=':<12}",
                      subsequent_indent=" " * 14)
        for group in GROUPS
    )
    return f"""usage: adala [--cfg | --check] stage=STAGE [group=option ...] [key=value ...]   (or python -m adala ...)
       adala [demo.key=value ...]                 the built-in demo: no stage, only demo.* keys
       adala slurm-script stage1|stage2|stage3    print an sbatch script, e.g. adala slurm-script stage2 > stage2.sh
       adala report RUN_DIR [RUN_DIR ...]         figures and an HTML page of stage runs (adala report --help)
       adala compare [--attentions a,b,...] [demo.key=value ...]
                                                  every attention plug through its paper protocol and AdaLA's
                                                  stages on the demo: a Table-1-shaped compare.md (adala.compare)
       adala compare --runs ROOT                  the same report from a launcher's --attentions runs in ROOT
       adala sweep-kernels [--check] attention.kernel=elu1,relu,... [key=value ...]
                                                  Stage 1 once per φ kernel, then a report of their losses

options:
  --cfg         print the composed config and exit (adala --cfg stage=STAGE lists every key and its default)
  --check       validate a stage's config (data, weights, checkpoints, strategy) for WORLD_SIZE processes; build nothing

config groups ({CONFIG_DIR}):
{groups}

keys:  model.weights=PATH stage.init=PATH run_dir=DIR resume=none|auto|PATH overwrite=true train.max_steps=N ...
several processes: torchrun --nproc-per-node=N -m adala strategy=fsdp ...
exit codes: 0 done, 2 bad input, 75 preempted after saving a checkpoint (run again with resume=auto)
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args) and args[:1] != ["report"]:  # report: its own --help
        print(usage(), end="")
        return 0
    try:
        if args[:1] == ["slurm-script"]:
            print(slurm_script(args[1:]), end="")
            return 0
        if args[:1] == ["compare"]:
            configure_logging()
            from adala.compare import main as compare

            compare(args[1:])
            return 0
        if args[:1] and args[0] in SUBCOMMANDS:
            configure_logging()
            import_module(SUBCOMMANDS[args[0]]).main(args[1:])  # only the chosen subcommand's module
            return 0
        overrides = checked_overrides(args)
        configure_logging()
        from adala.config import compose, to_yaml

        cfg = compose(overrides)
        if cfg.stage is None:
            refuse_without_stage(overrides)
        if "--cfg" in args:
            print(to_yaml(cfg), end="")
            return 0
        if "--check" in args:
            from adala.run import validate

            cfg = validate(cfg)
            print(f"adala: config ok: stage {cfg.stage.name}, model {cfg.model.name}, "
                  f"run_dir {cfg.run_dir}, {cfg.train.max_steps} steps")
            return 0
        if cfg.stage is None:
            from adala.demo import run_demo

            run_demo(cfg, overrides)
        else:
            from adala.run import run_stage

            run_stage(cfg)
    except UserError as err:
        print(f"adala: error: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(f"adala: {stop}", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    return 0


def checked_overrides(args: Sequence[str]) -> list[str]:
    """The overrides among ``args``; an unknown option is refused (``compose`` refuses ``hydra.*`` overrides)."""
    for arg in args:
        if arg.startswith("-") and arg not in FLAGS:
            raise UserError(f"unknown option {arg}; adala takes --cfg, --check and key=value overrides (adala --help)")
    return [arg for arg in args if arg not in FLAGS]


def refuse_without_stage(overrides: Sequence[str]) -> None:
    """With no stage the command is the demo, which takes only ``demo.*`` keys: anything else means a stage was
    forgotten, and starting the demo would be a surprise."""
    from adala.config import options, override_key

    others = [o for o in overrides if not override_key(o).startswith("demo.")]
    if others:
        raise UserError(f"no stage chosen for {' '.join(others)}: add stage={'|'.join(options('stage'))} (with no "
                        "stage, adala runs the built-in demo, which takes only demo.* keys, e.g. demo.run_dir=DIR)")


def slurm_script(args: Sequence[str]) -> str:
    """The text of ``slurm/<name>.sh``: from an install without a checkout, save it and ``sbatch`` it."""
    from adala.paths import slurm_dir

    scripts = {path.stem: path for path in sorted(slurm_dir().glob("*.sh"))}
    if len(args) != 1 or args[0] not in scripts:
        raise UserError(f"slurm-script takes one name: {', '.join(scripts)}; "
                        "e.g. adala slurm-script stage2 > stage2.sh")
    return scripts[args[0]].read_text()


def cli() -> None:
    """The ``adala`` command and ``python -m adala``: :func:`main`, then the process's exit (see
    :func:`adala.engine.distributed.exit_process`)."""
    code = main()
    distributed = sys.modules.get("adala.engine.distributed")  # loaded by every command that may join a group
    if distributed is not None:
        distributed.exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()

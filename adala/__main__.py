"""Command line: ``python -m adala [group=option ...] [key=value ...]``.

With a stage (``stage=align_attention|align_features|finetune_cls|finetune_seg``) it trains that stage; with
none it runs the built-in demo. ``--cfg`` prints the composed config and exits; ``--check`` validates a stage's
config (data, weights, checkpoints, strategy; for ``WORLD_SIZE`` processes) without building anything.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from adala.engine.preemption import REQUEUE_EXIT_CODE, Preempted
from adala.errors import UserError
from adala.logs import configure_logging

USAGE = """usage: python -m adala [--cfg | --check] [group=option ...] [key=value ...]

groups:  model=<name> attention=elu1|relu|softplus|exp|softmax data=<name> strategy=single|ddp|fsdp|deepspeed
         stage=align_attention|align_features|finetune_cls|finetune_seg   (none: the built-in demo)
keys:    model.weights=PATH stage.init=PATH run_dir=DIR resume=none|auto|PATH train.max_steps=N ...
         (see conf/config.yaml and conf/<group>/*.yaml)
several processes: torchrun --nproc-per-node=N -m adala strategy=fsdp ...
exit codes: 0 done, 2 bad input, 75 preempted after saving a checkpoint (run again with resume=auto)
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE, end="")
        return 0
    show_config = "--cfg" in args
    check_only = "--check" in args
    overrides = [a for a in args if a not in ("--cfg", "--check")]
    configure_logging()
    try:
        from adala.config import compose, to_yaml

        cfg = compose(overrides)
        if show_config:
            print(to_yaml(cfg), end="")
            return 0
        if check_only:
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


if __name__ == "__main__":
    sys.exit(main())

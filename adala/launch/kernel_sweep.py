"""``adala sweep-kernels``: Stage 1 once per φ kernel of the linear attention (paper App. A.3), then one report.

``adala sweep-kernels attention.kernel=elu1,relu,softplus,exp model=... model.weights=... run_dir=DIR ...`` runs
``stage=align_attention`` with each kernel into ``DIR/<kernel>`` (default ``DIR``: ``runs/kernels-<model>``) and
writes ``DIR/report/``, whose loss figures overlay the kernels' Stage-1 losses, in total and per block. Every
run is validated before the first starts; ``--check`` stops there. Without ``attention.kernel=`` it sweeps every
kernel adala has.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from adala.config import compose, override, override_key
from adala.errors import UserError

STAGE = "align_attention"
FLAGS = ("--check",)


def plan_runs(args: Sequence[str]) -> list[list[str]]:
    """The overrides of each kernel's Stage-1 run (validated later, all at once)."""
    from adala.attention.kernels import KERNELS

    unknown = [a for a in args if a.startswith("-") and a not in FLAGS]
    if unknown:
        raise UserError(f"unknown option {unknown[0]}; sweep-kernels takes --check and key=value overrides")
    overrides = [a for a in args if a not in FLAGS]
    chosen = [o for o in overrides if override_key(o) == "attention.kernel"]
    kernels = chosen[-1].split("=", 1)[1].split(",") if chosen else list(KERNELS)
    for item in overrides:
        key, value = override_key(item), item.split("=", 1)[-1]
        if (key == "stage" and value != STAGE) or key == "attention":
            raise UserError(f"{item}: sweep-kernels runs stage={STAGE} with each attention.kernel; drop {key}=")
    if len(set(kernels)) != len(kernels) or not all(kernels):
        raise UserError(f"attention.kernel={','.join(kernels)}: name each kernel once, e.g. attention.kernel=elu1,relu")
    rest = [o for o in overrides if override_key(o) not in ("attention.kernel", "stage", "run_dir")]
    root = Path(next((o.split("=", 1)[1].strip("'\"") for o in overrides if override_key(o) == "run_dir"), "")
                or f"runs/kernels-{compose(rest).model.name}")
    return [[f"stage={STAGE}", *rest, f"attention.kernel={kernel}", override("run_dir", root / kernel)]
            for kernel in kernels]


def main(args: Sequence[str]) -> None:
    from adala.eval.report import write_report
    from adala.run import run_stage, validate

    runs = plan_runs(args)
    configs = [validate(compose(overrides)) for overrides in runs]  # every run checked before the first starts
    if "--check" in args:
        for cfg in configs:
            print(f"adala: config ok: stage {cfg.stage.name}, model {cfg.model.name}, run_dir {cfg.run_dir}, "
                  f"{cfg.train.max_steps} steps")
        return
    results = [run_stage(compose(overrides)) for overrides in runs]
    report = write_report([r.run_dir for r in results], results[0].run_dir.parent / "report")
    print(f"kernel sweep: {len(results)} Stage-1 runs; report {report.page}")

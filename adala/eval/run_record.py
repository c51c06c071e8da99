"""What a finished (or running) stage run left in its directory, read without any training code: the resolved
config, the logged scalars, the final metrics and the exports."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from adala.config import Config
from adala.errors import UserError

STEP_EXPORT = re.compile(r"step-(\d+)\.safetensors$")


@dataclass
class RunRecord:
    path: Path
    cfg: Config
    log: list[dict[str, Any]]  # log.jsonl, one record per logged step
    metrics: dict[str, Any]  # metrics.json ({} when the run evaluated nothing)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def stage(self) -> str:
        return self.cfg.stage.name if self.cfg.stage is not None else "demo"

    @property
    def export(self) -> Optional[Path]:
        """The final export, if the run got that far."""
        path = self.path / "export" / "model.safetensors"
        return path if path.is_file() else None

    def step_exports(self) -> dict[int, Path]:
        """The periodic exports (``train.export_every``) by step."""
        found = (STEP_EXPORT.search(p.name) for p in (self.path / "export").glob("step-*.safetensors"))
        return {int(m[1]): self.path / "export" / m[0] for m in found if m}

    @property
    def init_export(self) -> Optional[tuple[str, int]]:
        """(run name, step) when the run started from a periodic export of another run (``step-N.safetensors``)."""
        init = self.cfg.stage.init if self.cfg.stage is not None else None
        found = STEP_EXPORT.search(init) if init else None
        return (Path(init).parent.parent.name, int(found[1])) if found else None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one logged scalar, in step order."""
        points = [(r["step"], float(r[key])) for r in self.log if key in r]
        return [s for s, _ in points], [v for _, v in points]

    def keys(self, prefix: str) -> list[str]:
        """The logged scalar names that start with ``prefix``, sorted."""
        return sorted({k for r in self.log for k in r if k.startswith(prefix)})

    def final(self) -> dict[str, float]:
        """The last logged value of every scalar, with the final metrics over them."""
        last: dict[str, float] = {}
        for record in self.log:
            last.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
        return {**last, **{k: v for k, v in self.metrics.items() if isinstance(v, (int, float))}}


def read_run(path: str | Path) -> RunRecord:
    """A run directory's record; a directory that is not one is a :class:`UserError` naming what is missing."""
    from omegaconf import OmegaConf

    path = Path(path)
    config = path / "config.yaml"
    if not config.is_file():
        raise UserError(f"{path} is not a run directory (no config.yaml); give the run_dir of a stage run")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(config)))
    log_file = path / "log.jsonl"
    log = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()] if log_file.is_file() else []
    metrics_file = path / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return RunRecord(path=path, cfg=cfg, log=log, metrics=metrics)

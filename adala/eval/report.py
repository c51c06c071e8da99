"""``adala report RUN_DIR [RUN_DIR ...]``: a folder of figures and one HTML page for one or several stage runs.

It reads what the runs left (config.yaml, log.jsonl, metrics.json, exports) and the teacher their config names;
it trains nothing. Figures: the loss of every stage with the runs overlaid, the Stage-1 loss per block, and,
where runs evaluated while training, the validation metrics against the step (and, for runs fine-tuned from
periodic exports, their final metric against the export's step). For Stage-1/2 runs with an export
it also compares each student with its teacher on a bounded number of validation images: the per-block relative
error and PCA maps of the patch features. Every figure is a PNG with its numbers beside it as JSON, and goes to
TensorBoard too (``<out>/tb``).
"""
from __future__ import annotations

import argparse
import html
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from adala.errors import UserError
from adala.eval import figures
from adala.eval.run_record import RunRecord, read_run
from adala.files import write_text_atomic

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PAGE = "index.html"


@dataclass(frozen=True)
class Report:
    out: Path
    page: Path
    figures: list[figures.Figure]


def write_report(
    run_dirs: Sequence[str | os.PathLike],
    out: Optional[str | os.PathLike] = None,
    *,
    images: Optional[str] = None,
    num_images: int = 16,
    pca_images: int = 4,
    device: str = "auto",
) -> Report:
    """Write the figures and ``index.html`` of ``run_dirs`` into ``out`` (default: ``report/`` in the run
    directory, or in the folder that holds all of them).

    ``images``: shard URLs of the validation images the students are compared on (default: the first
    ``data.val`` among the runs); the first ``num_images`` are used, the first ``pca_images`` of them for PCA.
    """
    if not run_dirs:
        raise UserError("report needs at least one run directory: adala report RUN_DIR [RUN_DIR ...]")
    if num_images < 1 or not 1 <= pca_images <= num_images:
        raise UserError(f"need 1 <= pca images ({pca_images}) <= images ({num_images})")
    runs = [read_run(path) for path in run_dirs]
    out = Path(out) if out is not None else default_out(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    from adala.eval.students import pick_device

    chosen = pick_device(device)
    made = [figures.loss_curves(runs, out)]
    if any(r.keys("loss/block") for r in runs if r.stage == "align_attention"):
        made.append(figures.stage1_blocks(runs, out))
    if any(r.keys("val/") for r in runs) or figures.exported_points(runs):
        made.append(figures.val_metrics(runs, out))
    made += _compared(runs, out, chosen, images=images, num_images=num_images, pca_images=pca_images)
    _to_tensorboard(made, out / "tb")
    page = write_text_atomic(out / PAGE, page_html(runs, made))
    return Report(out=out, page=page, figures=made)


def _compared(runs: Sequence[RunRecord], out: Path, device: torch.device, *, images: Optional[str], num_images: int,
              pca_images: int) -> list[figures.Figure]:
    """The per-block error and PCA figures of every teacher's students (none without validation images)."""
    from adala.eval.students import compare, comparisons, images_of, students_of, validation_images

    if not students_of(runs):
        return []
    urls = images_of(runs, images)
    if urls is None:
        log.warning("no validation images (no run has data.val): per-block error and PCA maps left out; "
                    "give shards with --images")
        return []
    groups = comparisons(runs, device)
    made = []
    for index, group in enumerate(groups):
        suffix = f"-{index + 1}" if len(groups) > 1 else ""
        compared = compare(group, validation_images(group.teacher_run, urls, num_images), pca_images=pca_images)
        made += [figures.block_error(compared, out, f"block_error{suffix}"), figures.pca_maps(compared, out, f"pca{suffix}")]
    return made


def default_out(run_dirs: Sequence[str | os.PathLike]) -> Path:
    """``report/`` in the one run directory, or in the deepest folder that holds all of them."""
    paths = [Path(p).resolve() for p in run_dirs]
    base = paths[0] if len(paths) == 1 else Path(os.path.commonpath(paths))
    return base / "report"


def _to_tensorboard(made: Sequence[figures.Figure], directory: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(directory))
    try:
        for figure in made:
            writer.add_image(f"report/{figure.name}", figures.as_array(figure).numpy(), 0, dataformats="HWC")
    finally:
        writer.close()


def page_html(runs: Sequence[RunRecord], made: Sequence[figures.Figure]) -> str:
    """The page: the runs' final numbers, every figure, and each run's config."""
    from adala.config import to_yaml

    shown = ("loss", "val/top1", "val/miou", "top1", "miou")
    rows = []
    for run in runs:
        final = run.final()
        cells = "".join(f"<td>{final[k]:.4g}</td>" if k in final else "<td></td>" for k in shown)
        rows.append(f"<tr><td>{html.escape(run.name)}</td><td>{html.escape(run.stage)}</td>"
                    f"<td>{final.get('step', '')}</td>{cells}</tr>")
    header = "".join(f"<th>{k}</th>" for k in ("run", "stage", "steps", *shown))
    pictures = "\n".join(f'<h2>{html.escape(f.title)}</h2>\n<p><img src="{f.png.name}" alt="{html.escape(f.title)}">'
                         f' <a href="{f.data.name}">numbers</a></p>' for f in made)
    configs = "\n".join(f"<details><summary>{html.escape(run.name)}: config.yaml</summary>"
                        f"<pre>{html.escape(to_yaml(run.cfg))}</pre></details>" for run in runs)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>adala report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} img{{max-width:100%}}</style></head>
<body><h1>adala report</h1>
<h2>final numbers</h2>
<table><tr>{header}</tr>
{chr(10).join(rows)}
</table>
{pictures}
<h2>configs</h2>
{configs}
</body></html>
"""


def main(args: Sequence[str]) -> Report:
    """The ``adala report`` command line."""
    parser = argparse.ArgumentParser(prog="adala report", description="Figures and one HTML page of stage runs: "
                                     "losses, Stage-1 losses per block, validation metrics, and each Stage-1/2 "
                                     "student against its teacher (per-block error, PCA maps).")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="stage runs (their run_dir)")
    parser.add_argument("--out", help="output folder (default: report/ in the run dir, or in the folder holding all)")
    parser.add_argument("--images", help="validation shards to compare students on (default: a run's data.val)")
    parser.add_argument("--num-images", type=int, default=16, help="images for the per-block error (default 16)")
    parser.add_argument("--pca-images", type=int, default=4, help="images shown as PCA maps (default 4)")
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda")
    parsed = parser.parse_args(list(args))
    report = write_report(parsed.run_dirs, parsed.out, images=parsed.images, num_images=parsed.num_images,
                          pca_images=parsed.pca_images, device=parsed.device)
    print(f"report: {report.page}  ({len(report.figures)} figures)")
    return report

"""The report's figures: each is one PNG with its numbers beside it as JSON (same name, ``.json``).

Figures have a fixed size per panel (no tight cropping), so a figure of R×C panels is always
``C·PANEL_PX[0]`` × ``R·PANEL_PX[1]`` pixels.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from adala.eval.students import Compared
from adala.eval.run_record import RunRecord
from adala.files import temporary, write_text_atomic

DPI = 80
PANEL_PX = (400, 300)  # a plot panel
IMAGE_PANEL_PX = (160, 160)  # an image panel of the PCA grid
MANY_LINES = 8  # a plot with more lines gets a larger panel and its legend beside it
LINE_STYLES = ("-", "--", ":", "-.")
STAGE_ORDER = ("align_attention", "align_features", "finetune_cls", "finetune_seg")
STAGE_TITLES = {"align_attention": "Stage 1: attention alignment", "align_features": "Stage 2: feature alignment",
                "finetune_cls": "Stage 3: classification", "finetune_seg": "Stage 3: segmentation"}


@dataclass(frozen=True)
class Figure:
    name: str  # the file stem: <name>.png and <name>.json
    title: str
    png: Path
    data: Path


def grid_size(rows: int, cols: int, panel: tuple[int, int] = PANEL_PX) -> tuple[int, int]:
    """The size in pixels (width, height) of a figure of ``rows`` × ``cols`` panels."""
    return cols * panel[0], rows * panel[1]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _subplots(rows: int, cols: int, panel: tuple[int, int] = PANEL_PX):
    width, height = grid_size(rows, cols, panel)
    fig, axes = _pyplot().subplots(rows, cols, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    return fig, axes


def _save(fig: Any, out: Path, name: str, title: str, panels: list[str], numbers: dict[str, Any]) -> Figure:
    """Write ``<name>.png`` and ``<name>.json`` (the panels' titles, the size and ``numbers``), each atomically."""
    png = out / f"{name}.png"
    tmp = temporary(png)
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, png)
    finally:
        tmp.unlink(missing_ok=True)
        _pyplot().close(fig)
    width, height = (int(v) for v in fig.get_size_inches() * DPI)
    record = {"title": title, "panels": panels, "width": width, "height": height, **numbers}
    data = write_text_atomic(out / f"{name}.json", json.dumps(record, indent=1) + "\n")
    return Figure(name, title, png, data)


def _columns(count: int, most: int = 4) -> tuple[int, int]:
    cols = min(count, most)
    return -(-count // cols), cols


def _panel_axes(axes: Any, count: int) -> list[Any]:
    flat = list(axes.flat)
    for spare in flat[count:]:
        spare.axis("off")
    return flat[:count]


def loss_curves(runs: Sequence[RunRecord], out: Path) -> Figure:
    """The training loss of every run, one panel per stage, the runs of a stage overlaid (e.g. paper Fig. 7)."""
    stages = [s for s in STAGE_ORDER if any(r.stage == s for r in runs)]
    stages += sorted({r.stage for r in runs} - set(stages))
    fig, axes = _subplots(*_columns(len(stages)))
    numbers: dict[str, dict[str, Any]] = {}
    for ax, stage in zip(_panel_axes(axes, len(stages)), stages):
        numbers[stage] = {}
        for run in (r for r in runs if r.stage == stage):
            steps, values = run.series("loss")
            numbers[stage][run.name] = {"step": steps, "loss": values}
            ax.plot(steps, values, label=run.name, linewidth=1.2)
        _style(ax, STAGE_TITLES.get(stage, stage), "step", "loss", log=stage in STAGE_ORDER[:2])
    fig.suptitle("training loss")
    fig.tight_layout()
    return _save(fig, out, "loss", "training loss of every stage", [STAGE_TITLES.get(s, s) for s in stages],
                 {"runs": numbers})


def stage1_blocks(runs: Sequence[RunRecord], out: Path) -> Figure:
    """The Stage-1 loss of every block, one panel per block, the runs overlaid (e.g. one per φ kernel)."""
    stage1 = [r for r in runs if r.stage == "align_attention"]
    blocks = sorted({k for r in stage1 for k in r.keys("loss/block")})
    fig, axes = _subplots(*_columns(len(blocks)))
    numbers: dict[str, dict[str, Any]] = {}
    for ax, key in zip(_panel_axes(axes, len(blocks)), blocks):
        numbers[key] = {}
        for run in stage1:
            steps, values = run.series(key)
            numbers[key][run.name] = {"step": steps, "loss": values}
            ax.plot(steps, values, label=run.name, linewidth=1.2)
        _style(ax, f"block {int(key.removeprefix('loss/block'))}", "step", "attention MSE", log=True)
    fig.suptitle("Stage 1: attention alignment loss per block")
    fig.tight_layout()
    return _save(fig, out, "stage1_blocks", "Stage-1 loss per block", [k.removeprefix("loss/") for k in blocks],
                 {"runs": numbers})


def block_error(compared: Compared, out: Path, name: str = "block_error") -> Figure:
    """The relative error of every block's output against the teacher's, for each student (paper App. B)."""
    many = len(compared.block_errors) > MANY_LINES
    fig, axes = _subplots(1, 1, (PANEL_PX[0] * 2, PANEL_PX[1] * 3 // 2) if many else PANEL_PX)
    ax = axes[0, 0]
    # Students whose labels start with the same word (an attention compared under several protocols) share a
    # colour and differ in line style, so that many students stay apart.
    groups = list(dict.fromkeys(label.split()[0] for label in compared.block_errors))
    colours = _pyplot().get_cmap("tab10" if len(groups) <= 10 else "tab20")
    drawn: dict[str, int] = {}
    for label, errors in compared.block_errors.items():
        group = label.split()[0]
        style = LINE_STYLES[drawn.get(group, 0) % len(LINE_STYLES)]
        drawn[group] = drawn.get(group, 0) + 1
        ax.plot(range(len(errors)), errors, marker="o", label=label, linewidth=1.2, linestyle=style,
                color=colours(groups.index(group) % colours.N))
    _style(ax, "error accumulation", "block", "‖student − teacher‖ / ‖teacher‖", log=False)
    if many:  # beside the plot, not over it
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.set_ylim(bottom=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return _save(fig, out, name, "per-block relative error against the teacher", ["error accumulation"],
                 {"block_errors": compared.block_errors})


def pca_maps(compared: Compared, out: Path, name: str = "pca") -> Figure:
    """For each image: the input, the teacher's PCA map and every student's, fitted on the teacher."""
    columns = ["input", *compared.pca]
    rows = len(compared.images)
    fig, axes = _subplots(rows, len(columns), IMAGE_PANEL_PX)
    for row in range(rows):
        for col, label in enumerate(columns):
            ax = axes[row, col]
            picture = compared.images[row] if label == "input" else compared.pca[label][row]
            ax.imshow(picture.numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.25 / rows, wspace=0.05, hspace=0.05)
    return _save(fig, out, name, "PCA of patch features (fitted on the teacher)", columns,
                 {"rgb_mean": {label: maps.mean(dim=(1, 2)).tolist() for label, maps in compared.pca.items()}})


def exported_points(runs: Sequence[RunRecord]) -> dict[str, dict[str, dict[str, list]]]:
    """metric -> the run whose periodic exports were fine-tuned -> {"step": export steps, "value": final metric}."""
    points: dict[str, dict[str, dict[str, list]]] = {}
    for run in sorted((r for r in runs if r.init_export is not None), key=lambda r: r.init_export[1]):
        source, step = run.init_export
        for metric in ("top1", "miou"):
            if metric in run.metrics:
                entry = points.setdefault(metric, {}).setdefault(source, {"step": [], "value": []})
                entry["step"].append(step)
                entry["value"].append(run.metrics[metric])
    return points


def val_metrics(runs: Sequence[RunRecord], out: Path) -> Figure:
    """Validation metrics against the step, for runs that evaluated while training, and the final metric of runs
    fine-tuned from periodic exports against the step of their export (paper Fig. 10)."""
    keys = sorted({k for r in runs for k in r.keys("val/")})
    numbers: dict[str, dict[str, Any]] = {}
    for key in keys:
        numbers[key] = {}
        for run in runs:
            steps, values = run.series(key)
            if steps:
                numbers[key][run.name] = {"step": steps, "value": values}
    exported = exported_points(runs)
    numbers.update({f"{metric} by export": by_run for metric, by_run in exported.items()})
    panels = list(numbers)
    fig, axes = _subplots(*_columns(len(panels)))
    for ax, panel in zip(_panel_axes(axes, len(panels)), panels):
        for name, series in numbers[panel].items():
            ax.plot(series["step"], series["value"], marker="o", label=name, linewidth=1.2)
        by_export = panel.endswith(" by export")
        _style(ax, panel, "step of the fine-tuned export" if by_export else "step", panel.split()[0].removeprefix("val/"),
               log=False)
    fig.tight_layout()
    return _save(fig, out, "val_metrics", "validation metrics while training and by export", panels, {"runs": numbers})


def _style(ax: Any, title: str, xlabel: str, ylabel: str, *, log: bool) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if log:
        ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    ax.grid(alpha=0.3)


def as_array(figure: Figure) -> torch.Tensor:
    """The figure's pixels (H, W, 3), uint8, as TensorBoard takes them."""
    from PIL import Image

    import numpy as np

    with Image.open(figure.png) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy())

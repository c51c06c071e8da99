"""Students beside their teacher on validation images: the models a report compares and what it computes on them.

A run of Stage 1 or 2 names its teacher (``model.weights``, the original softmax ViT) in its config and holds its
student in ``export/model.safetensors``. Runs with the same teacher form one comparison, together with the
teacher linearized without any alignment (the starting point both stages improve on). Everything is computed on
a bounded number of validation images, on the GPU when there is one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from adala.errors import UserError
from adala.eval.block_error import relative_block_errors
from adala.eval.pca import PatchPCA, patch_tokens
from adala.eval.run_record import RunRecord
from adala.models import build_vfm, model_spec, read_export_metadata

ALIGNMENT_STAGES = ("align_attention", "align_features")  # the runs whose export is a student of their teacher
LINEARIZED = "linearized teacher"  # the label of the student no stage has trained


@dataclass
class Comparison:
    """Students of one teacher: (label, model) in the order they are shown."""

    teacher_run: RunRecord  # the first run of the group: its model entry, resolution and data
    teacher: nn.Module
    students: list[tuple[str, nn.Module]]


@dataclass
class Compared:
    """What a report shows of one comparison."""

    block_errors: dict[str, list[float]]  # label -> relative error of every block's output
    images: torch.Tensor  # (n, H, W, 3) in [0, 1]: the inputs of the PCA maps
    pca: dict[str, torch.Tensor]  # "teacher" and every student label -> (n, rows, cols, 3) in [0, 1]


def students_of(runs: Sequence[RunRecord]) -> list[RunRecord]:
    """The alignment runs among ``runs`` that have an export and name their teacher."""
    return [r for r in runs if r.stage in ALIGNMENT_STAGES and r.export is not None and r.cfg.model.weights]


def comparisons(runs: Sequence[RunRecord], device: torch.device) -> list[Comparison]:
    """One comparison per teacher among the students in ``runs`` (other runs are left out)."""
    groups: dict[tuple, list[RunRecord]] = {}
    for run in students_of(runs):
        model = run.cfg.model
        groups.setdefault((model.name, model.weights, model.img_size), []).append(run)
    found = []
    for members in groups.values():
        first = members[0]
        spec, model = model_spec(first.cfg.model), first.cfg.model

        def build(**kwargs) -> nn.Module:
            return build_vfm(spec, img_size=model.img_size, **kwargs).to(device).eval().requires_grad_(False)

        teacher = build(weights=model.weights, attention={"kind": "softmax"})
        # the teacher linearized as the students are (their export records their attention), without alignment
        linearized = build(weights=model.weights, attention=read_export_metadata(first.export)["attention"])
        students = [(LINEARIZED, linearized)] + [(run.name, build(weights=run.export)) for run in members]
        found.append(Comparison(first, teacher, students))
    return found


def validation_images(run: RunRecord, urls: str, count: int) -> torch.Tensor:
    """The first ``count`` images of the shards ``urls``, transformed as the run evaluates (normalised)."""
    from adala.data.pipeline import eval_stream, resolve_data
    from adala.data.transforms import build_transform

    cfg = run.cfg
    spec = model_spec(cfg.model)
    plan = resolve_data(dataclasses.replace(cfg.data, train=None, val=urls, workers=0))
    transform = build_transform(cfg.data.eval_transform, img_size=cfg.model.img_size, mean=spec.mean, std=spec.std)
    taken: list[torch.Tensor] = []
    for batch in eval_stream(plan, fields=("image",), transform=transform, batch_size=count, rank=0, world_size=1):
        taken.append(batch["image"])
        if sum(len(t) for t in taken) >= count:
            break
    if not taken:
        raise ValueError(f"no images in {urls}")
    return torch.cat(taken)[:count]


def compare(comparison: Comparison, images: torch.Tensor, *, pca_images: int, batch_size: int = 8) -> Compared:
    """Per-block errors on all ``images``; PCA maps of the first ``pca_images``, fitted on the teacher."""
    device = next(comparison.teacher.parameters()).device

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(images), batch_size):
            yield images[start:start + batch_size].to(device)

    errors = {label: relative_block_errors(comparison.teacher, student, batches())
              for label, student in comparison.students}
    shown = images[:pca_images].to(device)
    teacher_tokens = patch_tokens(comparison.teacher, shown)
    pca = PatchPCA.fit(teacher_tokens)
    maps = {"teacher": pca.rgb(teacher_tokens).cpu()}
    maps.update({label: pca.rgb(patch_tokens(student, shown)).cpu() for label, student in comparison.students})
    spec = model_spec(comparison.teacher_run.cfg.model)
    return Compared(errors, unnormalise(images[:pca_images], spec.mean, spec.std), maps)


def unnormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised (n, 3, H, W) images back to (n, H, W, 3) colours in [0, 1]."""
    shape = (1, -1, 1, 1)
    pixels = images.float().cpu() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    return pixels.clamp(0, 1).permute(0, 2, 3, 1)


def pick_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda: no GPU is visible here; use auto or cpu")
    return torch.device(name)


def images_of(runs: Sequence[RunRecord], given: Optional[str]) -> Optional[str]:
    """Where the compared images come from: ``given``, else the first run's ``data.val`` among ``runs``."""
    return given or next((run.cfg.data.val for run in runs if run.cfg.data.val), None)

"""Directly adapting a task model (paper §4.3.3): Stages 1–2 with a fine-tuned softmax task model as the teacher.

``stage.task_model=true`` on ``align_attention`` or ``align_features`` makes ``model.weights`` a Stage-3 export of a
softmax model (``finetune_cls``: a classifier; ``finetune_seg``: a segmenter with its ``linear`` or ``mask2former``
head). Its export metadata say which task, head and class count it has; validation reads them once and fills in
``data.num_classes`` / ``data.num_seg_classes`` and ``stage.head``, refusing anything that contradicts them.

The teacher is the task model's softmax backbone; the student is the same task model with linear attention. The
backbone aligns as in the foundation-model route (Stage 1 per block, Stage 2 on the final features); the head is
copied from the teacher and stays frozen: the paper's alignment losses (Eq. 3, Eq. 4) are on the backbone's
attention outputs and final features alone, so the head has nothing to learn there, and keeping the teacher's head
is what lets the student inherit its task-specific priors. With ``data.val`` the task metric (top-1 or mIoU) of the
student is evaluated during alignment (``train.eval_every``) and at the end, and the export is a complete
linear-attention task model with the metadata of a Stage-3 export, so every evaluator takes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import nn

from adala.errors import UserError
from adala.models import build_vfm, model_spec, read_export_metadata
from adala.models.weights import read_state_dict
from adala.stages.common import strip_prefix
from adala.stages.seg_heads import stored_options

TASK_STAGES = ("finetune_cls", "finetune_seg")


@dataclass(frozen=True)
class Task:
    """What the teacher export is a model for: the Stage-3 ``stage`` that trained it, its classes and head."""

    stage: str  # finetune_cls | finetune_seg
    num_classes: int
    seg_head: Optional[str] = None  # finetune_seg: linear | mask2former
    mask2former: Optional[dict[str, Any]] = None  # a Mask2Former head's sizes as the export recorded them

    @property
    def fields(self) -> tuple[str, ...]:
        """The validation fields the task metric reads."""
        return ("image", "label") if self.stage == "finetune_cls" else ("image", "mask")

    @property
    def metadata(self) -> dict[str, Any]:
        """The export metadata that make an export a task model (as Stage 3 writes them)."""
        if self.stage == "finetune_cls":
            return {"num_classes": self.num_classes}
        return {"num_seg_classes": self.num_classes, "seg_head": self.seg_head,
                **({"mask2former": self.mask2former} if self.mask2former is not None else {})}

    def metric(self) -> Callable[[], Any]:
        from adala.eval import MeanIoU, Top1
        from adala.stages.seg_heads import IGNORE_INDEX

        return Top1 if self.stage == "finetune_cls" else partial(MeanIoU, self.num_classes, ignore_index=IGNORE_INDEX)


def task_of(cfg: Any) -> Optional[Task]:
    """The task of ``model.weights`` when ``stage.task_model`` is set (None otherwise); a :class:`UserError` names
    the fix when the file is not a softmax task model or contradicts the config."""
    if not cfg.stage.task_model:
        return None
    path = cfg.model.weights
    if path is None:
        raise UserError("stage.task_model=true adapts a fine-tuned task model; set model.weights=PATH to its "
                        "finetune_cls or finetune_seg export")
    meta = read_export_metadata(path) or {}
    stage = meta.get("stage")
    classes = int(meta.get("num_classes" if stage == "finetune_cls" else "num_seg_classes") or 0)
    if stage not in TASK_STAGES or classes <= 0:
        raise UserError(f"stage.task_model=true needs model.weights to be a task model (a finetune_cls or "
                        f"finetune_seg export with its head); {path} is {_what(meta)}: drop stage.task_model to "
                        "align to a foundation model, or point model.weights at a task export")
    if (meta.get("attention") or {}).get("kind", "softmax") != "softmax":
        raise UserError(f"stage.task_model=true: {path} has {meta['attention']['kind']} attention; the teacher must "
                        "be a softmax task model (fine-tune it with attention=softmax)")
    if stage == "finetune_cls":
        return Task(stage, classes)
    return Task(stage, classes, meta.get("seg_head"), meta.get("mask2former"))


def _what(meta: dict[str, Any]) -> str:
    if not meta:
        return "a plain weight file without adala metadata"
    return f"an export of stage {meta.get('stage', 'unknown')} without a task head"


def check_task(cfg: Any) -> Optional[Task]:
    """Validation of the task route: the teacher is a task model, the config agrees with its head and classes
    (filled in where unset), and evaluation reads whole images one at a time for segmentation."""
    task = task_of(cfg)
    if task is None:
        return None
    key = "num_classes" if task.stage == "finetune_cls" else "num_seg_classes"
    given = getattr(cfg.data, key)
    if given and given != task.num_classes:
        raise UserError(f"data.{key}={given}, but the task model {cfg.model.weights} "
                        f"has {task.num_classes} classes; set data.{key}={task.num_classes} or use that task's data")
    setattr(cfg.data, key, task.num_classes)
    if task.stage == "finetune_seg":
        if cfg.stage.head != task.seg_head and cfg.stage.head != "linear":  # linear: the schema's default
            raise UserError(f"stage.head={cfg.stage.head}, but the task model has a {task.seg_head} head; drop "
                            "stage.head (it is read from the export)")
        cfg.stage.head = task.seg_head
        cfg.stage.mask2former = stored_options(task.metadata, cfg.stage.mask2former)  # the head is the teacher's
        if cfg.stage.eval_batch_size is None:
            cfg.stage.eval_batch_size = 1  # whole images of different sizes, as finetune_seg evaluates
    return task


def eval_fields(cfg: Any) -> Optional[tuple[str, ...]]:
    """The fields a stage's evaluation reads in the task route (None: the stage does not evaluate)."""
    task = task_of(cfg)
    return task.fields if task is not None else None


def build_student(cfg: Any, task: Task, weights: Optional[str], attention: dict[str, Any]) -> nn.Module:
    """The task model with ``attention``: the backbone from ``weights``, the head copied from the teacher
    (``model.weights``) and frozen. A :class:`~adala.stages.finetune_cls.Classifier` or
    :class:`~adala.stages.finetune_seg.Segmenter`, evaluated as Stage 3 evaluates."""
    spec = model_spec(cfg.model)
    if task.stage == "finetune_cls":
        from adala.stages.finetune_cls import Classifier

        vit = build_vfm(spec, img_size=cfg.model.img_size, weights=weights, num_classes=task.num_classes,
                        attention=attention)
        model: nn.Module = Classifier(vit)
        head, prefix = vit.head, "head."
    else:
        from adala.stages.finetune_seg import Segmenter, window
        from adala.stages.seg_heads import build_head

        backbone = build_vfm(spec, img_size=cfg.model.img_size, weights=weights, attention=attention)
        head = build_head(task.seg_head, embed_dim=backbone.embed_dim, depth=len(backbone.blocks),
                          num_classes=task.num_classes, options=cfg.stage.mask2former)
        model, prefix = Segmenter(backbone, task.num_classes, head, window=window(cfg)), "seg_head."
    try:
        head.load_state_dict(strip_prefix(read_state_dict(cfg.model.weights), prefix))
    except RuntimeError as err:  # a Mask2Former head fine-tuned with other sizes than stage.mask2former's
        detail = [line.strip() for line in str(err).splitlines()[1:] if line.strip()][:1]
        raise UserError(f"the {task.seg_head} head of the task model {cfg.model.weights} does not fit the student's "
                        f"({detail[0] if detail else err}); its export does not record the head's sizes: give the "
                        "stage.mask2former.* sizes it was fine-tuned with") from None
    head.requires_grad_(False)
    return model


def backbone_of(model: nn.Module) -> nn.Module:
    """The ViT inside a task model (or ``model`` itself)."""
    for name in ("vit", "backbone"):  # Classifier.vit, Segmenter.backbone
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return model


def export_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A task model's state with the layout of a Stage-3 export: timm's key names, a segmentation head under
    ``seg_head.``."""
    return {key.removeprefix("vit.").removeprefix("backbone."): value for key, value in state.items()}


class Predictor:
    """Evaluation of a Stage-1 student: the task model whose aligned blocks' attention are the trained branches
    themselves (shared modules, so it predicts with the weights as they are now). Kept out of the trained
    module's tree, so it is neither trained nor checkpointed; it follows the branches' device when used."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, batch: dict[str, Any]) -> Any:
        device = batch["image"].device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        return self.model.train(False)(batch)


def stage1_student(cfg: Any, task: Task, branches: nn.ModuleDict) -> Predictor:
    """The Stage-1 student as a task model: the teacher's weights, each aligned block's attention its branch."""
    from adala.models.linearize import track_token_layout

    student = build_student(cfg, task, cfg.model.weights, {"kind": "softmax"}).requires_grad_(False)
    vit = backbone_of(student)
    for index, branch in branches.items():
        vit.blocks[int(index)].attn = branch
    track_token_layout(vit)
    return Predictor(student)

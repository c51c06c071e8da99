"""The training stages. Each module has ``FIELDS`` (what it reads from the data), ``STREAM`` (how it reads it) and
``build(cfg, attention) -> StageParts``, where ``attention`` is the trained model's attention as validation
normalised it (``adala.run.validate_run``)."""
from __future__ import annotations

from types import ModuleType

from adala.errors import UserError
from adala.stages import align_attention, align_features, finetune_cls, finetune_seg

STAGES: dict[str, ModuleType] = {
    "align_attention": align_attention,
    "align_features": align_features,
    "finetune_cls": finetune_cls,
    "finetune_seg": finetune_seg,
}


def get_stage(name: str) -> ModuleType:
    try:
        return STAGES[name]
    except KeyError:
        raise UserError(f"unknown stage {name!r}; choose one of: {', '.join(STAGES)}") from None


__all__ = ["STAGES", "get_stage"]

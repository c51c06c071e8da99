"""The configuration schema, Hydra composition and up-front validation.

Every config group maps to one dataclass here; composition merges the YAML files under ``conf/`` with the
user's overrides, the schema rejects unknown keys and wrong types, and :func:`validate` checks what the schema
cannot (model names, resolutions, files) before any work starts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from adala.errors import UserError
from adala.paths import config_dir

CONFIG_DIR = config_dir()


@dataclass
class ModelConfig:
    """A model is configuration (``conf/model/<name>.yaml``): any timm VisionTransformer with its paper settings.

    ``adala.models.model_spec`` turns it into the spec the code builds from, filling the fields left None from timm.
    """

    name: str = "demo_tiny"
    timm_id: Optional[str] = None  # timm model name (a VisionTransformer), with or without a .tag
    description: str = ""
    alpha: float = 1.0  # Stage-2 loss weight α (paper Table 5)
    align_features_epochs: float = 1.0  # Stage-2 epochs on the pretraining data (paper Table 5)
    mean: Optional[list[float]] = None  # None: the timm model's pretrained config
    std: Optional[list[float]] = None  # None: the timm model's pretrained config
    patch_size: Optional[int] = None  # None: read from the timm model
    native_img_size: Optional[int] = None  # resolution of the pretrained weights; None: timm's default
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    img_size: Optional[int] = None  # None: native_img_size
    weights: Optional[str] = None  # the original (softmax) VFM weights; None: random initialisation


def default_attention() -> dict[str, Any]:
    """``attention``: ``kind`` (softmax or a plug of adala.attention), the plug's settings as further keys (see
    ``conf/attention/<kind>.yaml``; checked against the plug by validation, so any plug's keys fit here) and
    ``softmax_blocks``, the blocks that keep softmax attention."""
    return {"kind": "linear", "softmax_blocks": []}


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    schedule: str = "constant"  # constant | poly
    power: float = 0.9
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = None
    backbone_lr_scale: float = 1.0


@dataclass
class StageConfig:
    name: str = "align_attention"
    init: Optional[str] = None  # the previous stage's export; None: start from model.weights
    batch_size: int = 16
    epochs: Optional[float] = None  # with data.train_samples, sets train.max_steps when that is not given
    alpha: Optional[float] = None  # align_features: loss weight; None: the model's α
    trainable: Optional[str] = None  # align_features: all | qkv (only Q/K/V train, paper Table 9); others: None
    transform: str = "align"
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: Optional[str] = None  # align_attention: output | head_outputs | attention_scores; None: the plug's
    task_model: bool = False  # align_*: model.weights is a fine-tuned softmax task model; the student keeps its head
    lora: Optional[int] = None  # align_features, finetune_*: > 0 trains rank-`lora` adapters on qkv and proj instead;
    # 0: none; None: the plug's recipe (attention=lolcats: 8), else none
    lora_alpha: Optional[float] = None  # LoRA scale alpha / rank; None: the plug's recipe, else 16
    eval_batch_size: Optional[int] = None  # None: batch_size; finetune_seg evaluates whole images, one at a time
    head: str = "linear"  # finetune_seg: linear (BatchNorm + 1x1 conv on the last block) | mask2former (adala[seg])
    eval_crop: Optional[int] = None  # finetune_seg: sliding-window crop; None: model.img_size; 0: whole images
    eval_stride: Optional[int] = None  # finetune_seg: sliding-window stride; None: 2/3 of the crop
    mask2former: Mask2FormerOptions = field(default_factory=lambda: Mask2FormerOptions())


@dataclass
class Mask2FormerOptions:
    """The Mask2Former head of finetune_seg (``adala.stages.mask2former``); defaults: the Mask2Former paper's."""

    blocks: Optional[list[int]] = None  # ViT blocks feeding the 4 pyramid levels, fine to coarse; None: spread evenly
    hidden_dim: int = 256
    num_queries: int = 100
    decoder_layers: int = 9  # masked-attention decoder layers
    encoder_layers: int = 6  # deformable-attention layers of the pixel decoder
    feedforward: int = 2048
    train_points: int = 12544  # points sampled per mask for the matching and the mask losses


@dataclass
class DataConfig:
    """Shards and how they are read (``adala.data.pipeline``); ``conf/data/*.yaml`` fill it per data set."""

    name: str = "demo"
    train: Optional[str] = None  # shard URLs: paths, http(s):// or pipe: commands; brace patterns, `::` joins lists
    val: Optional[str] = None
    train_samples: Optional[int] = None  # samples in one pass over data.train (the shards' manifest, if any, wins)
    num_classes: int = 0
    num_seg_classes: int = 0
    shuffle_buffer: int = 1000  # samples shuffled in memory per reader; 0: read in shard order
    workers: int = 0  # DataLoader worker processes per rank; 0: read in the training process
    http_timeout: float = 60.0  # seconds an http(s) shard may take to connect or to send the next bytes
    http_retries: int = 2  # further attempts to open an http(s) shard before it is skipped
    train_transform: Optional[str] = None  # None: the stage's own (stage.transform)
    eval_transform: str = "eval"
    crop_size: Optional[int] = None  # segmentation: the protocol's training crop, model.img_size's default
    scale: Optional[list[int]] = None  # segmentation: [long, short] an image is resized to fit (evaluation), x0.5-2 (training)
    cat_max_ratio: float = 1.0  # seg_train: redraw a crop (up to 10 times) where one class covers this share or more


@dataclass
class TrainConfig:
    max_steps: Optional[int] = None
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    progress: bool = True  # a progress bar, only when stderr is a terminal
    eval_every: int = 0  # evaluate on data.val every this many steps (0: only at the end); keeps the best export
    export_every: int = 0  # write an export every this many steps (0: only at the end)
    max_nonfinite_steps: int = 5  # a non-finite loss skips its step; this many in a row stop the run


@dataclass
class StrategyConfig:
    """How the trained model is distributed (``adala.engine.strategies``); launch several processes with torchrun."""

    name: str = "single"  # single | ddp | fsdp | deepspeed
    teacher: str = "auto"  # the frozen teacher: replicate | shard (FSDP, freed after each block) | auto (by free memory)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile each block
    cpu_offload: bool = False  # fsdp: parameters, gradients and optimizer state in host memory; deepspeed: optimizer
    zero_stage: int = 2  # deepspeed: 2 (gradients and optimizer state sharded) | 3 (parameters too)
    deepspeed_config: Optional[str] = None  # deepspeed: a JSON file merged over the generated config


@dataclass
class DemoConfig:
    """Sizes of the built-in demo (``python -m adala`` with no stage)."""

    run_dir: str = "runs/demo"  # the stage runs of every variant and report.json
    cache_dir: Optional[str] = None  # None: $ADALA_CACHE or ~/.cache/adala
    pretrain_samples: int = 20000
    finetune_samples: int = 2000
    val_samples: int = 1000
    samples_per_shard: int = 1000  # smaller shards let more ranks and workers read a split in epoch mode
    teacher_steps: int = 500
    teacher_batch_size: int = 64
    teacher_lr: float = 1e-3
    align_attention_steps: int = 100
    align_attention_lr: float = 1e-2  # the paper's Stage-1 lr
    align_features_steps: int = 300
    align_features_lr: float = 1e-3  # the paper's Stage-2 lr
    align_batch_size: int = 32
    finetune_steps: int = 150
    finetune_batch_size: int = 32
    finetune_lr: float = 1e-3
    seg: str = "linear"  # the Stage-3 segmentation head of every variant: linear | mask2former | both
    mask2former_steps: Optional[int] = None  # Stage-3 steps with the Mask2Former head; None: finetune_steps
    adapt_task: bool = False  # also Stages 1-2 with the fine-tuned softmax segmenter as teacher (paper 4.3.3)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: dict[str, Any] = field(default_factory=default_attention)
    stage: Optional[StageConfig] = None  # None: run the built-in demo
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    run_dir: Optional[str] = None  # None: runs/<stage>-<model>; the demo's is demo.run_dir
    resume: str = "none"  # none | auto | path to a checkpoints/step-N directory
    overwrite: bool = False  # a fresh run into a run_dir holding checkpoints or an export: remove them first


def compose(overrides: Sequence[str] = ()) -> Config:
    """Compose ``conf/config.yaml`` with Hydra-style overrides and check it against the schema."""
    for item in overrides:
        key = override_key(item)
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            raise UserError(f"{item}: hydra.* overrides are not supported (adala runs no Hydra job: no output or "
                            "working directory, no sweeps); remove it, and set run_dir=DIR for the output")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="adala_schema", node=Config)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            raw = hydra_compose(config_name="config", overrides=list(overrides))
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        cfg = OmegaConf.to_object(merged)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_explain(err)) from None
    except AssertionError:  # OmegaConf's way of refusing a key under an unselected (null) group
        raise UserError(
            "an override sets a key of a config group that is not selected; select it first, "
            "e.g. stage=align_attention stage.batch_size=8"
        ) from None
    assert isinstance(cfg, Config)
    return cfg


def override(key: str, value: object) -> str:
    """A Hydra override ``key=value`` with the value quoted, so paths with braces or ``=`` pass unchanged."""
    text = str(value)
    if '"' in text:
        raise UserError(f"{key}: values containing a double quote are not supported ({text})")
    return f'{key}="{text}"'


def override_key(item: str) -> str:
    """The key a Hydra override sets: ``+train.seed=1`` -> ``train.seed``, ``model=clip_l`` -> ``model``."""
    return item.lstrip("+~").split("=", 1)[0]


def without_attention(overrides: Sequence[str]) -> list[str]:
    """``overrides`` less those that choose the attention or set its keys: the user's plug and its settings do not
    apply to the runs that keep softmax attention (a pipeline's or the demo's teacher)."""
    return [item for item in overrides if override_key(item).split(".", 1)[0] != "attention"]


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def options(group: str) -> list[str]:
    """The choices of a config group: the YAML files in ``conf/<group>/``."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _unknown_key(key: str) -> str:
    if key.startswith("attention."):
        return (f"{key} is not a setting of the chosen attention; its settings are the keys of its "
                "conf/attention/<name>.yaml (choose the attention first, e.g. attention=nystrom attention.landmarks=64)")
    return (f"unknown config key {key!r}; check its spelling against `python -m adala --cfg` "
            "(config groups are chosen as group=option, e.g. model=dinov2_l)")


def _explain(err: Exception) -> str:
    """One line for a composition error, naming the fix."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if isinstance(err.__cause__, Exception) and getattr(err.__cause__, "full_key", None):
        err = err.__cause__  # "Error merging override k=v" wraps the validation error that says why
    if isinstance(err, (ConfigAttributeError, ConfigKeyError)) and getattr(err, "full_key", None):
        return _unknown_key(err.full_key)
    text = str(err).strip() or type(err).__name__
    missing_option = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if missing_option:
        group, option = missing_option.groups()
        return f"unknown {group} {option!r}; choose one of: {', '.join(options(group))}"
    bad_key = re.search(r"Could not override '([^']+)'", text)
    if bad_key:
        return _unknown_key(bad_key.group(1))
    first = text.splitlines()[0].rstrip(".")
    if "mismatched input" in text or "token recognition error" in text:
        return (f"cannot parse an override ({first}); quote values with braces or special characters, "
                "e.g. 'data.train=\"/data/train-{000000..000099}.tar\"'")
    key = getattr(err, "full_key", None)
    return f"{key}: {first}" if key else f"{first}; see `python -m adala --help`"

"""DeepSpeed ZeRO-2/3. The engine's config is generated from the run's settings; a user's own DeepSpeed JSON
(``strategy.deepspeed_config``) is merged over it. Only the trained model enters the engine: the frozen teacher
stays outside it and outside its optimizer.

Checkpoints use DeepSpeed's own format, which resumes on the same number of ranks. For another number, convert
the checkpoint to DeepSpeed's universal format (``python -m deepspeed.checkpoint.ds_to_universal``) and resume
with ``{"checkpoint": {"load_universal": true}}`` in ``strategy.deepspeed_config``, or consolidate its weights with
the ``zero_to_fp32.py`` script saved beside it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from adala.engine.optim import build_optimizer
from adala.engine.strategies.base import ParamGroups, Strategy, vits
from adala.errors import UserError, require_extra

TAG = "zero"


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged into ``base``, nested dictionaries key by key."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_user_config(path: Optional[str]) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path) as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"strategy.deepspeed_config={path}: {err}; point it at a DeepSpeed JSON file") from None
    if "scheduler" in config:
        raise UserError(f"{path} sets a DeepSpeed 'scheduler'; remove it, the lr schedule comes from stage.optim")
    return config


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    checkpoint_format = "deepspeed"
    needs_process_group = True

    def __init__(self, cfg: Any, *, device: str = "auto", precision: str = "fp32", batch_size: int = 1) -> None:
        if device == "cpu" or device == "auto" and not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.user_config = read_user_config(cfg.deepspeed_config)
        super().__init__(cfg, device=device, precision=precision, batch_size=batch_size)
        require_extra("deepspeed", "strategy=deepspeed")
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")

    def engine_config(self, *, batch_size: int, max_grad_norm: Optional[float]) -> dict[str, Any]:
        zero: dict[str, Any] = {"stage": self.cfg.zero_stage}
        if self.cfg.cpu_offload:
            zero["offload_optimizer"] = {"device": "cpu"}
        generated = {
            "train_micro_batch_size_per_gpu": batch_size,
            "gradient_accumulation_steps": 1,
            "zero_optimization": zero,
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16"},
            "gradient_clipping": max_grad_norm or 0.0,
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1,
        }
        return merge(generated, self.user_config)

    def prepare(
        self, model: nn.Module, param_groups: ParamGroups, *, lr: float, weight_decay: float, max_grad_norm: Optional[float]
    ) -> tuple[nn.Module, Any]:
        import deepspeed

        self._block_options(model)
        model.to(self.device)
        if self.cfg.zero_stage == 3:
            _register_vit_parameters(model)
        groups = param_groups(model)
        config = self.engine_config(batch_size=self.batch_size, max_grad_norm=max_grad_norm)
        client = None if "optimizer" in config else build_optimizer(groups, lr=lr, weight_decay=weight_decay)
        self.memory.count_trainable(model, param_shards=self.world_size if self.cfg.zero_stage == 3 else 1,
                                    state_shards=self.world_size)
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=client, model_parameters=None if client else groups, config=config
        )
        return engine, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        model.backward(loss)

    def optimizer_step(self, model: nn.Module, optimizer: Any, max_grad_norm: Optional[float]) -> Optional[float]:
        model.step()
        norm = model.get_global_grad_norm()
        return None if norm is None or not max_grad_norm else float(norm)

    def skip_step(self, model: nn.Module, optimizer: Any) -> None:
        model.zero_grad()

    def save_state(self, directory: Path, model: nn.Module, optimizer: Any) -> None:
        model.save_checkpoint(str(directory), tag=TAG, save_latest=False)

    @classmethod
    def check_world_size(cls, path: Path, *, saved: int, current: int, cfg: Any) -> None:
        universal = read_user_config(cfg.deepspeed_config).get("checkpoint", {}).get("load_universal", False)
        if saved != current and not universal:
            raise UserError(
                f"{path} is a DeepSpeed checkpoint from {saved} ranks and this run has {current}; resume with "
                f"{saved} ranks, or convert it with `python -m deepspeed.checkpoint.ds_to_universal` and set "
                "checkpoint.load_universal in strategy.deepspeed_config"
            )

    def load_state(self, directory: Path, model: nn.Module, optimizer: Any, saved_world_size: int) -> None:
        self.check_world_size(directory.parent, saved=saved_world_size, current=self.world_size, cfg=self.cfg)
        path, _ = model.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {directory}")

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """fp32 master weights of the trained parameters (gathered from the ZeRO partitions), the frozen ones and
        the buffers; every rank takes part, the main rank keeps the result."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.unwrap(model)
        keys = module.state_dict().keys()
        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            if key in params and params[key].requires_grad:
                value = safe_get_full_fp32_param(params[key])
            elif key in params:
                with deepspeed.zero.GatheredParameters([params[key]], enabled=hasattr(params[key], "ds_id")):
                    value = params[key].data.clone()
            else:
                value = buffers[key]
            out[key] = value.detach().float().cpu() if value.is_floating_point() else value.detach().cpu()
        return out if self.is_main else {}


def _register_vit_parameters(model: nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters when its ``forward`` is called. Stages call a ViT's
    ``forward_features``, which reads the ViT's own tokens and position embeddings directly, so these are
    registered with the root module, whose forward encloses every such call."""
    import deepspeed

    for vit in vits(model):
        for param in vit.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(model, param)

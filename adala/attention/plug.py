"""The base of adala's drop-in attentions ("plugs"): each replaces timm's ``Attention`` in place.

A plug keeps timm's parameter names (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``proj``), so a softmax block's
weights load into it strictly and a converted model saves with timm key names; a plug's own parameters (feature
maps, projections, convolutions) sit beside them under names of its own. Subclasses set:

- ``name``: the registry name (``attention=<name>``; ``attn_layer="adala_<name>"`` in timm);
- ``defaults``: the plug's own settings and their default values (JSON-serialisable), which are also the only
  keyword arguments besides timm's that its constructor accepts; a plug whose settings depend on the model (e.g.
  Linformer's patch grid) fills them in :meth:`settings_for_model`, which :func:`adala.models.linearize` calls;
- ``stage1_trainable``: prefixes of the parameter names that attention alignment (Stage 1) trains;
- ``stage1_objective``: the loss Stage 1 uses unless ``stage.objective`` says otherwise (``output``: AdaLA's;
  ``attention_scores``: Hedgehog's distillation; ``head_outputs``: LoLCATS' per-head transfer);
- ``finetune_lora``: the LoRA (rank, α) the plug's recipe trains the stages after attention transfer with, used
  when ``stage.lora`` is unset (LoLCATS: (8, 16.0)); None (the default): those stages train in full;
- ``subquadratic``: True when no N×N tensor is formed (linear or N^1.5 cost);
- ``shapes_follow_settings``: True when the shapes of the plug's own tensors depend on its settings (feature
  counts, projection sizes): loading a state dict first gives them the stored shapes (see below);

and implement :meth:`mix`, the token mixing of per-head queries, keys and values, plus :meth:`reset_plug_parameters`
when the plug has parameters of its own.

Every plug stores its name and settings, and the token layout it was set up for, as JSON in one persistent
uint8 buffer (``plug_config``). So a converted model's state dict has keys a softmax model lacks (strict loading
into softmax attention fails instead of computing something else), and loading a state dict restores the
settings the weights were trained with. A plug with ``shapes_follow_settings`` also takes the stored shapes of its
own tensors, so one built with the defaults loads weights trained with other settings; timm's tensors (qkv, norms,
proj) keep theirs, and a mismatch there, or in any tensor of another plug, still fails a strict load.

Token layout: ViTs put ``num_prefix_tokens`` class and register tokens before the patch tokens, which lie on a
``grid`` of rows × columns. Plugs that need either (token positions, landmarks, depthwise convolutions on the
grid) read ``self.num_prefix_tokens`` and :meth:`patch_grid`; :func:`set_token_layout` sets them for every plug of
a model, and a model-level hook keeps the grid current for each input size.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

PLUG_BUFFER = "plug_config"
PLUG_BUFFER_BYTES = 512  # fixed size, so every plug's buffer has one shape
TIMM_TENSORS = ("qkv.", "q_norm.", "k_norm.", "norm.", "proj.")  # name prefixes of timm's tensors in a plug


def encode_json(config: dict[str, Any], size: int, device: Optional[torch.device | str] = None) -> torch.Tensor:
    """``config`` as zero-padded UTF-8 JSON bytes in a uint8 tensor of ``size`` (dtype casts leave it alone)."""
    text = json.dumps(config, sort_keys=True).encode()
    if len(text) > size:
        raise ValueError(f"attention config {config} is too long to store in {size} bytes")
    return torch.tensor(list(text.ljust(size, b"\0")), dtype=torch.uint8, device=device)


def decode_json(buffer: torch.Tensor) -> dict[str, Any]:
    """The dict stored by :func:`encode_json`; ValueError for anything else."""
    try:
        config = json.loads(bytes(buffer.cpu().tolist()).rstrip(b"\0"))
    except (ValueError, TypeError):
        raise ValueError("not an attention config (expected UTF-8 JSON)") from None
    if not isinstance(config, dict):
        raise ValueError("not an attention config (expected a JSON object)")
    return config


class AttentionPlug(nn.Module):
    """A drop-in for timm ``Attention`` with its constructor arguments (those timm's blocks pass) and names."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    stage1_trainable: ClassVar[tuple[str, ...]] = ("qkv",)
    subquadratic: ClassVar[bool] = True
    shapes_follow_settings: ClassVar[bool] = False  # own tensors sized by settings: loading resizes them (module doc)
    stage1_objective: ClassVar[str] = "output"  # Stage 1's default loss: output | head_outputs | attention_scores
    finetune_lora: ClassVar[Optional[tuple[int, float]]] = None  # the recipe's LoRA (rank, α) after Stage 1
    config_buffer: ClassVar[str] = PLUG_BUFFER  # the persistent buffer holding :attr:`config` (see the module doc)

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        self.settings = self.check_settings(settings)
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("qk_norm and scale_norm need a norm_layer")
        dd = {"device": device, "dtype": dtype}
        head_dim = head_dim or dim // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.attn_drop = attn_drop  # plugs that form attention weights may drop them out
        self.num_prefix_tokens = 0
        self.grid: Optional[tuple[int, int]] = None
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm: nn.Module = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.norm: nn.Module = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer(self.config_buffer, self._encoded_config(device))
        self.build_plug_parameters(**dd)

    # -- what a subclass provides -------------------------------------------------------------------------------

    def build_plug_parameters(self, device: Any = None, dtype: Any = None) -> None:
        """Create the plug's own parameters and buffers (``self.settings`` holds its settings). None by default."""

    def reset_plug_parameters(self) -> None:
        """Initialise the plug's own parameters (called after the softmax weights are copied in by
        :meth:`from_softmax`, so an initialisation may depend on them). Nothing by default."""

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Mix tokens: q, k, v are (batch, heads, tokens, head_dim) after q/k norms; returns the same shape."""
        raise NotImplementedError

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The plug's normalised attention weights, (batch, heads, tokens, tokens), for attention-score distillation.

        Every plug's mixing is linear in the values, ``mix(q, k, v) = A v``, so by default A is read off by mixing
        the identity as values (N² memory per head, like the softmax weights it is compared with). Plugs with a
        cheaper closed form override this."""
        b, h, n, _ = q.shape
        eye = torch.eye(n, device=q.device, dtype=q.dtype).expand(b, h, n, n)
        return self.mix(q, k, eye)

    def output(self, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """The module's output from its input ``x`` (batch, tokens, dim) and the mixed heads merged to
        (batch, tokens, heads × head_dim): norm, projection, dropout. Plugs with a residual-side module (e.g. a
        local convolution on the values) override this."""
        return self.proj_drop(self.proj(self.norm(mixed)))

    # -- shared machinery -----------------------------------------------------------------------------------------

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """``settings`` with the defaults filled in; ValueError naming the known ones for an unknown setting."""
        unknown = sorted(set(settings) - set(cls.defaults))
        if unknown:
            known = ", ".join(sorted(cls.defaults)) or "none"
            raise ValueError(f"attention {cls.name!r} has no setting {', '.join(unknown)}; its settings: {known}")
        return {**cls.defaults, **settings}

    @classmethod
    def settings_for_model(cls, settings: dict[str, Any], grid: tuple[int, int]) -> dict[str, Any]:
        """``settings`` with those left to the model filled in from its patch ``grid`` (rows, columns) at the
        resolution it is converted at; unchanged by default."""
        return settings

    @property
    def config(self) -> dict[str, Any]:
        """Name, settings and token layout, as stored in the ``plug_config`` buffer and in exports."""
        return {"name": self.name, **self.settings, "num_prefix_tokens": self.num_prefix_tokens}

    def _encoded_config(self, device: Any = None) -> torch.Tensor:
        return encode_json(self.config, PLUG_BUFFER_BYTES, device)

    def _decoded_config(self, buffer: torch.Tensor) -> tuple[dict[str, Any], int]:
        """Settings (defaults filled in) and prefix-token count stored in ``buffer``; ValueError if it holds none."""
        config = decode_json(buffer)
        if config.get("name") != self.name:
            raise ValueError(f"the weights hold attention {config.get('name')!r}, not {self.name!r}")
        prefix_tokens = int(config.pop("num_prefix_tokens", 0))
        config.pop("name")
        return self.check_settings(config), prefix_tokens

    def set_token_layout(self, num_prefix_tokens: int, grid: Optional[tuple[int, int]] = None) -> None:
        """Record how many class/register tokens lead the sequence, and the patch grid when known."""
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.grid = tuple(grid) if grid is not None else None
        buffer = getattr(self, self.config_buffer)
        buffer.copy_(self._encoded_config(buffer.device))

    def patch_grid(self, tokens: int) -> tuple[int, int]:
        """Rows × columns of the patch tokens in a sequence of ``tokens``: the recorded grid when it fits, else a
        square; ValueError when neither fits."""
        patches = tokens - self.num_prefix_tokens
        if self.grid is not None and self.grid[0] * self.grid[1] == patches:
            return self.grid
        side = math.isqrt(max(patches, 0))
        if side * side != patches:
            raise ValueError(f"{patches} patch tokens do not form a square grid and no grid was recorded; "
                             "convert the model with adala.models.linearize, which records it")
        return side, side

    @classmethod
    def from_softmax(cls, attn: nn.Module, **settings: Any) -> "AttentionPlug":
        """A plug with a copy of ``attn``'s weights (a timm ``Attention``) and the plug's own parameters
        initialised by :meth:`reset_plug_parameters`."""
        if getattr(attn, "gate", None) is not None:
            raise ValueError(f"gated timm attention is not supported by {cls.__name__}")
        weight = attn.qkv.weight
        module = cls(
            attn.qkv.in_features,
            attn.num_heads,
            head_dim=attn.head_dim,
            dim_out=attn.proj.out_features,
            qkv_bias=attn.qkv.bias is not None,
            proj_bias=attn.proj.bias is not None,
            proj_drop=attn.proj_drop.p,
            device=weight.device,
            dtype=weight.dtype,
            **settings,
        )
        for name in ("q_norm", "k_norm", "norm"):
            setattr(module, name, copy.deepcopy(getattr(attn, name)))
        result = module.load_state_dict({k: v.detach().clone() for k, v in attn.state_dict().items()}, strict=False)
        not_copied = sorted(set(result.missing_keys) & set(attn.state_dict()))
        if result.unexpected_keys or not_copied:
            raise ValueError(f"{type(attn).__name__} weights do not fit {cls.__name__}: "
                             f"unexpected {result.unexpected_keys}, not copied {not_copied}")
        module.reset_plug_parameters()
        return module.train(attn.training)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Take the settings and token layout of the weights being loaded, from their config buffer entry."""
        stored = state_dict.get(prefix + self.config_buffer)
        if stored is not None and not stored.is_meta:  # a meta tensor (a model built on the meta device) holds none
            try:
                self.settings, self.num_prefix_tokens = self._decoded_config(stored)
            except ValueError as err:
                error_msgs.append(f"{prefix}{self.config_buffer}: {err}")
        if self.shapes_follow_settings:
            self._fit_own_tensors(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _fit_own_tensors(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Resize (in place, keeping each Parameter object) the plug's own tensors whose stored shape differs."""
        for name, tensor in itertools.chain(self.named_parameters(), self.named_buffers()):
            if name.startswith(TIMM_TENSORS) or name == self.config_buffer:
                continue
            stored = state_dict.get(prefix + name)
            if isinstance(stored, torch.Tensor) and not stored.is_meta and stored.shape != tensor.shape:
                tensor.data = torch.empty(stored.shape, dtype=tensor.dtype, device=tensor.device)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        # timm blocks always pass these two arguments; ViT attention is bidirectional and unmasked.
        if attn_mask is not None or is_causal:
            raise ValueError(f"{type(self).__name__} is non-causal and takes no attention mask")
        return self.output(x, self.heads(x))

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head queries, keys (after the q/k norms) and values of ``x``: each (batch, heads, tokens, head_dim)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """The mixed heads of ``x``, merged to (batch, tokens, heads × head_dim): what :meth:`output` projects."""
        b, n, _ = x.shape
        return self.mix(*self.qkv_heads(x)).transpose(1, 2).reshape(b, n, self.attn_dim)

    def extra_repr(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        return f"heads={self.num_heads}, head_dim={self.head_dim}" + (f", {settings}" if settings else "")

"""The Mask2Former head on a ViT: adala's feature pyramid (the neck) feeding the pixel decoder, masked-attention
transformer decoder and matching losses of the Mask2Former model in ``transformers`` (plain PyTorch, its
multi-scale deformable attention included; the Hungarian matcher uses scipy). Install with
``pip install 'adala[seg]'``."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerLoss, Mask2FormerPixelDecoder, Mask2FormerPreTrainedModel, Mask2FormerTransformerModule,
)

from adala.stages.seg_heads import IGNORE_INDEX, FeaturePyramid

MaskOutputs = tuple[list[torch.Tensor], list[torch.Tensor]]  # per decoder layer: mask logits, class logits


class Mask2FormerDecoder(Mask2FormerPreTrainedModel):
    """Pixel decoder, transformer decoder, class predictor and loss of ``transformers``' Mask2Former, taking the
    four pyramid maps (fine to coarse) in place of its backbone's; weights initialised as ``transformers`` does."""

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__(config)
        self.pixel_decoder = Mask2FormerPixelDecoder(config, feature_channels=[config.feature_size] * 4)
        self.transformer = Mask2FormerTransformerModule(in_features=config.feature_size, config=config)
        self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
        self.weights = {"loss_cross_entropy": config.class_weight, "loss_mask": config.mask_weight,
                        "loss_dice": config.dice_weight}
        self.criterion = Mask2FormerLoss(config=config, weight_dict=self.weights)
        self.post_init()

    def forward(self, pyramid: list[torch.Tensor]) -> MaskOutputs:  # type: ignore[override]
        pixels = self.pixel_decoder(pyramid)
        decoded = self.transformer(multi_scale_features=pixels.multi_scale_features, mask_features=pixels.mask_features,
                                   output_hidden_states=True)
        classes = [self.class_predictor(state.transpose(0, 1)) for state in decoded.intermediate_hidden_states]
        return list(decoded.masks_queries_logits), classes


class Mask2FormerHead(nn.Module):
    """The neck and the Mask2Former decoder. Scores for semantic segmentation: Σ_q p(class | q) · σ(mask_q), with
    the no-object class dropped (Mask2Former's semantic inference). The loss is computed in fp32 outside autocast
    (the matcher hands its cost matrix to scipy); every decoder layer is supervised (auxiliary losses)."""

    def __init__(self, embed_dim: int, num_classes: int, *, blocks: Sequence[int], hidden_dim: int, num_queries: int,
                 decoder_layers: int, encoder_layers: int, feedforward: int, train_points: int) -> None:
        super().__init__()
        self.blocks = list(blocks)
        config = Mask2FormerConfig(
            num_labels=num_classes, feature_size=hidden_dim, mask_feature_size=hidden_dim, hidden_dim=hidden_dim,
            num_queries=num_queries, encoder_layers=encoder_layers, dim_feedforward=feedforward,
            decoder_layers=decoder_layers + 1,  # transformers counts the prediction from the bare queries as one
            train_num_points=train_points,
            use_auxiliary_loss=True, backbone_config=None)
        self.neck = FeaturePyramid(embed_dim, hidden_dim)
        self.decoder = Mask2FormerDecoder(config)

    def forward(self, maps: Sequence[torch.Tensor]) -> MaskOutputs:
        return self.decoder(self.neck(maps))

    def scores(self, outputs: MaskOutputs, size: tuple[int, int]) -> torch.Tensor:
        masks, classes = outputs[0][-1], outputs[1][-1]
        masks = F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False)
        return torch.einsum("bqc,bqhw->bchw", classes.float().softmax(-1)[..., :-1], masks.sigmoid())

    def loss(self, outputs: MaskOutputs, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        masks, classes = outputs
        mask_labels, class_labels = semantic_targets(mask)
        with torch.autocast(mask.device.type, enabled=False):
            aux = [{"masks_queries_logits": m.float(), "class_queries_logits": c.float()}
                   for m, c in zip(masks[:-1], classes[:-1])]
            losses: dict[str, torch.Tensor] = self.decoder.criterion(
                masks[-1].float(), classes[-1].float(), mask_labels, class_labels, auxiliary_predictions=aux)
        total = sum(value * self.decoder.weights[key.rsplit("_", 1)[0] if key[-1].isdigit() else key]
                    for key, value in losses.items())
        scalars = {key.removeprefix("loss_"): losses[key].detach() for key in self.decoder.weights}
        return total, scalars  # type: ignore[return-value]


def semantic_targets(mask: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image, Mask2Former's targets for a class mask ``[H, W]``: one binary mask ``[K, H, W]`` per class
    present and the ``K`` class ids; ignored pixels belong to no mask."""
    mask_labels, class_labels = [], []
    for image in mask:
        present = image.unique()
        present = present[present != IGNORE_INDEX]
        class_labels.append(present.long())
        mask_labels.append((image[None] == present[:, None, None]).float())
    return mask_labels, class_labels


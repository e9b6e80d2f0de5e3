"""``prompt_free``: automatic segmentation with no user prompt.

Learned prompt tokens (``model.prompt_tokens`` × 256) replace the user's points/box as SAM's sparse prompt, the
dense prompt is SAM's "no mask" embedding, and the multiscale refiner sharpens the output. The rest of SAM's
decoder (two-way transformer, IoU head) is reused as is, so pretrained decoder weights still help.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medsam2.model.decoders.base import DECODERS
from medsam2.model.decoders.multiscale import MultiScaleRefiner
from medsam2.model.decoders.stock import run_sam_decoder


class PromptFreeDecoder(nn.Module):
    def __init__(self, num_tokens: int, dim: int = 256) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
        self.refiner = MultiScaleRefiner(embed_dim=dim)

    def forward(self, sam, feats, sparse, dense, images):
        b = images.shape[0]
        sparse = self.tokens.unsqueeze(0).expand(b, -1, -1)
        emb = feats["image_embed"]
        dense = sam.sam_prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, *emb.shape[-2:])
        low_res, iou_pred = run_sam_decoder(sam, feats, sparse, dense)
        base = F.interpolate(low_res, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return base + self.refiner(feats, low_res, images), iou_pred


@DECODERS.register("prompt_free")
def prompt_free_decoder(sam: nn.Module, cfg) -> nn.Module:
    return PromptFreeDecoder(cfg.prompt_tokens)

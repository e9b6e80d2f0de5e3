"""``sam2``: SAM2's own mask decoder with its high-resolution features, single-mask output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medsam2.model.decoders.base import DECODERS


def run_sam_decoder(sam: nn.Module, feats: dict, sparse: torch.Tensor, dense: torch.Tensor):
    """SAM2's mask decoder, one mask per prompt set → (low-res logits (B,1,S/4,S/4), iou_pred (B,1))."""
    low_res, iou_pred, _, _ = sam.sam_mask_decoder(
        image_embeddings=feats["image_embed"],
        image_pe=sam.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
        repeat_image=False,
        high_res_features=feats["high_res"],
    )
    return low_res, iou_pred


class StockDecoder(nn.Module):
    """No parameters of its own: SAM2's ``sam_mask_decoder`` (part of the wrapped model) does the work."""

    def forward(self, sam, feats, sparse, dense, images):
        low_res, iou_pred = run_sam_decoder(sam, feats, sparse, dense)
        logits = F.interpolate(low_res, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits, iou_pred


@DECODERS.register("sam2")
def sam2_decoder(sam: nn.Module, cfg) -> nn.Module:
    return StockDecoder()

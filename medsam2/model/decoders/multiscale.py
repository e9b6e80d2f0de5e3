"""``multiscale``: SAM2's decoder plus a light U-Net path that fuses every FPN level to full resolution.

SAM2's decoder predicts at S/4 and is upsampled bilinearly, which blurs thin polyp and lesion borders. This
decoder keeps SAM's prompt tokens, two-way transformer and IoU head, then refines: the S/16 image embedding,
the S/8 and S/4 high-res features, SAM's S/4 logits and a tiny stem on the input image at S/2 and S are fused
top-down (upsample, concat, conv) into a residual that is added to the upsampled SAM logits. The residual's
last conv is zero-initialised, so the decoder starts out exactly equal to ``sam2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medsam2.model.decoders.base import DECODERS
from medsam2.model.decoders.stock import run_sam_decoder


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout), nn.GELU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout), nn.GELU(),
    )


class MultiScaleRefiner(nn.Module):
    """Top-down fusion S/16 → S/8 → S/4 → S/2 → S; returns a residual logit map (B,1,S,S)."""

    def __init__(self, embed_dim: int = 256, c8: int = 64, c4: int = 32) -> None:
        super().__init__()
        self.lat16 = nn.Conv2d(embed_dim, 64, 1)
        self.fuse8 = _block(64 + c8, 64)
        self.fuse4 = _block(64 + c4 + 1, 32)
        self.stem2 = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.GELU())
        self.fuse2 = _block(32 + 16, 16)
        self.stem1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU())
        self.fuse1 = _block(16 + 8, 16)
        self.head = nn.Conv2d(16, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, feats: dict, low_res: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        up = lambda x, ref: F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731
        h4, h8 = feats["high_res"]
        x = self.lat16(feats["image_embed"])
        x = self.fuse8(torch.cat([up(x, h8), h8], 1))
        x = self.fuse4(torch.cat([up(x, h4), h4, low_res], 1))
        s2 = self.stem2(images)
        x = self.fuse2(torch.cat([up(x, s2), s2], 1))
        s1 = self.stem1(images)
        x = self.fuse1(torch.cat([up(x, s1), s1], 1))
        return self.head(x)


class MultiScaleDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.refiner = MultiScaleRefiner()

    def forward(self, sam, feats, sparse, dense, images):
        low_res, iou_pred = run_sam_decoder(sam, feats, sparse, dense)
        base = F.interpolate(low_res, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return base + self.refiner(feats, low_res, images), iou_pred


@DECODERS.register("multiscale")
def multiscale_decoder(sam: nn.Module, cfg) -> nn.Module:
    return MultiScaleDecoder()

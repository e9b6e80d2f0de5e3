"""Supervised step shared by every strategy: forward with the configured prompt, mask loss + IoU-head loss."""

from __future__ import annotations

import torch
from torch import nn

from medsam2.losses import box_projection_loss, create_loss, iou_prediction_loss
from medsam2.semisup.base import STRATEGIES


def forward_batch(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Run the segmenter on a collated batch (images already normalised, on device)."""
    return model(batch["image"], boxes=batch["box"], points=batch["points"], point_labels=batch["point_labels"])


class Supervised:
    """Mask loss (``train.loss`` with ``train.loss_options``) on labelled pixels + ``train.iou_weight`` × MSE of
    SAM's IoU head.

    Samples whose ``label_kind`` is ``box`` (weak box labels) are supervised by the box-projection loss instead
    of a mask loss; their box is also the prompt.
    """

    needs_unlabelled = False

    def __init__(self, model: nn.Module, cfg) -> None:
        self.loss_fn = create_loss(cfg.train.loss, **cfg.train.loss_options)
        self.iou_weight = cfg.train.iou_weight

    def extra_modules(self) -> list[nn.Module]:
        return []

    def supervised(self, model: nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], dict]:
        out = forward_batch(model, batch)
        logits, valid = out["logits"], batch["valid"]
        weak = batch.get("weak_box")
        if weak is not None and bool(weak.any()):
            strong = ~weak
            mask_valid = valid & strong.view(-1, 1, 1, 1)
            loss_mask = self.loss_fn(logits, batch["mask"], mask_valid)
            loss_box = box_projection_loss(logits[weak], batch["gt_box"][weak])
            loss = loss_mask + loss_box
            losses = {"loss_mask": loss_mask, "loss_box": loss_box}
        else:
            loss = self.loss_fn(logits, batch["mask"], valid)
            losses = {"loss_mask": loss}
        strong = ~weak if weak is not None else torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        if bool(strong.any()):  # box-only rows have no true mask for the IoU head to learn from
            loss_iou = iou_prediction_loss(out["iou_pred"][strong], logits[strong], batch["mask"][strong],
                                           valid[strong])
        else:
            loss_iou = logits.sum() * 0.0
        losses["loss_iou"] = loss_iou
        losses["loss"] = loss + self.iou_weight * loss_iou
        return losses, out

    def losses(self, model, batch, unlabelled, step) -> dict[str, torch.Tensor]:
        return self.supervised(model, batch)[0]

    def after_step(self, model) -> None:
        return None


@STRATEGIES.register("none")
def supervised(model: nn.Module, cfg) -> Supervised:
    return Supervised(model, cfg)

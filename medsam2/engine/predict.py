"""Inference on original-resolution images: prompts in, masks out, at the image's own size.

``predict(model, images, boxes=..., points=..., point_labels=...)`` takes uint8 (H,W,3) images of any size
and prompts in each image's own pixel coordinates, runs the model at S×S (SAM2's square resize, or with
``model.box_crop`` the window around each box) and returns masks resized back to (H,W). The ``medsam2
predict`` CLI and the MLflow pyfunc both call it.

Logits are resampled to the image **once** (bilinear, as ``SAM2ImagePredictor`` does): with SAM2's own decoder
(``model.decoder: sam2``) the low-resolution (S/4) mask logits go straight to (H,W), not S/4 → S → (H,W); a box
prior (``model.box_prior``), defined on the S×S grid, is resampled once beside them and added. The ``multiscale``
and ``prompt_free`` decoders already predict at S (their refiner works at full model resolution), so their S×S
logits are the ones resampled. With ``model.box_crop`` the target of that one resampling is the crop window,
which :func:`~medsam2.data.crops.paste_logits` then places in the image (its own resize is then the identity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medsam2.data.crops import box_to_crop, crop_pair, crop_window, paste_logits
from medsam2.data.dataset import resize_pair
from medsam2.engine.runtime import autocast
from medsam2.model.decoders.stock import StockDecoder, run_sam_decoder
from medsam2.model.segmenter import Segmenter, normalize


@dataclass
class Prediction:
    mask: np.ndarray
    """(H,W) bool, probability > 0.5."""
    prob: np.ndarray
    """(H,W) float32 foreground probability in [0,1]."""
    iou_pred: float
    """SAM's predicted IoU of the mask, in [0,1]."""


def _scale(xy: np.ndarray, hw: tuple[int, int], size: int) -> np.ndarray:
    """Scale x,y pairs (…,2) from an (H,W) image to S×S model input coordinates."""
    return xy * np.array([size / hw[1], size / hw[0]], np.float32)


def _flip_prompts(kw: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Prompts of a left-right mirrored S×S input: x → S − x (box corners swap so that x0 < x1)."""
    out = dict(kw)
    if "boxes" in kw:
        b = kw["boxes"]
        out["boxes"] = torch.stack([size - b[:, 2], b[:, 1], size - b[:, 0], b[:, 3]], 1)
    if "points" in kw:
        p = kw["points"].clone()
        p[..., 0] = size - p[..., 0]
        out["points"] = p
    return out


def _forward(model: Segmenter, x: torch.Tensor, kw: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The model's output at its own resolution, before any resampling to the image.

    Returns ``(logits (B,1,s,s), iou_pred (B,1), prior (B,1,S,S) or None)``: for SAM2's stock decoder the
    low-resolution logits (s = S/4) and the box prior's log-odds apart (``model(x)`` would be
    ``upsample_S(logits) + prior``); for the other decoders ``model(x)``'s logits (s = S) and None.
    """
    if not isinstance(model.decoder, StockDecoder):
        res = model(x, **kw)
        return res["logits"], res["iou_pred"], None
    feats = model.encode(x)
    sparse, dense = model.prompt_embeddings(x.shape[0], x.device, kw.get("boxes"), kw.get("points"),
                                            kw.get("point_labels"))
    low_res, iou_pred = run_sam_decoder(model.sam, feats, sparse, dense)
    prior = model.prior.fn(kw["boxes"], model.image_size) if model.prior is not None else None
    return low_res, iou_pred, prior


def _resample(logits: torch.Tensor, prior: torch.Tensor | None, hw: tuple[int, int]) -> torch.Tensor:
    """(1,1,s,s) logits [+ (1,1,S,S) prior] → (1,1,H,W) float32 logits, each resampled once (bilinear)."""
    out = F.interpolate(logits.float(), size=hw, mode="bilinear", align_corners=False)
    if prior is not None:
        out = out + F.interpolate(prior.float(), size=hw, mode="bilinear", align_corners=False)
    return out


@torch.no_grad()
def predict(
    model: Segmenter,
    images: Sequence[np.ndarray],
    boxes: Sequence[np.ndarray | None] | None = None,
    points: Sequence[np.ndarray | None] | None = None,
    point_labels: Sequence[np.ndarray | None] | None = None,
    *,
    precision: str = "auto",
    batch_size: int = 8,
) -> list[Prediction]:
    """Segment ``images`` (each (H,W,3) uint8 RGB) with the model's prompt mode.

    ``boxes[i]``: (4,) x0,y0,x1,y1 in image i's pixels (prompt ``box``). ``points[i]``: (N,2) x,y and
    ``point_labels[i]``: (N,) 1/0 (prompt ``points``). Prompt-free models ignore prompts.
    """
    device = next(model.parameters()).device
    size = model.image_size
    mode = model.cfg.prompt
    margin = model.cfg.box_crop if mode == "box" else None
    out: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        idx = range(start, min(len(images), start + batch_size))
        kw = {}
        windows: dict[int, np.ndarray] = {}
        if mode == "box":
            if boxes is None or any(boxes[i] is None for i in idx):
                raise ValueError("this model is box-prompted: give a box for every image")
            model_boxes = []
            for i in idx:
                box = np.asarray(boxes[i], np.float32).reshape(4)
                if margin is not None:
                    windows[i] = crop_window(box, margin, images[i].shape[:2])
                    model_boxes.append(box_to_crop(box, windows[i], size))
                else:
                    model_boxes.append(_scale(box.reshape(2, 2), images[i].shape[:2], size).reshape(4))
            kw["boxes"] = torch.from_numpy(np.stack(model_boxes)).to(device)
        elif mode == "points":
            if points is None or point_labels is None:
                raise ValueError("this model is point-prompted: give points and point_labels")
            kw["points"] = torch.from_numpy(
                np.stack([_scale(np.asarray(points[i], np.float32), images[i].shape[:2], size) for i in idx])
            ).to(device)
            kw["point_labels"] = torch.from_numpy(np.stack([np.asarray(point_labels[i]) for i in idx])).to(device)
        batch = np.stack([crop_pair(images[i], None, windows[i], size)[0] if i in windows
                          else resize_pair(images[i], None, size)[0] for i in idx]).astype(np.float32) / 255.0
        x = normalize(torch.from_numpy(batch).permute(0, 3, 1, 2).to(device))
        with autocast(device, precision):
            logits, iou, prior = _forward(model, x, kw)
            if model.cfg.tta_flip:  # mean of the logits of the image and its mirror image (flipped back)
                f_logits, f_iou, f_prior = _forward(model, x.flip(-1), _flip_prompts(kw, size))
                logits, iou = (logits + f_logits.flip(-1)) / 2, (iou + f_iou) / 2
                prior = None if prior is None else (prior + f_prior.flip(-1)) / 2
        logits, iou = logits.float(), iou.float()
        for j, i in enumerate(idx):
            h, w = images[i].shape[:2]
            pj = None if prior is None else prior[j:j + 1]
            if i in windows:  # resampled once to the window, pasted back there, background elsewhere
                x0, y0, x1, y1 = (int(v) for v in windows[i])
                full = paste_logits(_resample(logits[j:j + 1], pj, (y1 - y0, x1 - x0)), windows[i], (h, w))
            else:
                full = _resample(logits[j:j + 1], pj, (h, w))
            prob = torch.sigmoid(full)
            p = prob[0, 0].cpu().numpy()
            out.append(Prediction(mask=p > 0.5, prob=p, iou_pred=float(iou[j, 0])))
    return out

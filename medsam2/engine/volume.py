"""Segment a volume from prompts on one or more slices, through SAM2's memory encoder and memory attention.

The slices of a volume (Z, H, W) are SAM2's video frames. :func:`track` runs the unforked ``sam2`` package's
``SAM2Base.track_step`` frame by frame in the order and with the state layout of ``SAM2VideoPredictor``:

1. every prompted slice is an initial conditioning frame (``is_init_cond_frame=True``: no memory, SAM2's
   image path with ``no_mem_embed``); its memory is encoded from its mask logits;
2. propagation forwards from the earliest prompted slice to the last slice, then backwards from it to slice 0
   (``propagate_in_video`` and ``propagate_in_video(reverse=True)``); every other slice cross-attends to the
   memories of the prompted slices and of up to ``num_maskmem - 1`` slices already segmented (and their object
   pointers); prompted slices later in the order keep their prompt's mask.

``memory="predictor"`` (inference) is ``SAM2VideoPredictor`` exactly: conditioning frames encode their memory
from the upsampled low-resolution logits with ``is_mask_from_pts=True`` (as its ``propagate_in_video_preflight``
does) and memory features are stored in bfloat16 (as its ``_run_single_frame_inference`` does), which is what
the parity test (``tests/test_volume_propagation.py``) checks against the predictor itself. ``memory="train"``
is SAM2's training path: ``track_step`` encodes each frame's memory from its own high-resolution logits, in
float32, and keeps the graph, so a loss on every frame reaches the memory encoder and memory attention.

The image encoder is the model's own (``Segmenter.sam.forward_image``, adapters included); the mask decoder is
SAM2's (``model.decoder: sam2``), the only one ``track_step`` knows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medsam2.data.dataset import resize_pair
from medsam2.engine.runtime import autocast, inference_precision
from medsam2.errors import UsageError
from medsam2.model.decoders.stock import StockDecoder
from medsam2.model.segmenter import Segmenter, normalize


@dataclass(frozen=True)
class SlicePrompt:
    """A prompt on one slice. Coordinates are pixels of the image it is given for (the slice's (H, W) for
    :func:`segment_volume`, the S×S model input for :func:`track`).

    ``box``: (4,) x0,y0,x1,y1; ``points``: (N,2) x,y with ``labels`` (N,) int (1 foreground, 0 background);
    a box and points may be combined (the box goes first, as in ``SAM2VideoPredictor.add_new_points_or_box``).
    ``mask``: (H, W) bool, alone: SAM2 then uses the mask itself as the slice's output and memory.
    """

    box: np.ndarray | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.mask is None and self.box is None and self.points is None:
            raise ValueError("a slice prompt needs a box, points or a mask")
        if self.mask is not None and (self.box is not None or self.points is not None):
            raise ValueError("a slice prompt is a mask, or a box and/or points, not both")
        if (self.points is None) != (self.labels is None):
            raise ValueError("points and labels go together")

    def scaled(self, hw: tuple[int, int], size: int) -> SlicePrompt:
        """This prompt given on an (H, W) slice → the same prompt on the S×S model input."""
        h, w = hw
        sx, sy = size / w, size / h
        if self.mask is not None:
            return SlicePrompt(mask=_mask_to_input(self.mask, size))
        box = None if self.box is None else np.asarray(self.box, np.float32) * np.array([sx, sy, sx, sy], np.float32)
        pts = None if self.points is None else np.asarray(self.points, np.float32) * np.array([sx, sy], np.float32)
        return SlicePrompt(box=box, points=pts, labels=self.labels)


def _mask_to_input(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) bool → (S, S) bool as ``SAM2VideoPredictor.add_new_mask`` resizes it (antialiased bilinear, ≥ 0.5)."""
    m = torch.from_numpy(np.asarray(mask, bool)).float()[None, None]
    if m.shape[-2:] != (size, size):
        m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (m[0, 0] >= 0.5).numpy()


def _point_inputs(p: SlicePrompt, device: torch.device) -> dict[str, torch.Tensor]:
    """SAM2's ``point_inputs``: {"point_coords": (1,N,2) float in S×S pixels, "point_labels": (1,N) int32}."""
    coords, labels = [], []
    if p.box is not None:
        coords.append(np.asarray(p.box, np.float32).reshape(2, 2))
        labels.append(np.array([2, 3], np.int32))
    if p.points is not None:
        coords.append(np.asarray(p.points, np.float32).reshape(-1, 2))
        labels.append(np.asarray(p.labels, np.int32).reshape(-1))
    return {"point_coords": torch.from_numpy(np.concatenate(coords))[None].to(device),
            "point_labels": torch.from_numpy(np.concatenate(labels))[None].to(device)}


@dataclass
class Tracked:
    """What :func:`track` returns, one entry per slice (Z slices, model input S×S)."""

    low_res: torch.Tensor
    """(Z,1,S/4,S/4) float32 mask logits (SAM2's ``pred_masks``)."""
    object_score: torch.Tensor
    """(Z,1) float32 object-presence logits (> 0: SAM2 sees the object on the slice); zeros with
    ``memory="train"``, where ``track_step`` leaves them out of its output."""
    high_res: torch.Tensor | None = None
    """(Z,1,S,S) mask logits with the graph (``memory="train"`` only): what a loss on every frame reads."""
    order: tuple[int, ...] = ()
    """The order the slices were segmented in (prompted slices first)."""


def _features(sam, frame: torch.Tensor):
    """(1,3,S,S) normalised frame → SAM2's (vision_feats, vision_pos_embeds, feat_sizes) for ``track_step``."""
    _, feats, pos, sizes = sam._prepare_backbone_features(sam.forward_image(frame))
    return feats, pos, sizes


def track(sam, frames, prompts: dict[int, SlicePrompt], *, memory: str = "predictor") -> Tracked:
    """Segment every frame of ``frames`` (Z,3,S,S), normalised as :func:`~medsam2.model.segmenter.normalize`
    does, from ``prompts`` {slice index: :class:`SlicePrompt` in S×S pixels}, with SAM2's memory (module doc).
    ``frames``: a tensor, or anything with ``len`` whose ``frames[z:z + 1]`` is that (1,3,S,S) tensor
    (:class:`SliceFrames`: a long volume then never exists at model resolution as a whole).

    ``sam``: a ``SAM2Base`` (e.g. ``Segmenter.sam``) in eval mode for ``memory="predictor"``, in train mode for
    ``memory="train"`` (then call it under autograd). Frames are encoded one at a time when they are visited
    (a prompted frame twice at most), so a long volume never holds more than one frame's backbone features.
    """
    if memory not in ("predictor", "train"):
        raise ValueError(f"memory={memory!r} is not one of predictor, train")
    n = len(frames)
    bad = sorted(z for z in prompts if not 0 <= z < n)
    if not prompts or bad:
        raise ValueError(f"prompts on slices {bad or 'none'}: need at least one, each in 0..{n - 1}")
    device = sam.device
    size = int(sam.image_size)
    state: dict[str, dict[int, dict]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    low: dict[int, torch.Tensor] = {}
    high: dict[int, torch.Tensor] = {}
    score: dict[int, torch.Tensor] = {}
    order: list[int] = []

    def keep(z: int, out: dict, cond: bool) -> None:
        if memory == "predictor":  # the compact output SAM2VideoPredictor stores
            out = {"maskmem_features": out["maskmem_features"].to(torch.bfloat16),
                   "maskmem_pos_enc": out["maskmem_pos_enc"], "pred_masks": out["pred_masks"],
                   "obj_ptr": out["obj_ptr"], "object_score_logits": out["object_score_logits"]}
        state["cond_frame_outputs" if cond else "non_cond_frame_outputs"][z] = out
        low[z] = out["pred_masks"].float()
        if memory == "train":
            high[z] = out["pred_masks_high_res"]
        order.append(z)

    for z in sorted(prompts):  # initial conditioning frames: no memory read
        p = prompts[z]
        feats, pos, sizes = _features(sam, frames[z:z + 1].to(device))
        mask_in = None if p.mask is None else torch.from_numpy(np.asarray(p.mask, bool)).float()[None, None].to(device)
        out = sam.track_step(
            frame_idx=z, is_init_cond_frame=True, current_vision_feats=feats, current_vision_pos_embeds=pos,
            feat_sizes=sizes, point_inputs=None if p.mask is not None else _point_inputs(p, device),
            mask_inputs=mask_in, output_dict=state, num_frames=n, track_in_reverse=False,
            run_mem_encoder=memory == "train")
        if memory == "predictor":  # memory from the upsampled low-res logits, as propagate_in_video_preflight does
            high_res = F.interpolate(out["pred_masks"], size=(size, size), mode="bilinear", align_corners=False)
            out["maskmem_features"], out["maskmem_pos_enc"] = sam._encode_new_memory(
                current_vision_feats=feats, feat_sizes=sizes, pred_masks_high_res=high_res,
                object_score_logits=out["object_score_logits"], is_mask_from_pts=True)
            score[z] = out["object_score_logits"].float()
        keep(z, out, cond=True)

    start = min(prompts)
    passes = [(range(start, n), False)] + ([(range(start, -1, -1), True)] if start > 0 else [])
    for frame_range, reverse in passes:
        for z in frame_range:
            if z in prompts:
                continue
            feats, pos, sizes = _features(sam, frames[z:z + 1].to(device))
            out = sam.track_step(
                frame_idx=z, is_init_cond_frame=False, current_vision_feats=feats, current_vision_pos_embeds=pos,
                feat_sizes=sizes, point_inputs=None, mask_inputs=None, output_dict=state, num_frames=n,
                track_in_reverse=reverse, run_mem_encoder=True)
            if "object_score_logits" in out:
                score[z] = out["object_score_logits"].float()
            keep(z, out, cond=False)
    zs = range(n)
    scores = torch.cat([score[z] for z in zs]) if len(score) == n else torch.zeros(n, 1)
    return Tracked(low_res=torch.cat([low[z] for z in zs]), object_score=scores,
                   high_res=torch.cat([high[z] for z in zs]) if memory == "train" else None, order=tuple(order))


def check_memory_model(model: Segmenter) -> None:
    """UsageError unless ``model`` has SAM2's own mask decoder, the one its memory path (``track_step``) runs."""
    if not isinstance(model.decoder, StockDecoder):
        raise UsageError(f"model.decoder={model.cfg.decoder} has no memory path: segmenting a volume with SAM2's "
                         "memory needs a model trained with model.decoder=sam2")


def slice_frames(slices: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Z slices, each (H, W, 3) uint8 RGB → (Z,3,S,S) float32 model input (SAM2's square resize, then
    ImageNet normalisation), as :func:`medsam2.engine.predict.predict` prepares an image."""
    u8 = np.stack([resize_pair(s, None, size)[0] for s in slices]).astype(np.float32) / 255.0
    return normalize(torch.from_numpy(u8).permute(0, 3, 1, 2))


class SliceFrames:
    """Z slices as :func:`track`'s frames, prepared (:func:`slice_frames`) one slice at a time when indexed
    ``[z:z + 1]``: a 300-slice CT at 1024 px would be 3.6 GB of float32 frames at once."""

    def __init__(self, slices: Sequence[np.ndarray], size: int) -> None:
        self.slices, self.size = slices, size

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, item: slice) -> torch.Tensor:
        return slice_frames(self.slices[item], self.size)


@dataclass
class VolumePrediction:
    masks: np.ndarray
    """(Z,H,W) bool, probability > 0.5, at the slices' own size."""
    object_score: np.ndarray
    """(Z,) float32 SAM2's object-presence logit per slice."""
    order: tuple[int, ...]


@torch.no_grad()
def segment_volume(model: Segmenter, slices: Sequence[np.ndarray], prompts: dict[int, SlicePrompt], *,
                   precision: str = "fp32") -> VolumePrediction:
    """Segment Z slices (each (H, W, 3) uint8 RGB, all the same size) from ``prompts`` {slice: prompt in the
    slice's pixels} with SAM2's memory (:func:`track`); logits go from S/4 to (H, W) in one bilinear resampling,
    as in :func:`medsam2.engine.predict.predict`. ``precision``: ``fp32``, ``bf16`` or ``auto`` (autocast)."""
    check_memory_model(model)
    hw = slices[0].shape[:2]
    size = model.image_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with autocast(device, inference_precision(device, precision)):
            res = track(model.sam, SliceFrames(slices, size),
                        {z: p.scaled(hw, size) for z, p in prompts.items()}, memory="predictor")
    finally:
        model.train(was_training)
    masks = np.zeros((len(slices), *hw), bool)
    for z in range(len(slices)):  # one slice at a time: a (Z,H,W) float volume need never exist
        up = F.interpolate(res.low_res[z:z + 1].float(), size=hw, mode="bilinear", align_corners=False)
        masks[z] = (up[0, 0] > 0).cpu().numpy()
    return VolumePrediction(masks=masks, object_score=res.object_score[:, 0].float().cpu().numpy(), order=res.order)


def clip_losses(model: Segmenter, batch: dict, loss_fn) -> dict[str, torch.Tensor]:
    """Training losses of a batch of clips (``model.memory: true``, :mod:`medsam2.data.clips`): each clip runs
    through :func:`track` with ``memory="train"`` from its first slice's box, and ``loss_fn`` (a registered
    mask loss: logits (N,1,S,S), target (N,1,S,S), valid (N,1,S,S) → scalar) scores the high-resolution logits of
    every slice.

    ``batch``: ``image`` (B,K,3,S,S) normalised, ``mask`` (B,K,1,S,S) in {0,1}, ``box`` (B,4) in S×S pixels.
    Returns ``{"loss", "loss_mask", "loss_first", "loss_propagated"}`` (the latter two are for the log: the
    prompted slice and the slices reached through memory)."""
    logits = []
    for b in range(batch["image"].shape[0]):
        box = batch["box"][b].detach().cpu().numpy()
        res = track(model.sam, batch["image"][b], {0: SlicePrompt(box=box)}, memory="train")
        logits.append(res.high_res)
    out = torch.stack(logits).float()  # (B,K,1,S,S)
    target = batch["mask"].float()
    valid = torch.ones_like(target, dtype=torch.bool)
    loss = loss_fn(out.flatten(0, 1), target.flatten(0, 1), valid.flatten(0, 1))
    with torch.no_grad():
        first = loss_fn(out[:, 0], target[:, 0], valid[:, 0])
        rest = loss_fn(out[:, 1:].flatten(0, 1), target[:, 1:].flatten(0, 1), valid[:, 1:].flatten(0, 1))
    return {"loss": loss, "loss_mask": loss.detach(), "loss_first": first, "loss_propagated": rest}

"""Clips of K consecutive slices of one volume, for training SAM2's memory (``model.memory: true``).

A volume is the manifest rows of one ``volume_id`` and target (a NIfTI file, a multi-frame DICOM, a DICOM
series; manifests written before ``volume_id``: one source file with ``frame`` ≥ 0), ordered by ``slice_index``;
ingest gives a volume one split (``manifest.index_volumes``), so its slices never straddle train/val/test.
A clip is K slices whose indices follow each other (z, z+1, …, z+K-1) and whose first slice has foreground
(the prompted one). Each draw picks the direction at random (forwards, or backwards from z+K-1), so the memory
learns to propagate both ways.

A sample is a dict:
    image   (K,3,S,S) float32 in [0,1] (normalised on device by the engine; channels stay third from last)
    mask    (K,1,S,S) float32 in {0,1}
    box     (4,) float32 x0,y0,x1,y1 in S×S pixels: the (jittered) box of the first slice's mask, its prompt
    index   int — the clip's position in :attr:`ClipDataset.clips`
Images are resized to S×S as :class:`~medsam2.data.dataset.SegDataset` does (no augmentation: the same
augmentation would have to apply to every slice of a clip).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from medsam2.config import ModelCfg
from medsam2.data.dataset import load_cached, resize_pair
from medsam2.data.prompts import jitter_box, mask_box


def volume_clips(rows: pd.DataFrame, k: int) -> list[list[int]]:
    """Row positions of every clip: K rows of one volume with consecutive slice indices (ascending), the first
    with a non-empty mask (``mask_fraction`` > 0). Rows that are no volume's slice belong to no clip."""
    if k < 1:
        raise ValueError(f"clip length {k} < 1")
    rows = rows.copy()
    vid = rows["volume_id"] if "volume_id" in rows else pd.Series([None] * len(rows), index=rows.index)
    sidx = rows["slice_index"] if "slice_index" in rows else pd.Series([pd.NA] * len(rows), index=rows.index)
    rows["_volume"] = vid.where(vid.notna(), rows["source_uri"])  # manifests before volume_id: the source file
    rows["_z"] = pd.to_numeric(sidx, errors="coerce").fillna(rows["frame"]).astype(int)
    keep = ((rows["_z"] >= 0) & (rows["label_kind"] == "mask")).to_numpy()
    labelled = rows[keep].copy()
    labelled["_pos"] = np.flatnonzero(keep)
    labelled["target"] = labelled["target"].fillna("")
    clips = []
    for _, vol in labelled.groupby(["dataset", "_volume", "target"], sort=True):
        vol = vol.sort_values("_z")
        frames, pos, frac = vol["_z"].to_numpy(), vol["_pos"].to_numpy(), vol["mask_fraction"].to_numpy()
        for i in range(len(vol) - k + 1):
            if frames[i + k - 1] - frames[i] == k - 1 and frac[i] > 0:
                clips.append([int(p) for p in pos[i:i + k]])
    return clips


class ClipDataset(Dataset):
    """Clips (:func:`volume_clips`) of the labelled volume slices in ``rows``; indexing takes ``i`` or
    ``(i, sample_seed)`` as :class:`~medsam2.data.dataset.SegDataset` does (the seed draws the direction and
    the box jitter; without it the clip runs forwards with the exact box)."""

    def __init__(self, rows: pd.DataFrame, workdir: str | Path, model_cfg: ModelCfg, k: int) -> None:
        self.rows = rows.reset_index(drop=True)
        self.workdir = Path(workdir)
        self.cfg = model_cfg
        self.size = model_cfg.image_size
        self.clips = volume_clips(self.rows, k)
        if not self.clips:
            raise ValueError(f"no clip of {k} consecutive labelled slices with foreground on the first: "
                             "model.memory needs volumes (NIfTI or multi-frame DICOM with masks) in the train split")

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key) -> dict:
        i, seed = key if isinstance(key, tuple) else (key, None)
        rng = None if seed is None else np.random.default_rng(seed)
        order = list(self.clips[i])
        if rng is not None and rng.random() < 0.5:
            order = order[::-1]  # backwards: the prompt goes on the last slice, which must then have foreground
            if self.rows.iloc[order[0]]["mask_fraction"] <= 0:
                order = order[::-1]
        images, masks = [], []
        for pos in order:
            image, mask = load_cached(self.workdir, self.rows.iloc[pos])
            img, msk = resize_pair(np.asarray(image), np.asarray(mask), self.size)
            images.append(img.astype(np.float32).transpose(2, 0, 1) / 255.0)
            masks.append(msk.astype(np.float32)[None])
        first = mask_box(masks[0][0] > 0)  # None when the object vanished in the resize: the whole slice
        box = np.asarray(first if first is not None else [0, 0, self.size, self.size], np.float32)
        if rng is not None:
            box = jitter_box(box, self.cfg.box_jitter, (self.size, self.size), rng)
        return {"image": torch.from_numpy(np.stack(images)), "mask": torch.from_numpy(np.stack(masks)),
                "box": torch.from_numpy(box), "index": i}

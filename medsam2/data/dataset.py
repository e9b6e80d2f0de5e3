"""Torch ``Dataset`` over the ingest manifest + its decoded cache (never re-decodes DICOM or JPEG).

A sample is a dict:
    image   (3,S,S) float32 in [0,1] (not yet normalised; the engine normalises on device)
    mask    (1,S,S) float32 in {0,1}
    valid   (1,S,S) bool — pixels whose label is known (partial labels mark the rest False)
    box     (4,) float32 x0,y0,x1,y1 in S×S pixel coords (exclusive end); full image when the mask is empty
    points  (N,2) float32, point_labels (N,) int32 (1 fg, 0 bg, -1 padding); N = num_pos + num_neg for
            prompt "points", else one padding point
    index   int — row position in the dataset's table
    weak_box () bool — the row has a box-only label (mask is empty and ``valid`` all False; see gt_box)
    gt_box  (4,) float32 — the annotated box in S×S coords (for box rows; the prompt box otherwise)
Images are resized to S×S ignoring aspect ratio, exactly as SAM2's own transforms do; with ``model.box_crop`` the
window around the (jittered) box is resized instead (``medsam2.data.crops``).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from medsam2.config import ModelCfg
from medsam2.data.crops import crop_pair, crop_window
from medsam2.data.prompts import jitter_box, mask_box, sample_points
from medsam2.data.weak import box_label_mask, negative_fields, weak_box_fields, with_weak_defaults


def load_cached(workdir: Path, row: pd.Series) -> tuple[np.ndarray, np.ndarray | None]:
    """Memory-mapped cache arrays of one manifest row: image (H,W,3) uint8, mask (H,W) uint8 {0,1} or None."""
    image = np.load(workdir / row["image_uri"], mmap_mode="r")
    mask_uri = row.get("mask_uri")
    mask = np.load(workdir / mask_uri, mmap_mode="r") if isinstance(mask_uri, str) and mask_uri else None
    return image, mask


def resize_pair(
    image: np.ndarray, mask: np.ndarray | None, size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize image (area/linear) and mask (nearest) to size×size."""
    interp = cv2.INTER_AREA if min(image.shape[:2]) > size else cv2.INTER_LINEAR
    img = cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=interp)
    msk = None if mask is None else cv2.resize(np.ascontiguousarray(mask), (size, size),
                                             interpolation=cv2.INTER_NEAREST)
    return img, msk


class SegDataset(Dataset):
    """Labelled rows (``label_kind == "mask"``) of a manifest at model resolution.

    Indexing takes ``i`` or ``(i, sample_seed)``; the seed drives augmentation and prompt jitter so a run is
    reproducible and resumable independently of worker scheduling. Without a seed (evaluation) the sample is
    deterministic: no augmentation, exact box, most-interior points.
    """

    def __init__(
        self, rows: pd.DataFrame, workdir: str | Path, model_cfg: ModelCfg, augment: str = "none"
    ) -> None:
        self.rows = rows.reset_index(drop=True)
        self.workdir = Path(workdir)
        self.cfg = model_cfg
        self.size = model_cfg.image_size
        self.augment = None
        if augment != "none":
            from medsam2.data.transforms import build_augment

            self.augment = build_augment(augment)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> dict:
        i, seed = key if isinstance(key, tuple) else (key, None)
        row = self.rows.iloc[i]
        kind = row.get("label_kind", "mask")
        weak = kind == "box"
        image, mask = load_cached(self.workdir, row) if not weak else (load_cached(self.workdir, row)[0], None)
        if weak:  # box-only label: augment the box's raster with the image, then take its tight box
            mask = box_label_mask(row["box"], image.shape[:2])
        elif mask is None:
            mask = np.zeros(image.shape[:2], np.uint8)
        rng = None if seed is None else np.random.default_rng(seed)
        img, msk = self.to_model_input(image, mask, rng)
        img = img.astype(np.float32) / 255.0
        if self.augment is not None and rng is not None:
            self.augment.set_random_seed(int(rng.integers(2**31)))
            out = self.augment(image=img, mask=msk)
            img, msk = np.clip(out["image"], 0, 1).astype(np.float32), out["mask"]
        sample = self.make_sample(img, msk, rng, i)
        if weak:
            sample.update(weak_box_fields(mask_box(msk), self.size))
        elif kind == "image":  # image-level "no finding": an empty mask over the whole image
            sample.update(negative_fields(self.size))
        return with_weak_defaults(sample)

    def to_model_input(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(H,W,3) uint8 + (H,W) {0,1} → (S,S,3) uint8 + (S,S) {0,1}: the whole image, or with ``model.box_crop``
        the window around the (jittered, when training) box of the mask (``medsam2.data.crops``)."""
        box = mask_box(mask) if self.cfg.box_crop is not None else None
        if box is None:  # whole-image mode, or an empty mask (no box to crop around)
            return resize_pair(image, mask, self.size)
        if rng is not None:
            box = jitter_box(box, self.cfg.box_jitter, image.shape[:2], rng)
        return crop_pair(image, mask, crop_window(box, self.cfg.box_crop, image.shape[:2]), self.size)

    def make_sample(
        self, img: np.ndarray, msk: np.ndarray, rng: np.random.Generator | None, index: int
    ) -> dict:
        """img (S,S,3) float32 [0,1], msk (S,S) {0,1} → the sample dict described in the module docstring."""
        s = self.size
        box = mask_box(msk)
        if box is None:
            box = np.array([0, 0, s, s], np.float32)
        elif rng is not None:
            box = jitter_box(box, self.cfg.box_jitter, (s, s), rng)
        if self.cfg.prompt == "points":
            points, labels = sample_points(msk, self.cfg.num_pos_points, self.cfg.num_neg_points, rng)
        else:  # unused by the model; a fixed padding point keeps batches collatable (and skips a distance map)
            points, labels = np.zeros((1, 2), np.float32), -np.ones(1, np.int32)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "mask": torch.from_numpy(msk.astype(np.float32))[None],
            "valid": torch.ones(1, s, s, dtype=torch.bool),
            "box": torch.from_numpy(box),
            "points": torch.from_numpy(points),
            "point_labels": torch.from_numpy(labels),
            "index": index,
        }


class StepSampler(Sampler):
    """Yields ``(index, sample_seed)`` batches for steps ``start..max_steps`` deterministically from ``seed``.

    Epoch e is a permutation drawn from ``(seed, e)``; the k-th sample of the run gets seed ``(seed, k)``. So the
    batch at step t is the same whether a run went straight through or resumed at t.

    With ``world`` data-parallel workers, ``batch_size`` is the global batch and rank ``rank`` gets its
    ``rank``-th contiguous ``batch_size / world`` share: the N shards of a step are exactly the one-worker batch.
    """

    def __init__(self, n: int, batch_size: int, max_steps: int, seed: int, start_step: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        if n == 0:
            raise ValueError("no training images: check the manifest's train split and data.train_datasets")
        if batch_size % world:
            raise ValueError(f"a global batch of {batch_size} does not split into {world} equal shards")
        self.n, self.bs, self.max_steps, self.seed, self.start = n, batch_size, max_steps, seed, start_step
        self.shard = slice(rank * batch_size // world, (rank + 1) * batch_size // world)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start)

    def __iter__(self):
        perms: dict[int, np.ndarray] = {}
        for step in range(self.start, self.max_steps):
            batch = []
            for j in range(self.bs):
                k = step * self.bs + j
                epoch, pos = divmod(k, self.n)
                if epoch not in perms:
                    perms.clear()
                    perms[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.n)
                batch.append(
                    (int(perms[epoch][pos]), int(np.random.SeedSequence((self.seed, k)).generate_state(1)[0]))
                )
            yield batch[self.shard]

"""Weak labels: the sample fields the supervised step reads, and helpers that make them.

Three kinds of weaker-than-mask supervision flow through the ordinary supervised step (``Supervised``):

- **Box-only rows** (``label_kind == "box"``, e.g. Kvasir's ``kavsir_bboxes.json``): the sample carries
  ``weak_box`` = True and ``gt_box`` = the annotated box in the S×S model grid; ``mask`` is all zeros and
  ``valid`` all False (nothing is known per pixel). The supervised step trains these with
  :func:`medsam2.losses.box_projection_loss` instead of a mask loss; the box is also the prompt (``box``, with
  the usual training jitter).
- **Image-level "no finding" negatives** (``label_kind == "image"`` and no lesion): an ordinary sample with an
  all-zero ``mask`` and an all-True ``valid``; the mask loss then pushes every pixel to background. The prompt
  is the full-image box (what ``SegDataset`` already gives an empty mask).
- **Partial labels**: ``valid`` False where the label is unknown; every mask loss ignores those pixels.

Every sample of a batch must carry the same keys (``collate`` stacks them), so once a dataset can emit weak
boxes, *every* sample has ``weak_box`` (scalar bool) and ``gt_box`` ((4,) float32) — use
:func:`with_weak_defaults` for the ordinary ones.

Box geometry: ``x0, y0, x1, y1`` in pixels, exclusive end (``x1`` = last column + 1), as in
``medsam2.data.prompts``. A box from the manifest is in the original (H, W) image; the dataset resizes it to
S×S with :func:`scale_box` — or, when geometric augmentation runs, rasterises it with :func:`box_label_mask`,
augments that mask together with the image (as the "mask"), and takes :func:`mask_box` of the result.
"""

from __future__ import annotations

import numpy as np
import torch

from medsam2.data.prompts import mask_box


def scale_box(box: np.ndarray | list[float], hw: tuple[int, int], size: int) -> np.ndarray:
    """(4,) box in an (H, W) image → (4,) float32 box in the S×S model grid (SAM2's square resize)."""
    h, w = hw
    b = np.asarray(box, np.float32).reshape(4)
    return (b * np.array([size / w, size / h, size / w, size / h], np.float32)).astype(np.float32)


def box_label_mask(box: np.ndarray | list[float], hw: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 {0,1} mask of a box (exclusive end, clipped to the image), to augment with the image."""
    h, w = hw
    x0, y0, x1, y1 = np.asarray(box, np.float64).reshape(4)
    out = np.zeros((h, w), np.uint8)
    c0, c1 = int(np.clip(np.floor(x0), 0, w)), int(np.clip(np.ceil(x1), 0, w))
    r0, r1 = int(np.clip(np.floor(y0), 0, h)), int(np.clip(np.ceil(y1), 0, h))
    out[r0:r1, c0:c1] = 1
    return out


def weak_box_fields(box_s: np.ndarray | None, size: int) -> dict[str, torch.Tensor]:
    """Fields of a box-only sample whose box is ``box_s`` (4,) in the S×S grid (None: box lost, e.g. cropped
    away by augmentation → the sample is treated as a "no finding" negative box covering nothing).

    Returns ``weak_box`` () bool True, ``gt_box`` (4,) float32, ``mask`` (1,S,S) zeros and ``valid``
    (1,S,S) all False.
    """
    gt = np.zeros(4, np.float32) if box_s is None else np.asarray(box_s, np.float32)
    return {
        "weak_box": torch.tensor(True),
        "gt_box": torch.from_numpy(gt),
        "mask": torch.zeros(1, size, size),
        "valid": torch.zeros(1, size, size, dtype=torch.bool),
    }


def box_from_augmented(box_mask: np.ndarray) -> np.ndarray | None:
    """Tight (4,) float32 box of an augmented box mask (S,S) {0,1}, or None when nothing is left."""
    return mask_box(box_mask)


def with_weak_defaults(sample: dict) -> dict:
    """A mask-labelled sample with ``weak_box`` False and ``gt_box`` = its prompt box, so it collates with
    box-only samples. Leaves samples that already have the fields untouched."""
    if "weak_box" not in sample:
        sample = {**sample, "weak_box": torch.tensor(False), "gt_box": sample["box"].clone().float()}
    return sample


def negative_fields(size: int) -> dict[str, torch.Tensor]:
    """Fields of an image-level "no finding" sample: ``mask`` (1,S,S) zeros, ``valid`` (1,S,S) all True, and
    the full-image prompt ``box`` (4,) = (0, 0, S, S)."""
    return {
        "mask": torch.zeros(1, size, size),
        "valid": torch.ones(1, size, size, dtype=torch.bool),
        "box": torch.tensor([0.0, 0.0, float(size), float(size)]),
    }

"""Masks reach the model by nearest-neighbour resampling (issue 14): a {0,1} mask stays the same pixels.

The expected arrays are computed by hand from the nearest-neighbour rule (output pixel i reads source pixel
floor(i · H / S)), not by calling OpenCV. A bilinear resize (``cv2.resize(mask, size, cv2.INTER_NEAREST)``,
where the flag lands in ``dst``) blends neighbours of this checkered pattern and fails both tests.
"""

from __future__ import annotations

import numpy as np
import pytest

from medsam2.data.crops import crop_pair
from medsam2.data.dataset import resize_pair


def _nearest(mask: np.ndarray, size: int) -> np.ndarray:
    h, w = mask.shape
    rows = np.floor(np.arange(size) * h / size).astype(int)
    cols = np.floor(np.arange(size) * w / size).astype(int)
    return mask[rows][:, cols]


def _pattern(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((h, w)) > 0.5).astype(np.uint8)  # fine structure: every resampling rule shows


@pytest.mark.parametrize("size", [16, 64, 106])  # shrink and enlarge a 37 x 53 mask
def test_resize_pair_mask_is_nearest(size):
    mask = _pattern(37, 53)
    image = np.zeros((37, 53, 3), np.uint8)
    _, out = resize_pair(image, mask, size)
    assert out.dtype == np.uint8 and out.shape == (size, size)
    np.testing.assert_array_equal(out, _nearest(mask, size))


def test_crop_pair_mask_is_nearest():
    mask = _pattern(60, 80)
    image = np.zeros((60, 80, 3), np.uint8)
    window = np.array([10, 5, 50, 45])  # x0, y0, x1, y1 inside the image
    _, out = crop_pair(image, mask, window, 32)
    np.testing.assert_array_equal(out, _nearest(mask[5:45, 10:50], 32))

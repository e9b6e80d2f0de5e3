"""Box baselines: box convention, hand-drawn ellipses, and Dice floors on a disk."""

import math

import numpy as np
import pytest

from medsam2.eval.baselines import (
    BASELINES,
    box_to_mask,
    ellipse_from_box,
    ellipse_in_box,
    fill_box,
    mask_to_box,
)
from medsam2.metrics import segmentation_metrics


def disk(shape=(64, 64), center=(30.5, 33.5), radius=20.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]] + 0.5
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def test_mask_to_box_is_inclusive_exclusive():
    m = np.zeros((6, 10), bool)
    m[2:5, 3:8] = True  # rows 2..4, columns 3..7
    m[3, 5] = False
    assert mask_to_box(m) == (3, 2, 8, 5)
    assert mask_to_box(np.zeros((4, 4), bool)) is None
    assert np.array_equal(box_to_mask(mask_to_box(m), m.shape), m | (box_to_mask((3, 2, 8, 5), m.shape)))


def test_fill_box_of_a_rectangle_is_the_rectangle():
    m = np.zeros((6, 10), bool)
    m[1:4, 2:9] = True
    assert np.array_equal(fill_box(m), m)


def test_ellipse_by_hand():
    # 3x3 box: normalised pixel centres -2/3, 0, 2/3; corners 4/9 + 4/9 ≤ 1 → all nine pixels inside.
    assert ellipse_from_box((0, 0, 3, 3), (3, 3)).all()
    # 4x4 box: centres ±.25, ±.75; corners .5625·2 > 1 out, everything else in → 12 pixels.
    e = ellipse_from_box((0, 0, 4, 4), (4, 4))
    assert e.sum() == 12 and not e[0, 0] and not e[3, 3] and e[0, 1] and e[1, 1]


def test_empty_in_empty_out():
    empty = np.zeros((5, 5), bool)
    assert not ellipse_in_box(empty).any() and not fill_box(empty).any()
    assert ellipse_in_box(empty).shape == (5, 5)


def test_disk_baseline_dice():
    d = disk()
    assert segmentation_metrics(ellipse_in_box(d), d)["dice"] > 0.97
    # Filled box around a disk of radius 20 centred on a pixel centre: the box is 41 x 41 pixels, the disk
    # ≈ π·20² pixels, so Dice ≈ 2·400π / (400π + 41²) ≈ 0.856 (2π / (π + 4) ≈ 0.880 in the continuum).
    assert d.sum() == pytest.approx(400 * math.pi, rel=0.01)
    expected = 2 * 400 * math.pi / (400 * math.pi + 41**2)
    assert segmentation_metrics(fill_box(d), d)["dice"] == pytest.approx(expected, abs=0.005)


def test_registry():
    assert BASELINES.names() == ["ellipse_in_box", "empty", "fill_box"]
    assert BASELINES.get("fill_box") is fill_box

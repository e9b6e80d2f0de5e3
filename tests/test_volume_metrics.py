"""3-D metrics (``medsam2.metrics.volume_metrics``): golden values on tiny volumes with anisotropic spacing."""

from __future__ import annotations

import numpy as np
import pytest

from medsam2.metrics import hd95, volume_metrics


def _cube(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


def test_identical_volumes_are_perfect():
    t = _cube((6, 10, 10), (1, 2, 2), (5, 8, 8))
    assert volume_metrics(t, t, (3.0, 1.0, 1.0)) == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}


def test_shift_along_z_is_measured_in_slice_spacing():
    t = _cube((8, 10, 10), (2, 2, 2), (6, 8, 8))
    p = np.roll(t, 1, axis=0)  # one slice up: 3 mm with 3 mm slices
    m = volume_metrics(p, t, (3.0, 0.5, 0.5), tolerance_mm=2.0)
    assert m["dice"] == pytest.approx(2 * 3 / 8)
    assert m["hd95"] == pytest.approx(3.0)
    # with a 3 mm tolerance every boundary voxel is within it; with 2 mm the shifted caps are not
    assert volume_metrics(p, t, (3.0, 0.5, 0.5), tolerance_mm=3.0)["nsd"] == 1.0
    assert 0.0 < m["nsd"] < 1.0


def test_nsd_counts_boundary_voxels_within_tolerance():
    t = _cube((1, 1, 10), (0, 0, 0), (1, 1, 4))  # a line of 4 voxels, all boundary
    p = _cube((1, 1, 10), (0, 0, 0), (1, 1, 6))  # 6 voxels: two beyond, at 1 and 2 mm
    m = volume_metrics(p, t, (1.0, 1.0, 1.0), tolerance_mm=1.0)
    assert m["nsd"] == pytest.approx((5 + 4) / (6 + 4))
    assert m["dice"] == pytest.approx(8 / 10)


def test_empty_rules_and_matching_2d_hd95():
    t = _cube((3, 10, 10), (1, 2, 2), (2, 8, 8))
    empty = np.zeros_like(t)
    assert volume_metrics(empty, empty, (1, 1, 1)) == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    miss = volume_metrics(empty, t, (2.0, 1.0, 1.0))
    assert miss["dice"] == 0.0 and miss["nsd"] == 0.0 and miss["hd95"] == pytest.approx(np.sqrt(6**2 + 10**2 + 10**2))
    # an in-plane shift of one column is one column spacing, as the 2-D HD95 of a slice says
    assert volume_metrics(np.roll(t, 1, axis=2), t, (5.0, 0.7, 0.9))["hd95"] == pytest.approx(0.9)
    assert hd95(np.roll(t[1], 1, axis=1), t[1], (0.7, 0.9)) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="volumes of one shape"):
        volume_metrics(t[0], t[0], (1, 1))

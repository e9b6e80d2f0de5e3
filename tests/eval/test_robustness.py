"""Corruption suite: identity at severity 0, determinism, hand-computed values, monotone strength."""

import numpy as np
import pandas as pd
import pytest

from medsam2.eval.robustness import (
    CORRUPTIONS,
    IMAGE_CORRUPTIONS,
    PROMPT_CORRUPTIONS,
    apply_corruption,
    corruption_target,
    iter_conditions,
    severity_drop,
)


def textured_image(h=256, w=320, seed=0):
    """Smooth random structure plus edges: something blur, noise and JPEG all visibly change.

    256 px short side: blur σ is relative to it (severity 1 → 0.5 px), so a tiny image would barely change.
    """
    rng = np.random.default_rng(seed)
    low = rng.uniform(30, 220, size=(8, 10, 3))
    img = np.kron(low, np.ones((h // 8, w // 10, 1)))
    img[::7] = 250  # thin bright lines (high frequencies)
    return img.astype(np.uint8)


def test_registry_covers_the_suite():
    assert set(CORRUPTIONS.names()) == set(IMAGE_CORRUPTIONS) | set(PROMPT_CORRUPTIONS)
    assert corruption_target("blur") == "image" and corruption_target("box_scale") == "box"
    assert corruption_target("point_shift") == "points"


@pytest.mark.parametrize("name", IMAGE_CORRUPTIONS + PROMPT_CORRUPTIONS)
def test_severity_zero_is_identity(name):
    img, box, pts = textured_image(), (10, 12, 40, 50), np.array([[5.0, 6.0], [70.0, 60.0]])
    out = apply_corruption(name, image=img, box=box, points=pts, severity=0)
    assert np.array_equal(out.image, img) and out.image is not img
    assert np.array_equal(out.box, box) and np.array_equal(out.points, pts)


@pytest.mark.parametrize("name", IMAGE_CORRUPTIONS)
def test_image_corruptions_keep_dtype_shape_and_grow_with_severity(name):
    for img in (textured_image(), textured_image()[..., 0]):  # RGB and grey
        errors = []
        for s in range(6):
            out = apply_corruption(name, image=img, severity=s, seed=1).image
            assert out.dtype == np.uint8 and out.shape == img.shape
            assert np.array_equal(out, apply_corruption(name, image=img, severity=s, seed=1).image)
            errors.append(np.abs(out.astype(float) - img).mean())
        assert errors[0] == 0 and errors[1] > 0
        assert all(b >= a for a, b in zip(errors, errors[1:], strict=False)), (name, errors)


def test_noise_depends_on_seed_only():
    img = textured_image()
    a = apply_corruption("gaussian_noise", image=img, severity=3, seed=0).image
    b = apply_corruption("gaussian_noise", image=img, severity=3, seed=1).image
    assert not np.array_equal(a, b)


def test_brightness_and_contrast_by_hand():
    flat = np.full((4, 4, 3), 100, np.uint8)
    # severity 1: +0.06 · 255 = 15.3 → 115
    assert (apply_corruption("brightness", image=flat, severity=1).image == 115).all()
    half = np.zeros((4, 4), np.uint8)
    half[:, 2:] = 200  # mean 100
    out = apply_corruption("low_contrast", image=half, severity=3).image  # c = 0.5 → 50 and 150
    assert (out[:, :2] == 50).all() and (out[:, 2:] == 150).all()


def test_box_scale_by_hand():
    # factor 1.1 about the centre (20, 30): half-sides 10 → 11 and 20 → 22
    out = apply_corruption("box_scale", box=(10, 10, 30, 50), severity=1, image_size=(100, 100))
    assert out.box == pytest.approx([9, 8, 31, 52])
    assert out.image is None and out.points is None
    # factor 1.6 near the corner: (-3, -3, 13, 13) clipped to the image
    clipped = apply_corruption("box_scale", box=(0, 0, 10, 10), severity=5, image_size=(100, 100)).box
    assert clipped == pytest.approx([0, 0, 13, 13])


def test_box_jitter_bounds():
    box = np.array([20.0, 30.0, 60.0, 50.0])  # 40 wide, 20 high; severity 5: f = 0.3
    for seed in range(20):
        out = apply_corruption("box_jitter", box=box, severity=5, seed=seed, image_size=(64, 64)).box
        shift = np.abs(out - np.clip(box, 0, [64, 64, 64, 64]))
        assert (shift <= np.array([12, 6, 12, 6]) + 1e-9).all()
        assert 0 <= out[0] < out[2] <= 64 and 0 <= out[1] < out[3] <= 64


def test_point_shift_distance_and_clipping():
    pts = np.array([[50.0, 50.0], [10.0, 20.0], [0.0, 99.0]])
    out = apply_corruption("point_shift", points=pts, severity=3, seed=0, image_size=(100, 100)).points
    dist = np.linalg.norm(out - pts, axis=1)
    assert dist[:2] == pytest.approx([4.0, 4.0])  # r = 0.04 · 100
    assert (out >= 0).all() and (out <= 99).all()


def test_apply_corruption_errors():
    img = textured_image()
    with pytest.raises(ValueError, match="pass box"):
        apply_corruption("box_jitter", image=img, severity=1)
    with pytest.raises(ValueError, match="image_size"):
        apply_corruption("box_jitter", box=(0, 0, 5, 5), severity=1)
    with pytest.raises(ValueError, match="severity"):
        apply_corruption("blur", image=img, severity=6)
    with pytest.raises(ValueError, match="uint8"):
        apply_corruption("blur", image=img.astype(np.float32), severity=1)
    with pytest.raises(ValueError, match="uint8"):
        apply_corruption("jpeg", image=np.zeros((8, 8, 4), np.uint8), severity=1)  # RGBA: convert first
    with pytest.raises(KeyError, match="unknown corruption"):
        apply_corruption("fog", image=img, severity=1)


def test_iter_conditions():
    conds = list(iter_conditions(["blur", "jpeg"], severities=(1, 3)))
    assert conds == [("clean", 0), ("blur", 1), ("blur", 3), ("jpeg", 1), ("jpeg", 3)]


def test_severity_drop_by_hand():
    df = pd.DataFrame(
        {
            "condition": ["clean", "clean", "blur", "blur", "blur", "blur", "jpeg"],
            "severity": [0, 0, 1, 1, 2, 2, 1],
            "dice": [0.9, 0.8, 0.8, 0.7, 0.5, 0.6, float("nan")],
        }
    )
    drops = severity_drop(df)
    assert drops[("blur", 1)] == pytest.approx(0.1)
    assert drops[("blur", 2)] == pytest.approx(0.3)
    assert np.isnan(drops[("jpeg", 1)])
    # A corruption with its own severity-0 rows uses them as its reference.
    own = pd.DataFrame({"corruption": ["noise"] * 3, "severity": [0, 0, 3], "dice": [1.0, 0.8, 0.7]})
    assert severity_drop(own) == pytest.approx({("noise", 3): 0.2})
    with pytest.raises(KeyError, match="dice"):
        severity_drop(df.drop(columns="dice"))

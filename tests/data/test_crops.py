"""Box-centred crops: window geometry, crop ↔ paste-back round trip, and the dataset / predict wiring."""

import numpy as np
import torch

from medsam2.data.crops import OUTSIDE_LOGIT, box_to_crop, crop_pair, crop_window, paste_logits


def test_window_grows_the_box_by_the_margin_on_each_side():
    win = crop_window(np.array([100, 50, 200, 90], np.float32), 0.25, (480, 640))
    # width 100 → 25 px each side; height 40 → 10 px each side
    assert win.tolist() == [75, 40, 225, 100]


def test_window_has_a_minimum_side_and_may_leave_the_image():
    win = crop_window(np.array([0, 0, 2, 2], np.float32), 0.1, (100, 100))
    assert (win[2] - win[0], win[3] - win[1]) == (16, 16)
    assert win[0] < 0 and win[1] < 0  # centred on the box, zero-padded outside the image


def test_crop_maps_box_to_its_place_and_pads_outside_with_zeros():
    img = np.full((40, 60, 3), 200, np.uint8)
    win = np.array([-10, 0, 30, 40])  # 10 px left of the image
    crop, _ = crop_pair(img, None, win, 40)
    assert crop.shape == (40, 40, 3)
    assert crop[:, :10].max() == 0 and crop[:, 10:].min() == 200
    box = box_to_crop(np.array([0, 10, 20, 30], np.float32), win, 80)  # scale 2
    assert box.tolist() == [20.0, 20.0, 60.0, 60.0]


def test_paste_back_inverts_the_crop_for_a_mask():
    mask = np.zeros((90, 120), np.uint8)
    mask[30:60, 40:90] = 1
    box = np.array([40, 30, 90, 60], np.float32)
    win = crop_window(box, 0.2, mask.shape)
    _, crop_mask = crop_pair(np.zeros((90, 120, 3), np.uint8), mask, win, 64)
    logits = torch.from_numpy(np.where(crop_mask > 0, 10.0, -10.0).astype(np.float32))[None, None]
    back = paste_logits(logits, win, mask.shape)[0, 0].numpy() > 0
    inter = (back & (mask > 0)).sum()
    assert 2 * inter / (back.sum() + mask.sum()) > 0.97
    outside = np.ones(mask.shape, bool)
    outside[max(win[1], 0):win[3], max(win[0], 0):win[2]] = False
    assert np.all(paste_logits(logits, win, mask.shape)[0, 0].numpy()[outside] == OUTSIDE_LOGIT)


def test_flip_tta_of_a_symmetric_prior_model_is_the_prior(kvasir_workdir):
    """Flip TTA mirrors the image and the prompts consistently: a model that is only its (symmetric) box prior
    predicts the same with and without TTA."""
    from medsam2.config import ModelCfg
    from medsam2.data.dataset import load_cached
    from medsam2.data.manifest import read_manifest
    from medsam2.data.prompts import mask_box
    from medsam2.engine.checkpoint import build_model
    from medsam2.engine.predict import predict

    row = read_manifest(kvasir_workdir).iloc[0]
    image, mask = load_cached(kvasir_workdir, row)
    box = mask_box(np.asarray(mask))
    plain, _ = build_model(ModelCfg(image_size=64, box_prior="ellipse", box_crop=0.2))
    tta, _ = build_model(ModelCfg(image_size=64, box_prior="ellipse", box_crop=0.2, tta_flip=True))
    a = predict(plain.eval(), [np.asarray(image)], boxes=[box])[0]
    b = predict(tta.eval(), [np.asarray(image)], boxes=[box])[0]
    assert np.array_equal(a.mask, b.mask)
    box_off = box + np.array([5, 0, 5, 0], np.float32)  # an asymmetric prompt must move the TTA mask too
    c = predict(tta.eval(), [np.asarray(image)], boxes=[box_off])[0]
    assert not np.array_equal(b.mask, c.mask)

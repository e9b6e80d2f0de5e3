"""``predict`` resamples the mask logits to the image once (issue 14), as SAM2's own predictor does.

SAM2's decoder predicts at S/4; the stock path used to go S/4 → S (inside the model) → (H, W). Now the S/4
logits go straight to (H, W) (and, with ``model.box_crop``, straight to the crop window that
``paste_logits`` places). Decoders that predict at S (``multiscale``) resample their S logits once, as before.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsam2.config import ModelCfg
from medsam2.data.crops import OUTSIDE_LOGIT, box_to_crop, crop_pair, crop_window, paste_logits
from medsam2.data.dataset import resize_pair
from medsam2.engine.checkpoint import build_model
from medsam2.engine.predict import predict
from medsam2.model.decoders.stock import run_sam_decoder
from medsam2.model.segmenter import Segmenter, normalize

S = 64
HW = (50, 90)  # neither square nor S: the two resampling routes differ
BOX = np.array([12.0, 8.0, 60.0, 40.0], np.float32)


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    model, _ = build_model(ModelCfg(image_size=S))
    return model.sam.eval()


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (*HW, 3), dtype=np.uint8)


def _model(sam, **cfg) -> Segmenter:
    """A Segmenter around the shared SAM2 (the stock decoder and the priors have no parameters of their own)."""
    return Segmenter(sam, ModelCfg(image_size=S, **cfg)).eval()


def _input(img: np.ndarray) -> torch.Tensor:
    return normalize(torch.from_numpy(img.astype(np.float32)[None] / 255.0).permute(0, 3, 1, 2))


def _low_res(model: Segmenter, x: torch.Tensor, box_s: np.ndarray) -> torch.Tensor:
    boxes = torch.from_numpy(box_s[None])
    sparse, dense = model.prompt_embeddings(1, x.device, boxes)
    return run_sam_decoder(model.sam, model.encode(x), sparse, dense)[0]


def _up(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(t.float(), size=hw, mode="bilinear", align_corners=False)


def _box_s() -> np.ndarray:
    return (BOX.reshape(2, 2) * np.array([S / HW[1], S / HW[0]], np.float32)).reshape(4)


@torch.no_grad()
def test_stock_decoder_upsamples_low_res_logits_once(sam, image):
    model = _model(sam)
    x = _input(resize_pair(image, None, S)[0])
    low = _low_res(model, x, _box_s())
    assert low.shape[-1] == S // 4
    once = torch.sigmoid(_up(low, HW))[0, 0].numpy()
    twice = torch.sigmoid(_up(_up(low, (S, S)), HW))[0, 0].numpy()
    assert np.abs(once - twice).max() > 1e-4  # the two routes are distinguishable on this input
    prob = predict(model, [image], boxes=[BOX], precision="fp32")[0].prob
    assert prob.shape == HW
    np.testing.assert_allclose(prob, once, atol=1e-5)


@torch.no_grad()
def test_at_model_resolution_it_equals_the_models_own_logits(sam):
    """An S×S image: predict's route (S/4 → S, prior at S) is exactly the model's forward (what training sees)."""
    img = np.random.default_rng(1).integers(0, 255, (S, S, 3), dtype=np.uint8)
    for cfg in ({}, {"box_prior": "ellipse"}):
        model = _model(sam, **cfg)
        ref = model(_input(img), boxes=torch.from_numpy(BOX[None] * 0.5))["logits"]
        prob = predict(model, [img], boxes=[BOX * 0.5], precision="fp32")[0].prob
        np.testing.assert_allclose(prob, torch.sigmoid(ref)[0, 0].numpy(), atol=1e-5, err_msg=str(cfg))


@torch.no_grad()
def test_box_prior_is_resampled_once_beside_the_logits(sam, image):
    model = _model(sam, box_prior="ellipse")
    x = _input(resize_pair(image, None, S)[0])
    low = _low_res(model, x, _box_s())
    prior = model.prior.fn(torch.from_numpy(_box_s()[None]), S)
    want = torch.sigmoid(_up(low, HW) + _up(prior, HW))[0, 0].numpy()
    prob = predict(model, [image], boxes=[BOX], precision="fp32")[0].prob
    np.testing.assert_allclose(prob, want, atol=1e-5)


@torch.no_grad()
def test_box_crop_resamples_once_to_the_window_and_keeps_its_geometry(sam, image):
    model = _model(sam, box_crop=0.25)
    window = crop_window(BOX, 0.25, HW)
    crop = crop_pair(image, None, window, S)[0]
    low = _low_res(model, _input(crop), box_to_crop(BOX, window, S))
    x0, y0, x1, y1 = (int(v) for v in window)
    want = torch.sigmoid(paste_logits(_up(low, (y1 - y0, x1 - x0)), window, HW))[0, 0].numpy()
    prob = predict(model, [image], boxes=[BOX], precision="fp32")[0].prob
    np.testing.assert_allclose(prob, want, atol=1e-5)
    outside = np.ones(HW, bool)
    outside[max(y0, 0):y1, max(x0, 0):x1] = False
    if outside.any():  # background outside the window, as before
        np.testing.assert_allclose(prob[outside], torch.sigmoid(torch.tensor(OUTSIDE_LOGIT)).item(), atol=1e-7)


@torch.no_grad()
def test_full_resolution_decoder_resamples_its_s_logits_once(sam, image):
    torch.manual_seed(0)
    model = _model(sam, decoder="multiscale")
    torch.nn.init.normal_(model.decoder.refiner.head.weight, std=0.5)  # a non-zero refinement at S
    x = _input(resize_pair(image, None, S)[0])
    logits = model(x, boxes=torch.from_numpy(_box_s()[None]))["logits"]
    assert logits.shape[-1] == S
    prob = predict(model, [image], boxes=[BOX], precision="fp32")[0].prob
    np.testing.assert_allclose(prob, torch.sigmoid(_up(logits, HW))[0, 0].numpy(), atol=1e-5)

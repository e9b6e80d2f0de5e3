"""Volume propagation (``medsam2.engine.volume``) against SAM2 itself: with the same weights and frames, our
``track`` gives the logits of ``sam2``'s ``SAM2VideoPredictor`` (≤ 1e-4).

What is compared: the low-resolution mask logits (``pred_masks``, (1,1,S/4,S/4) per slice) that the predictor
keeps in ``inference_state["output_dict_per_obj"][0]`` after ``propagate_in_video`` forwards and then
``reverse=True``, against ``track(...).low_res``. The reference reads its frames from JPEGs in ``tmp_path``
through its own ``init_state``; our side gets the tensor ``init_state`` decoded (``state["images"]``), so both
see the very same frames. Weights: one random-init hiera-t SAM2 at 128 px (no pretrained weights exist here),
copied into a ``SAM2VideoPredictor`` built from the same Meta config.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medsam2.config import load_config
from medsam2.engine.volume import SlicePrompt, segment_volume, slice_frames, track
from medsam2.model.backbone import build_sam2_base
from medsam2.model.segmenter import build_segmenter

S = 128
TOL = 1e-4


@pytest.fixture(scope="module")
def models():
    cfg = load_config(overrides=[f"model.image_size={S}"]).model
    model, _ = build_segmenter(cfg, seed=0)
    model.eval()
    ref = build_sam2_base("hiera_t", "2.1", S, video_predictor=True)
    ref.load_state_dict(model.sam.state_dict())
    # our image path trains and serves one mask token (build_segmenter); the reference runs the same setting
    ref.sam_mask_decoder.dynamic_multimask_via_stability = model.sam.sam_mask_decoder.dynamic_multimask_via_stability
    ref.eval()
    return model, ref


def _ct_slices(sample_data, z0: int = 10, n: int = 7) -> list[np.ndarray]:
    """``n`` consecutive axial slices of the shared TotalSegmentator CT, (H, W, 3) uint8 each."""
    from medsam2.data.volumes import read_volume

    vol = read_volume(sample_data / "totalsegmentator-examples" / "example_ct_sm.nii.gz")
    return list(vol.slices[z0:z0 + n])


def _reference(ref, slices, tmp_path, prompts: dict[int, SlicePrompt]):
    """Run SAM2VideoPredictor on ``slices`` (written as JPEGs) → (its decoded frames, (Z,1,S/4,S/4) logits)."""
    for z, s in enumerate(slices):
        Image.fromarray(s).save(tmp_path / f"{z:05d}.jpg", quality=95)
    state = ref.init_state(str(tmp_path))
    for z, p in prompts.items():
        if p.mask is not None:
            ref.add_new_mask(state, frame_idx=z, obj_id=1, mask=p.mask)
        else:
            ref.add_new_points_or_box(state, frame_idx=z, obj_id=1, box=p.box, points=p.points, labels=p.labels)
    for _ in ref.propagate_in_video(state):
        pass
    for _ in ref.propagate_in_video(state, reverse=True):
        pass
    od = state["output_dict_per_obj"][0]
    logits = [(od["cond_frame_outputs"].get(z) or od["non_cond_frame_outputs"][z])["pred_masks"]
              for z in range(len(slices))]
    return state["images"], torch.cat(logits).float()


def _ours(model, frames, prompts, hw):
    with torch.no_grad():
        return track(model.sam, frames, {z: p.scaled(hw, S) for z, p in prompts.items()})


def test_box_on_one_slice_matches_sam2_video_predictor(models, sample_data, tmp_path):
    model, ref = models
    slices = _ct_slices(sample_data)
    hw = slices[0].shape[:2]
    prompts = {3: SlicePrompt(box=np.array([30, 25, 80, 70], np.float32))}
    frames, want = _reference(ref, slices, tmp_path, prompts)
    got = _ours(model, frames, prompts, hw)
    assert got.order == (3, 4, 5, 6, 2, 1, 0)  # prompted slice, forwards, then backwards
    diff = (got.low_res - want).abs().max().item()
    assert diff <= TOL, f"max |logit diff| {diff:.3g} vs SAM2VideoPredictor"
    # memory matters: a propagated slice differs from the same slice prompted alone (no memory read)
    alone = _ours(model, frames[4:5], {0: prompts[3]}, hw).low_res
    assert (alone - got.low_res[4:5]).abs().max().item() > 1e-3


def test_mask_and_points_on_two_slices_match_sam2_video_predictor(models, sample_data, tmp_path):
    model, ref = models
    slices = _ct_slices(sample_data)
    hw = slices[0].shape[:2]
    mask = np.zeros(hw, bool)
    mask[30:60, 35:75] = True
    prompts = {1: SlicePrompt(mask=mask),
               5: SlicePrompt(points=np.array([[50, 45], [20, 20]], np.float32), labels=np.array([1, 0]))}
    frames, want = _reference(ref, slices, tmp_path, prompts)
    got = _ours(model, frames, prompts, hw)
    assert got.order == (1, 5, 2, 3, 4, 6, 0)
    diff = (got.low_res - want).abs().max().item()
    assert diff <= TOL, f"max |logit diff| {diff:.3g} vs SAM2VideoPredictor"
    # a mask prompt is the slice's output (SAM2's use_mask_input_as_output_without_sam): ±10 logits
    assert ((got.low_res[1, 0] > 0) == torch.from_numpy(
        np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((S // 4, S // 4), Image.BILINEAR)) > 127)
    ).float().mean() > 0.95


def test_segment_volume_gives_masks_at_slice_size(models, sample_data):
    model, _ = models
    slices = _ct_slices(sample_data, n=4)
    hw = slices[0].shape[:2]
    res = segment_volume(model, slices, {2: SlicePrompt(box=np.array([30, 25, 80, 70], np.float32))})
    assert res.masks.shape == (4, *hw) and res.masks.dtype == bool
    assert res.object_score.shape == (4,) and res.order == (2, 3, 1, 0)
    # same frames as track on slice_frames: the masks are its logits resampled once
    with torch.no_grad():
        low = track(model.sam, slice_frames(slices, S), {2: SlicePrompt(box=np.array([30, 25, 80, 70])).scaled(hw, S)})
    up = torch.nn.functional.interpolate(low.low_res, size=hw, mode="bilinear", align_corners=False)
    assert np.array_equal(res.masks, (up[:, 0] > 0).numpy())


def test_prompts_outside_the_volume_are_refused(models):
    model, _ = models
    frames = torch.zeros(3, 3, S, S)
    with pytest.raises(ValueError, match=r"slices \[5\]"):
        track(model.sam, frames, {5: SlicePrompt(box=np.array([1, 1, 9, 9]))})
    with pytest.raises(ValueError, match="needs a box"):
        SlicePrompt()

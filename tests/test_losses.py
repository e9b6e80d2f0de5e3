"""Losses on hand-made tensors: golden values at logit 0, perfect/inverted logits, partial labels, grads."""

import math

import pytest
import torch

from medsam2.losses import (
    LOSSES,
    box_masks,
    box_projection_loss,
    create_loss,
    iou_prediction_loss,
)

LN2 = math.log(2.0)


def target_4x4():
    """(1, 1, 4, 4) target with 4 foreground pixels (top-left 2x2) out of 16."""
    t = torch.zeros(1, 1, 4, 4)
    t[..., :2, :2] = 1.0
    return t


def test_registry_names():
    assert {"bce", "dice", "dice_bce", "focal_dice", "lovasz_bce"} <= set(LOSSES.names())


def test_golden_values_at_logit_zero():
    t = target_4x4()
    x = torch.zeros_like(t)  # every probability 0.5
    assert LOSSES.get("bce")(x, t).item() == pytest.approx(LN2)
    # soft Dice, smooth 1: 1 - (2 * 0.5 * 4 + 1) / (0.5 * 16 + 4 + 1) = 1 - 5/13
    assert LOSSES.get("dice")(x, t).item() == pytest.approx(8 / 13)
    assert LOSSES.get("dice_bce")(x, t).item() == pytest.approx(8 / 13 + LN2)
    # focal: ce = ln2, (1 - p_t)^2 = 1/4, alpha_t = .25 on 4 fg px and .75 on 12 bg px → ln2/4 * 10/16
    focal = LN2 / 4 * (4 * 0.25 + 12 * 0.75) / 16
    assert LOSSES.get("focal_dice")(x, t).item() == pytest.approx(20 * focal + 8 / 13, rel=1e-5)
    # Lovász hinge at logit 0: every error is 1, the Lovász weights telescope to the full Jaccard loss 1
    assert LOSSES.get("lovasz_bce")(x, t).item() == pytest.approx(1.0 + LN2)


def test_lovasz_hinge_golden_two_pixels():
    """t = [1, 0], x = [0.5, 0]: errors 1 - 0.5 = 0.5 (fg) and 1 + 0 = 1 (bg); sorted [1 (bg), 0.5 (fg)];
    Jaccard after each [1/2, 1] → weights [1/2, 1/2] → hinge 1 * 1/2 + 0.5 * 1/2 = 0.75."""
    t = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    x = torch.tensor([0.5, 0.0]).view(1, 1, 1, 2)
    assert LOSSES.get("lovasz_bce")(x, t, bce_weight=0.0).item() == pytest.approx(0.75)


@pytest.mark.parametrize("name", ["bce", "dice", "dice_bce", "focal_dice", "lovasz_bce"])
def test_perfect_low_inverted_high(name):
    t = torch.zeros(2, 1, 8, 8)
    t[0, 0, 2:6, 2:6] = 1
    t[1, 0, :3, :] = 1
    loss = LOSSES.get(name)
    perfect = loss(torch.where(t > 0, 20.0, -20.0), t).item()
    inverted = loss(torch.where(t > 0, -20.0, 20.0), t).item()
    assert perfect < 1e-3
    assert inverted > 0.9


@pytest.mark.parametrize("name", ["bce", "dice", "dice_bce", "focal_dice", "lovasz_bce"])
def test_invalid_pixels_do_not_count(name):
    torch.manual_seed(0)
    t = (torch.rand(2, 1, 8, 8) > 0.5).float()
    valid = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    valid[:, :, :, 4:] = False  # right half unlabelled
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    loss = LOSSES.get(name)
    base = loss(x, t, valid)
    base.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.all(x.grad[..., 4:] == 0)  # no gradient where the label is unknown
    changed = x.detach().clone()
    changed[..., 4:] = torch.randn(2, 1, 8, 4) * 10
    assert loss(changed, t, valid).item() == pytest.approx(base.item(), abs=1e-6)
    # Flipping the target where it is unknown does not matter either.
    t2 = t.clone()
    t2[..., 4:] = 1 - t2[..., 4:]
    assert loss(x.detach(), t2, valid).item() == pytest.approx(base.item(), abs=1e-6)


@pytest.mark.parametrize("name", ["bce", "dice", "dice_bce", "focal_dice", "lovasz_bce"])
def test_no_valid_pixel_gives_differentiable_zero(name):
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    loss = LOSSES.get(name)(x, target_4x4().expand(2, 1, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(x.grad == 0)


def test_sample_without_valid_pixels_is_excluded_from_dice_mean():
    t = target_4x4().expand(2, 1, 4, 4).clone()
    x = torch.zeros_like(t)
    valid = torch.ones_like(t, dtype=torch.bool)
    valid[1] = False
    assert LOSSES.get("dice")(x, t, valid).item() == pytest.approx(8 / 13)


def test_bf16_logits_are_computed_in_float32():
    t = target_4x4()
    loss = LOSSES.get("dice_bce")(torch.zeros_like(t, dtype=torch.bfloat16), t)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(8 / 13 + LN2, rel=1e-5)


def test_create_loss_binds_options():
    t, x = target_4x4(), torch.zeros(1, 1, 4, 4)
    assert create_loss("dice_bce", bce_weight=0.0)(x, t).item() == pytest.approx(8 / 13)
    assert create_loss("dice_bce", dice_weight=2.0, bce_weight=3.0)(x, t).item() == pytest.approx(
        2 * 8 / 13 + 3 * LN2
    )
    assert create_loss("bce")(x, t).item() == pytest.approx(LN2)
    with pytest.raises(TypeError, match="no option"):
        create_loss("dice", gamma=2.0)
    with pytest.raises(KeyError, match="unknown loss"):
        create_loss("nope")


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        LOSSES.get("bce")(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="valid shape"):
        LOSSES.get("bce")(
            torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 2, 2, dtype=bool)
        )


def test_iou_prediction_loss_golden():
    t = torch.zeros(2, 1, 4, 4)
    t[0, 0, :, :2] = 1  # 8 px
    logits = torch.full((2, 1, 4, 4), -5.0)
    logits[0, 0, :, 1:3] = 5.0  # 8 px, 4 shared with the target → IoU 4 / 12
    # sample 1: empty prediction, empty target → IoU 1
    logits.requires_grad_(True)
    pred_iou = torch.tensor([[0.5], [0.5]], requires_grad=True)
    loss = iou_prediction_loss(pred_iou, logits, t)
    assert loss.item() == pytest.approx(((0.5 - 1 / 3) ** 2 + 0.5**2) / 2)
    loss.backward()
    assert pred_iou.grad is not None and logits.grad is None  # actual IoU is detached


def test_box_masks_exclusive_end():
    m = box_masks(torch.tensor([[1.0, 0.0, 3.0, 2.0]]), 3, 4)
    expected = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(m[0, 0], expected)


def test_box_projection_loss_golden_at_logit_zero():
    # Box covers columns 0-1, all rows of a 4x4 image. Column profile: p = .5 × 4 vs [1, 1, 0, 0]
    # → 1 - 2·1 / (1 + 2) = 1/3. Row profile: .5 × 4 vs [1, 1, 1, 1] → 1 - 2·2 / (1 + 4) = 1/5.
    # Outside: BCE(logit 0, target 0) = ln 2.
    loss = box_projection_loss(torch.zeros(1, 1, 4, 4), torch.tensor([[0.0, 0.0, 2.0, 4.0]]))
    assert loss.item() == pytest.approx(1 / 3 + 1 / 5 + LN2, rel=1e-5)


def test_box_projection_loss_accepts_any_shape_touching_the_box():
    boxes = torch.tensor([[4.0, 2.0, 12.0, 14.0]])
    filled = box_masks(boxes, 16, 16)
    assert box_projection_loss(torch.where(filled > 0, 20.0, -20.0), boxes).item() < 1e-3
    # A plus-shaped object spanning the box has the box's projections too → near 0, not penalised.
    plus = torch.full((1, 1, 16, 16), -20.0)
    plus[..., 2:14, 7:9] = 20.0
    plus[..., 7:9, 4:12] = 20.0
    assert box_projection_loss(plus, boxes).item() < 1e-3
    # Nothing predicted → both projection terms ≈ 1.
    empty = torch.full((1, 1, 16, 16), -20.0, requires_grad=True)
    loss = box_projection_loss(empty, boxes)
    assert loss.item() == pytest.approx(2.0, abs=1e-3)
    # Spilling outside the box costs.
    spill = torch.where(filled > 0, 20.0, -20.0)
    spill[..., 0, :] = 20.0
    assert box_projection_loss(spill, boxes).item() > 0.5


def test_box_projection_loss_gradient_flows():
    x = torch.zeros(2, 1, 8, 8, requires_grad=True)
    box_projection_loss(x, torch.tensor([[1.0, 1.0, 5.0, 6.0], [0.0, 0.0, 8.0, 8.0]])).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_loss_options_and_iou_weight_come_from_the_config():
    from medsam2.config import load_config
    from medsam2.losses import bce_loss, dice_loss
    from medsam2.semisup.supervised import Supervised

    cfg = load_config(None, ["train.loss_options.bce_weight=2.5", "train.iou_weight=0.3"])
    sup = Supervised(None, cfg)
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(2, 1, 8, 8, generator=g), (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    want = dice_loss(logits, target) + 2.5 * bce_loss(logits, target)
    assert torch.allclose(sup.loss_fn(logits, target), want) and sup.iou_weight == 0.3
    with pytest.raises(ValueError, match="no option"):
        load_config(None, ["train.loss_options.focal_weight=2"])  # an option of focal_dice, not dice_bce
    with pytest.raises(ValueError, match="train.loss: 'nope' is not one of bce, dice, dice_bce"):
        load_config(None, ["train.loss=nope"])

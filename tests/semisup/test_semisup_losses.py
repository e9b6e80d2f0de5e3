"""Golden/sign checks of the semi-supervised loss pieces on hand-made tensors (no model)."""

from __future__ import annotations

import math

import numpy as np
import torch

from medsam2.data.weak import box_label_mask, scale_box, with_weak_defaults
from medsam2.engine.predict import Prediction
from medsam2.engine.self_training import confidence_score
from medsam2.losses import create_loss
from medsam2.semisup.adversarial import MaskDiscriminator, discriminator_loss, frozen_call, generator_loss
from medsam2.semisup.mean_teacher import (
    consistency_mse,
    ema_update,
    hflip_images,
    hflip_prompts,
    sigmoid_rampup,
    strong_view,
)
from medsam2.semisup.mutual_consistency import cps_loss


def test_consistency_zero_when_student_equals_teacher_and_grad_only_to_student():
    s = torch.randn(2, 1, 8, 8, requires_grad=True)
    t = s.detach().clone().requires_grad_(True)
    assert consistency_mse(s, t).item() == 0.0
    loss = consistency_mse(s, t + 1.0)
    assert loss.item() > 0
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_rampup_shape():
    assert sigmoid_rampup(0, 10) == math.exp(-5)
    assert sigmoid_rampup(10, 10) == 1.0 == sigmoid_rampup(50, 10)
    assert sigmoid_rampup(3, 10) < sigmoid_rampup(6, 10)
    assert sigmoid_rampup(0, 0) == 1.0


def test_hflip_prompts_and_images_are_consistent():
    s = 16
    img = torch.zeros(2, 1, s, s)
    img[:, :, 2:5, 1:4] = 1  # box 1,2,4,5 (exclusive end)
    flip = torch.tensor([True, False])
    prompts = {"boxes": torch.tensor([[1.0, 2, 4, 5]] * 2), "points": torch.tensor([[[2.5, 3.5]]] * 2)}
    fimg = hflip_images(img, flip)
    fp = hflip_prompts(prompts, flip, s)
    ys, xs = torch.nonzero(fimg[0, 0], as_tuple=True)
    tight = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert fp["boxes"][0].tolist() == tight
    assert fp["boxes"][1].tolist() == [1, 2, 4, 5]
    x, y = fp["points"][0, 0].tolist()
    assert fimg[0, 0, int(y), int(x)] == 1
    assert torch.equal(hflip_images(fimg, flip), img)


def test_strong_view_changes_images_deterministically_with_generator():
    x = torch.randn(3, 3, 8, 8)
    a, fa = strong_view(x, torch.Generator().manual_seed(0))
    b, fb = strong_view(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.equal(fa, fb)
    assert not torch.allclose(a, x)


def test_cps_loss_decreases_towards_agreement():
    loss_fn = create_loss("dice_bce")
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    a = (target * 2 - 1) * 4  # confident on the square
    far = -a  # disagrees everywhere
    near = a * 0.5
    assert cps_loss(loss_fn, a, near) < cps_loss(loss_fn, a, far)
    la = a.clone().requires_grad_(True)
    lb = far.clone().requires_grad_(True)
    cps_loss(loss_fn, la, lb).backward()
    assert la.grad is not None and lb.grad is not None  # each head learns from the other's hard label


def test_discriminator_loss_signs_and_weights():
    big = torch.full((4,), 8.0)
    assert discriminator_loss(big, -big) < 0.01  # D right → low
    assert discriminator_loss(-big, big) > 5  # D fooled both ways → high
    assert generator_loss(big) < 0.01 and generator_loss(-big) > 5
    w = torch.tensor([1.0, 1.0, 0.0, 0.0])
    real = torch.tensor([8.0, 8.0, -8.0, -8.0])  # the two unweighted reals would be costly
    assert discriminator_loss(real, -big, w) < 0.01
    assert torch.isfinite(discriminator_loss(real, -big, torch.zeros(4)))


def test_frozen_call_sends_no_gradient_to_the_discriminator():
    d = MaskDiscriminator(width=4, depth=2)
    prob = torch.rand(2, 1, 16, 16, requires_grad=True)
    generator_loss(frozen_call(d, prob, torch.randn(2, 3, 16, 16))).backward()
    assert prob.grad is not None and prob.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.parameters())


def test_ema_update_moves_teacher_only_on_trainable_params():
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    student.bias.requires_grad_(False)
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(1.0)
        for p in teacher.parameters():
            p.fill_(0.0)
    ema_update(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, torch.full((2, 2), 0.1))
    assert torch.equal(teacher.bias, torch.zeros(2))


def test_confidence_scores():
    certain = Prediction(mask=np.ones((4, 4), bool), prob=np.ones((4, 4), np.float32), iou_pred=0.7)
    unsure = Prediction(mask=np.zeros((4, 4), bool), prob=np.full((4, 4), 0.5, np.float32), iou_pred=1.3)
    assert confidence_score(certain, "mean_prob") > 0.999 and confidence_score(unsure, "mean_prob") == 0.5
    assert confidence_score(certain, "entropy") > 0.999 and abs(confidence_score(unsure, "entropy")) < 1e-6
    assert confidence_score(certain, "pred_iou") == 0.7 and confidence_score(unsure, "pred_iou") == 1.0


def test_weak_helpers():
    assert scale_box([10, 20, 30, 40], (200, 100), 50).tolist() == [5, 5, 15, 10]
    m = box_label_mask([1, 2, 4, 5], (8, 8))
    assert m.dtype == np.uint8 and m.sum() == 9 and m[2:5, 1:4].all()
    s = with_weak_defaults({"box": torch.tensor([1.0, 2, 3, 4])})
    assert s["weak_box"].item() is False and s["gt_box"].tolist() == [1, 2, 3, 4]

"""Each strategy on a tiny random-init SAM2 (hiera_t, 64 px): which parameters get gradients, weak labels,
and a 2-step run through the one training loop on real Kvasir images."""

from __future__ import annotations

import math

import pytest
import torch

from medsam2.config import ExperimentCfg, ModelCfg, load_config
from medsam2.engine.checkpoint import build_model
from medsam2.semisup import STRATEGIES
from medsam2.semisup.mutual_consistency import SecondHead
from medsam2.semisup.supervised import Supervised

S = 64


@pytest.fixture(scope="module")
def model():
    m, _ = build_model(ModelCfg(backbone="hiera_t", image_size=S), seed=0)
    return m.train()


def _cfg(**semisup) -> ExperimentCfg:
    return load_config(overrides=["model.image_size=64", "train.max_steps=10"]).model_copy(
        update={"semisup": load_config(overrides=[f"semisup.{k}={v}" for k, v in semisup.items()]).semisup}
    )


def make_batch(b: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, 1, S, S)
    mask[:, :, 16:40, 20:44] = 1
    return {
        "image": torch.randn(b, 3, S, S, generator=g),
        "mask": mask,
        "valid": torch.ones(b, 1, S, S, dtype=torch.bool),
        "box": torch.tensor([[20.0, 16, 44, 40]] * b),
        "points": torch.tensor([[[32.0, 28.0]]] * b),
        "point_labels": torch.ones(b, 1, dtype=torch.int32),
        "index": torch.arange(b),
    }


def _grads(module: torch.nn.Module) -> dict[str, bool]:
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in module.named_parameters()}


def _zero(*modules: torch.nn.Module) -> None:
    for m in modules:
        for p in m.parameters():
            p.grad = None


def test_registered():
    assert {"none", "mean_teacher", "mutual_consistency", "adversarial"} <= set(STRATEGIES.names())


def test_mean_teacher_gradients_and_ema(model):
    strat = STRATEGIES.create("mean_teacher", model, _cfg(unlabelled_weight=1.0))
    (teacher,) = strat.extra_modules()
    assert not any(p.requires_grad for p in teacher.parameters())
    _zero(model)
    losses = strat.losses(model, make_batch(), make_batch(seed=1), step=10)
    assert losses["loss_consistency"] >= 0 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert any(_grads(model).values()) and not any(_grads(teacher).values())
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    with torch.no_grad():  # move the student, then one EMA step must move the teacher's trainable weights
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    strat.after_step(model)
    moved = [n for n, p in teacher.named_parameters() if not torch.equal(p, before[n])]
    assert moved and int(teacher.updates) == 1
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.sub_(0.01)
    _zero(model)


def test_mutual_consistency_heads_share_only_the_encoder(model):
    strat = STRATEGIES.create("mutual_consistency", model, _cfg(unlabelled_weight=1.0))
    (head,) = strat.extra_modules()
    assert isinstance(head, SecondHead)
    own = {id(p) for p in model.parameters()}
    assert not any(id(p) in own for p in head.parameters())  # head B holds its own decoder copy only
    b = make_batch()
    out_a, out_b = strat.two_heads(model, b)
    assert out_a["logits"].shape == out_b["logits"].shape == (2, 1, S, S)
    assert not torch.allclose(out_a["logits"], out_b["logits"])  # perturbed copy: the heads disagree
    _zero(model, head)
    losses = strat.losses(model, b, make_batch(seed=1), step=10)
    assert {"loss_mask", "loss_mask_b", "loss_cps"} <= set(losses)
    losses["loss"].backward()
    g = _grads(model)
    assert any(v for n, v in g.items() if n.startswith("sam.image_encoder."))
    assert any(v for n, v in g.items() if n.startswith("sam.sam_mask_decoder."))
    assert any(_grads(head).values())
    _zero(model, head)


def test_adversarial_generator_and_discriminator_are_isolated(model):
    strat = STRATEGIES.create("adversarial", model, _cfg(unlabelled_weight=1.0))
    (disc,) = strat.extra_modules()
    b, u = make_batch(), make_batch(seed=1)
    _zero(model, disc)
    losses = strat.losses(model, b, u, step=10)
    losses["loss_adv"].backward(retain_graph=True)  # generator loss: segmenter only
    assert any(_grads(model).values()) and not any(_grads(disc).values())
    _zero(model, disc)
    losses["loss_disc"].backward()  # discriminator loss: discriminator only
    assert any(_grads(disc).values()) and not any(_grads(model).values())
    _zero(model, disc)


def test_strategies_fall_back_to_supervised_without_unlabelled(model):
    for name in ("mean_teacher", "mutual_consistency", "adversarial"):
        strat = STRATEGIES.create(name, model, _cfg())
        with torch.no_grad():
            losses = strat.losses(model, make_batch(), None, step=1)
        assert torch.isfinite(losses["loss"]) and "loss_mask" in losses


def test_weak_box_negative_and_partial_labels(model):
    sup = Supervised(model, _cfg())
    b = make_batch(3)
    # sample 1: box-only label; sample 2: "no finding" negative (empty mask, fully valid)
    b["weak_box"] = torch.tensor([False, True, False])
    b["gt_box"] = b["box"].clone()
    b["mask"][1] = 0
    b["valid"][1] = False
    b["mask"][2] = 0
    b["box"][2] = torch.tensor([0.0, 0, S, S])
    with torch.no_grad():
        losses, _ = sup.supervised(model, b)
    assert {"loss_mask", "loss_box"} <= set(losses) and torch.isfinite(losses["loss"])
    # partial labels: whatever the mask says where valid is False does not change the mask loss
    p = make_batch(2)
    p["valid"][:, :, :, :32] = False
    q = {k: v.clone() for k, v in p.items()}
    q["mask"][:, :, :, :32] = 1 - q["mask"][:, :, :, :32]
    with torch.no_grad():
        lp, _ = sup.supervised(model, p)
        lq, _ = sup.supervised(model, q)
    assert torch.allclose(lp["loss_mask"], lq["loss_mask"])


@pytest.mark.parametrize("method", ["mean_teacher", "mutual_consistency", "adversarial"])
def test_two_steps_through_train(kvasir_workdir, tiny_cfg, tmp_path, method):
    from medsam2.engine.train import train

    cfg = tiny_cfg(kvasir_workdir, tmp_path / "run", f"semisup.method={method}", "model.adapter=decoder_only")
    res = train(cfg)
    assert res.steps == 2 and math.isfinite(res.metrics["final_loss"])  # not NaN, not ±inf
    blob = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert len(blob["extra"]) == 1  # teacher / head B / discriminator is checkpointed for resume

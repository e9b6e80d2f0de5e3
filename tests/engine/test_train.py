"""The training loop: a few CPU steps on real images, resume after kill -9 equals an uninterrupted run."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medsam2.engine.checkpoint import read_checkpoint
from medsam2.engine.train import lr_factor, train
from tests.conftest import tiny_cfg


def test_lr_schedule_warms_up_then_decays():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) < 1.0
    assert lr_factor(100, 10, 100) == pytest.approx(0.05)


def test_lr_schedule_follows_the_time_budget_when_it_ends_first():
    # step 20 of 1000 but 100 % of max_minutes used: annealed, as at the last step
    assert lr_factor(20, 10, 1000, time_frac=1.0) == pytest.approx(0.05)
    assert lr_factor(20, 10, 1000, time_frac=0.5) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(900, 10, 1000, time_frac=0.1) == pytest.approx(lr_factor(900, 10, 1000))  # steps end first
    assert lr_factor(5, 10, 1000, time_frac=0.9) == pytest.approx(0.6)  # warmup is by steps


def test_time_budget_anneals_the_lr_and_stops(kvasir_workdir, tmp_path):
    cfg = tiny_cfg(kvasir_workdir, tmp_path / "run", "train.max_steps=100000", "train.max_minutes=0.05",
                   "train.warmup_steps=1")
    res = train(cfg)
    assert 1 <= res.steps < 100000
    last = [h for h in res.history if "lr" in h][-1]
    # the LR follows the budget (the step schedule alone would give ~1.0 × lr at step ≪ max_steps)
    assert last["lr"] == pytest.approx(cfg.train.lr * lr_factor(last["step"] - 1, 1, 100000, last["budget_used"]))
    assert 0 < last["budget_used"] <= 1
    final = Path(res.checkpoint)
    before = final.stat().st_mtime_ns
    again = train(cfg)  # a rerun of a run its budget ended trains no further and keeps its final weights
    assert again.steps == res.steps and final.stat().st_mtime_ns == before
    final.unlink()  # crash between the last checkpoint and final.pt: the rerun writes final.pt, no more steps
    third = train(cfg)
    assert third.steps == res.steps and final.exists()


def test_train_few_steps_on_real_images(kvasir_workdir, tmp_path):
    cfg = tiny_cfg(kvasir_workdir, tmp_path / "run", "data.augment=light", "train.ema_decay=0.9")
    res = train(cfg)
    assert res.steps == 3
    assert res.trainable_params < res.total_params
    assert res.base_weights["source"] == "none"
    assert 0.0 <= res.metrics["best_val_dice"] <= 1.0
    assert math.isfinite(res.metrics["final_loss"])  # not NaN, not ±inf
    blob = read_checkpoint(res.checkpoint)
    assert blob["full"] is True and blob["config"]["train"]["max_steps"] == 3
    assert (tmp_path / "run" / "last.pt").exists()
    again = train(cfg)  # rerun with the same output dir: already finished, nothing retrained
    assert again.steps == 3 and again.resumed_from == 3


def test_changed_config_refuses_to_resume_into_the_same_dir(kvasir_workdir, tmp_path):
    train(tiny_cfg(kvasir_workdir, tmp_path / "run", "train.max_steps=1"))
    with pytest.raises(ValueError, match="different config"):
        train(tiny_cfg(kvasir_workdir, tmp_path / "run", "train.max_steps=1", "train.lr=0.1"))


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from medsam2.engine.callbacks import Callback
    from medsam2.engine.train import train
    from tests.conftest import tiny_cfg

    class Kill(Callback):  # the crash we want: SIGKILL right after the step-{at} checkpoint hits the disk
        def on_checkpoint(self, step, path):
            if step == {at}:
                os.kill(os.getpid(), signal.SIGKILL)

    train(tiny_cfg({workdir!r}, {out!r}, "train.max_steps=4", "data.augment=light"), callbacks=[Kill()])
""")


def test_resume_after_kill_9_reaches_the_same_weights(kvasir_workdir, tmp_path):
    """kill -9 mid-run (a real SIGKILL of a child process), rerun → same final weights as one straight run."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    crashed = tmp_path / "crashed"
    script = KILLER.format(root=root, workdir=str(kvasir_workdir), out=str(crashed), at=2)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert read_checkpoint(crashed / "last.pt")["step"] == 2
    assert not (crashed / "final.pt").exists()

    resumed = train(tiny_cfg(kvasir_workdir, crashed, "train.max_steps=4", "data.augment=light"))
    straight = train(tiny_cfg(kvasir_workdir, tmp_path / "straight", "train.max_steps=4", "data.augment=light"))
    assert resumed.resumed_from == 2 and resumed.steps == straight.steps == 4
    a, b = read_checkpoint(resumed.checkpoint)["model"], read_checkpoint(straight.checkpoint)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")


def test_validation_is_the_test_evaluation_on_val_and_final_ships_the_best_val_weights(kvasir_workdir, tmp_path):
    """Val Dice comes from the evaluation code at each image's own resolution, and final.pt holds the weights
    of the best validation (not the last step's), with the step it was taken at."""
    from medsam2.data.selection import select_rows
    from medsam2.engine.checkpoint import load_model
    from medsam2.engine.evaluate import evaluate_rows

    cfg = tiny_cfg(kvasir_workdir, tmp_path / "run", "train.max_steps=4", "train.eval_every=1", "train.lr=0.02",
                   "train.warmup_steps=0")
    res = train(cfg)
    vals = [(h["step"], h["val_dice"]) for h in res.history if "val_dice" in h]
    assert [s for s, _ in vals] == [1, 2, 3, 4]
    best_step, best_val = max(vals, key=lambda sv: (sv[1], -sv[0]))  # first step reaching the best Dice
    blob = read_checkpoint(res.checkpoint)
    assert blob["selected"] == "best" and blob["selected_step"] == best_step
    assert res.metrics["selected_step"] == best_step and res.metrics["selected_val_dice"] == pytest.approx(best_val)
    best = read_checkpoint(tmp_path / "run" / "best.pt")["model"]
    for k, v in blob["model"].items():
        torch.testing.assert_close(v, best[k], rtol=0, atol=0)
    net, _ = load_model(res.checkpoint)
    val_rows, _ = select_rows(cfg.data, "val", seed=cfg.train.seed)
    per_image, _ = evaluate_rows(net, val_rows, kvasir_workdir, baselines=False, gallery_size=0)
    assert float(per_image["dice"].mean()) == pytest.approx(best_val, abs=1e-6)
    if best_step != 4:  # the last step's weights differ from what was shipped
        last = read_checkpoint(tmp_path / "run" / "last.pt")["model"]
        assert any(not torch.equal(last[k], v) for k, v in blob["model"].items())


def test_box_crop_and_prior_train_and_predict_at_full_resolution(kvasir_workdir, tmp_path):
    """model.box_crop + model.box_prior: an untrained model (step 0) is the ellipse-in-box baseline at full
    resolution, and a few steps train the zero-initialised correction."""
    from medsam2.data.selection import select_rows
    from medsam2.engine.checkpoint import build_model
    from medsam2.engine.evaluate import evaluate_rows

    cfg = tiny_cfg(kvasir_workdir, tmp_path / "run", "model.box_crop=0.2", "model.box_prior=ellipse",
                   "data.augment=light")
    net, _ = build_model(cfg.model)
    rows, _ = select_rows(cfg.data, "val", seed=0)
    per_image, _ = evaluate_rows(net.eval(), rows, kvasir_workdir, gallery_size=0)
    dice = per_image.pivot(index="image_id", columns="method", values="dice")
    assert (dice["model"] - dice["ellipse_in_box"]).abs().max() < 0.02  # same set up to crop-grid rounding
    res = train(cfg)
    assert res.steps == 3
    final = read_checkpoint(res.checkpoint)["model"]
    assert float(final["sam.sam_mask_decoder.output_hypernetworks_mlps.0.layers.2.weight"].abs().sum()) > 0

"""Evaluation report + baselines, the pure promotion gate, and promotion/rollback against a real MLflow store."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from medsam2.config import PromotionCfg
from medsam2.promotion import decide


def _per_image(dice, hd95=None, baseline=0.1):
    n = len(dice)
    common = {"image_id": [f"i{k}" for k in range(n)], "split": "val", "condition": "clean",
              "pixel_sha256": [f"p{k}" for k in range(n)], "mask_pixel_sha256": [f"m{k}" for k in range(n)],
              "hd95": hd95 if hd95 is not None else [1.0] * n}
    return pd.concat([pd.DataFrame({**common, "dice": dice, "method": "model"}),
                      pd.DataFrame({**common, "dice": [baseline] * n, "method": "ellipse_in_box"})])


def test_gate_run_level_guarded_metric():
    """Guards also take run-level numbers (the pure gate; the rest of the gate is in test_gate.py)."""
    champ = _per_image([0.80, 0.80, 0.80, 0.80], hd95=[5, 5, 5, 5])
    better = _per_image([0.83, 0.84, 0.82, 0.83], hd95=[5, 5, 5, 5])
    assert decide(better, champ, PromotionCfg(), prompt="box").promote
    d = decide(better, champ, PromotionCfg(guarded={"robust_drop_s3_max": 0.01}), prompt="box",
               challenger_summary={"robust_drop_s3_max": 0.10}, champion_summary={"robust_drop_s3_max": 0.02})
    assert not d.promote and any("robust_drop_s3_max" in r for r in d.reasons)


def _plant(run_id: str, model_dice: float, baseline_dice: float | None = None) -> pd.DataFrame:
    """Overwrite the stored selection results of ``run_id`` with planted scores (same images and masks, so the
    gate keeps reusing them): the fault or gain cannot be trained reliably into a 1–2-step model."""
    from medsam2 import tracking

    df = tracking.per_image_results(run_id, tracking.SELECTION_ARTIFACT)
    df.loc[df["method"] == "model", "dice"] = model_dice
    if baseline_dice is not None:  # every trivial baseline of the box prompt (the gate takes the better one)
        df.loc[df["method"] != "model", "dice"] = baseline_dice
    tracking.log_selection_results(run_id, df, split="val", prompt="box")
    return df


def test_evaluate_train_promote_rollback_end_to_end(kvasir_workdir, tmp_path, tracking_env):
    """CLI-level stages against a real SQLite MLflow store: the gate evaluates on the val split; a first model
    below the box-prior baseline stays challenger whatever its test results; above it → champion; a worse one →
    challenger with reasons stored on the version; a better one → champion; rollback restores the previous one."""
    from medsam2 import steps, tracking
    from tests.conftest import tiny_cfg

    cfg = tiny_cfg(kvasir_workdir, tmp_path / "run1", "train.max_steps=2")
    t1 = steps.run_train(cfg)
    assert {"run_id", "model_uri", "checkpoint", "steps", "metrics", "trainable_params", "total_params"} <= set(t1)
    e1 = steps.run_evaluate(t1["model_uri"], run_id=t1["run_id"], report_dir=str(tmp_path / "rep1"))
    m = e1["metrics"]
    assert 0 <= m["test_dice"] <= 1 and m["test_dice_ci_low"] <= m["test_dice"] <= m["test_dice_ci_high"]
    assert m["baseline_ellipse_in_box_dice"] > 0.6  # real polyp masks: the box-ellipse is a strong baseline
    per_image = pd.read_csv(tmp_path / "rep1" / "per_image.csv")
    assert set(per_image["method"]) == {"model", "ellipse_in_box", "fill_box"}
    assert len(per_image[per_image["method"] == "model"]) == 3  # the 3 frozen test images, nothing else
    assert (tmp_path / "rep1" / "report.html").stat().st_size > 1000
    json.loads((tmp_path / "rep1" / "report.json").read_text())

    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    run1 = mlflow.get_run(t1["run_id"])
    assert run1.inputs.dataset_inputs and run1.inputs.dataset_inputs[0].dataset.name.startswith("manifest-")
    assert {"config_hash", "git_commit", "data_version", "random_init"} <= set(run1.data.tags)
    assert run1.data.params["trainable_params"] and run1.data.params["total_params"]
    # the gate evaluates on the val split (2 images), stored beside the test results, never on the test split
    p0 = steps.run_promote(t1["model_uri"], e1["run_id"], cfg)
    sel = tracking.per_image_results(e1["run_id"], tracking.SELECTION_ARTIFACT)
    assert set(sel["split"]) == {"val"} and len(sel[sel["method"] == "model"]) == 2
    assert {"model", "ellipse_in_box"} <= set(sel["method"])
    assert p0["selection"]["split"] == "val" and p0["selection"]["n_images"] == 2
    assert p0["test_metrics"]["test_dice"] == pytest.approx(m["test_dice"])
    # a first model below the box-prior baseline is not promoted (planted: 0.05 below the ellipse everywhere)
    ellipse = sel.loc[sel["method"] == "ellipse_in_box", "dice"].to_numpy()
    sel.loc[sel["method"] == "model", "dice"] = ellipse - 0.05
    sel.loc[sel["method"] == "fill_box", "dice"] = ellipse - 0.1  # so the ellipse is the better baseline here
    tracking.log_selection_results(e1["run_id"], sel, split="val", prompt="box")
    p1 = steps.run_promote(t1["model_uri"], e1["run_id"], cfg)
    assert not p1["promoted"] and p1["alias"] == "challenger" and p1["version"] == 1
    assert p1["summary"].startswith("below the box-prior baseline (ellipse_in_box) by 0.050 Dice"), p1["summary"]
    assert tracking.alias_version("medsam2", "champion") is None
    assert tracking.alias_version("medsam2", "challenger").tags["gate_decision"] == "rejected"
    # perfect planted TEST results do not change the decision: the gate never reads them
    test_rows = pd.read_csv(tmp_path / "rep1" / "per_image.csv")
    test_rows["dice"] = 1.0
    tracking._client().log_text(e1["run_id"], test_rows.to_csv(index=False), "eval/per_image.csv")
    assert steps.run_promote(t1["model_uri"], e1["run_id"], cfg)["summary"] == p1["summary"]

    _plant(e1["run_id"], 0.8, baseline_dice=0.5)
    p1 = steps.run_promote(t1["model_uri"], e1["run_id"], cfg)
    assert p1["promoted"] and p1["alias"] == "champion" and p1["version"] == 1

    # A second model: evaluated on the same val images and masks, so the champion's stored results are reused
    t2 = steps.run_train(tiny_cfg(kvasir_workdir, tmp_path / "run2", "train.max_steps=1", "train.seed=7"))
    e2 = steps.run_evaluate(t2["model_uri"], run_id=t2["run_id"], report_dir=str(tmp_path / "rep2"))
    p2 = steps.run_promote(t2["model_uri"], e2["run_id"], cfg)
    assert p2["selection"]["champion_results"] == "stored"
    assert not list((tracking_env / "reports").glob(f"champion-reeval-{e2['run_id']}-*"))
    _plant(e2["run_id"], 0.0, baseline_dice=0.5)  # a deliberately worse challenger
    p2 = steps.run_promote(t2["model_uri"], e2["run_id"], cfg)
    assert not p2["promoted"] and p2["alias"] == "challenger"
    mv = tracking.alias_version("medsam2", "challenger")
    assert mv.tags["gate_decision"] == "rejected" and "below the box-prior baseline" in mv.tags["gate_reasons"]
    assert "below champion v1 by 0.800 Dice" in mv.tags["gate_reasons"]
    assert int(tracking.alias_version("medsam2", "champion").version) == 1

    # A better one (planted) is promoted; the old champion becomes `previous`; rollback.
    _plant(e2["run_id"], 0.95, baseline_dice=0.5)
    p3 = steps.run_promote(t2["model_uri"], e2["run_id"], cfg)
    assert p3["promoted"] and "beats champion v1 by +0.150 Dice" in p3["summary"]
    assert int(tracking.alias_version("medsam2", "previous").version) == 1
    rb = tracking.rollback("medsam2")
    assert rb["champion"] == 1 and int(tracking.alias_version("medsam2", "champion").version) == 1

    # the registered champion serves through MLflow's pyfunc
    import base64
    import io

    from PIL import Image

    from medsam2.engine.serve import decode_mask

    model = mlflow.pyfunc.load_model("models:/medsam2@champion")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(buf, format="PNG")
    out = model.predict([{"image": base64.b64encode(buf.getvalue()).decode(), "box": [10, 10, 60, 50]}])
    assert decode_mask(out[0].model_dump()).shape == (80, 100)


def _log_model_with_results(cfg, dice: list[float], tmp_path, seed: int = 0,
                            stale_mask: bool = False) -> tuple[str, str]:
    """An untrained tiny model logged as a pyfunc, and a run holding planted val-split results for it on the
    work dir's real val images and mask hashes (the gate only reads those; ``stale_mask``: as if the first mask
    had been relabelled since): (model_uri, eval_run_id)."""
    import mlflow

    from medsam2 import tracking
    from medsam2.data.selection import select_rows
    from medsam2.engine.checkpoint import atomic_save, build_model, model_payload

    model, base = build_model(cfg.model, seed=seed)
    ckpt = atomic_save(model_payload(model, cfg, base), tmp_path / f"model-{seed}" / "final.pt")
    val = select_rows(cfg.data, "val")[0]
    ident = val[["image_id", "patient_id", "split", "pixel_sha256", "mask_pixel_sha256"]].astype(str)
    if stale_mask:
        ident.loc[ident.index[0], "mask_pixel_sha256"] = "an-older-mask"
    sel = pd.concat([ident.assign(method="model", condition="clean", dice=dice),
                     ident.assign(method="ellipse_in_box", condition="clean", dice=0.1)])
    tracking.setup(cfg)
    with mlflow.start_run() as run:
        uri = tracking.log_model(ckpt)
        mlflow.log_metric("test_dice", float(np.mean(dice)))
    tracking.log_selection_results(run.info.run_id, sel, split="val", prompt=cfg.model.prompt)
    return uri, run.info.run_id


def test_promote_is_idempotent_and_reevaluates_into_its_own_folder(kvasir_workdir, tmp_path, tracking_env):
    """A retried promotion (the flow task has retries) registers no second version and keeps the decision; a
    champion whose stored results are on other mask versions is re-evaluated on the selection split, into a
    folder of its own per call (concurrent promotions do not collide)."""
    from medsam2 import steps, tracking
    from tests.conftest import tiny_cfg

    cfg = tiny_cfg(kvasir_workdir, tmp_path / "out")
    client = tracking._client()
    uri1, eval1 = _log_model_with_results(cfg, [0.5, 0.6], tmp_path, stale_mask=True)
    first = tracking.promote(uri1, eval1, cfg)
    retry = tracking.promote(uri1, eval1, cfg)  # e.g. the response of the first call was lost
    assert first["promoted"] and retry["promoted"] and first["version"] == retry["version"] == 1
    assert retry["reasons"] == first["reasons"] and retry["alias"] == "champion"
    assert len(client.search_model_versions("name = 'medsam2'")) == 1

    # the challenger's results are on the current masks, the champion's on an older one: it is re-evaluated
    uri2, eval2 = _log_model_with_results(cfg, [0.0, 0.0], tmp_path, seed=1)
    p2 = steps.run_promote(uri2, eval2, cfg)
    p2_retry = steps.run_promote(uri2, eval2, cfg)
    assert not p2["promoted"] and not p2_retry["promoted"] and p2["version"] == p2_retry["version"] == 2
    assert p2["selection"]["champion_results"] == "reevaluated"
    assert len(client.search_model_versions("name = 'medsam2'")) == 2
    assert int(tracking.alias_version("medsam2", "champion").version) == 1
    assert tracking.alias_version("medsam2", "challenger").tags["gate_decision"] == "rejected"
    reevals = sorted((tracking_env / "reports").glob(f"champion-reeval-{eval2}-*"))
    assert len(reevals) == 2 and all((d / "per_image.csv").is_file() for d in reevals)
    redone = pd.read_csv(reevals[0] / "per_image.csv")
    assert set(redone["split"]) == {"val"} and "an-older-mask" not in set(redone["mask_pixel_sha256"])
    # the planted challenger results matched the current val set: reused, not re-evaluated
    assert not list((tracking_env / "reports").glob(f"selection-{eval2}-*"))


def test_self_trained_champion_carries_the_data_version(kvasir_workdir, tmp_path, tracking_env, monkeypatch):
    """The self-trained model's run has the data_version a training run has; once it is promoted, the same
    labelled data does not trigger another retraining."""
    import mlflow

    from medsam2 import steps, tracking
    from medsam2.data.selection import training_data_version
    from medsam2.engine import self_training as st
    from medsam2.engine.checkpoint import atomic_save, build_model, model_payload
    from tests.conftest import tiny_cfg

    cfg = tiny_cfg(kvasir_workdir, tmp_path / "run", "train.max_steps=2", "train.eval_every=2",
                   "model.adapter=decoder_only", "data.label_fraction=0.5", "semisup.self_training_rounds=1",
                   "semisup.threshold=0.0")
    teacher, base = build_model(cfg.model)
    teacher_ckpt = atomic_save(model_payload(teacher, cfg, base), tmp_path / "teacher" / "final.pt")
    # whether a 2-step student beats its teacher on 2 val images is chance: fix the val Dice so it does
    scores = iter([0.0, 1.0])
    monkeypatch.setattr(st, "val_dice", lambda model, c: next(scores))
    res = steps.run_self_training(cfg, str(teacher_ckpt))
    assert res["improved"] and res["model_uri"]

    version = training_data_version(cfg.data)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    run = mlflow.get_run(res["run_id"])
    assert run.data.tags["data_version"] == version and run.data.tags["self_training"] == "true"
    assert run.inputs.dataset_inputs[0].dataset.name == f"manifest-{version}"
    assert steps.labels_changed_since_champion(cfg)["retrain"]  # no champion yet

    ev = steps.run_evaluate(res["model_uri"], run_id=res["run_id"], report_dir=str(tmp_path / "rep"))
    first = steps.run_promote(res["model_uri"], ev["run_id"], cfg)  # evaluated on val: honest, likely rejected
    alias = "champion" if first["promoted"] else "challenger"
    assert tracking.alias_version("medsam2", alias).tags["data_version"] == version
    assert not steps.labels_changed_since_champion(cfg)["retrain"]  # a rejected candidate is not retrained
    _plant(ev["run_id"], 0.9, baseline_dice=0.5)  # a 2-step model cannot be trained to pass: plant it
    promoted = steps.run_promote(res["model_uri"], ev["run_id"], cfg)
    assert promoted["promoted"]
    assert tracking.alias_version("medsam2", "champion").tags["data_version"] == version
    check = steps.labels_changed_since_champion(cfg)
    assert not check["retrain"] and check["champion_data_version"] == version

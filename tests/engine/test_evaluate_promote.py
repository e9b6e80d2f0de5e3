"""Evaluation report + baselines, the pure promotion gate, and promotion/rollback against a real MLflow store."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from medsam2.config import PromotionCfg
from medsam2.promotion import decide


def _per_image(dice, hd95=None):
    return pd.DataFrame({"image_id": [f"i{k}" for k in range(len(dice))], "dice": dice, "method": "model",
                         "condition": "clean", "hd95": hd95 if hd95 is not None else [1.0] * len(dice)})


def test_gate_first_model_is_promoted():
    d = decide(_per_image([0.5, 0.6]), None, PromotionCfg())
    assert d.promote and "no champion" in d.reasons[0]


def test_gate_rejects_worse_and_equal_challengers_with_reasons():
    champ = _per_image([0.8, 0.82, 0.79, 0.85])
    worse = decide(_per_image([0.6, 0.62, 0.59, 0.65]), champ, PromotionCfg())
    assert not worse.promote and "not above the margin" in worse.reasons[0]
    assert worse.stats["mean_diff"] == pytest.approx(-0.2)
    tie = decide(champ.copy(), champ, PromotionCfg())
    assert not tie.promote


def test_gate_margin_confidence_and_guarded_metric():
    champ = _per_image([0.80, 0.80, 0.80, 0.80], hd95=[5, 5, 5, 5])
    better = _per_image([0.83, 0.84, 0.82, 0.83], hd95=[5, 5, 5, 5])
    assert decide(better, champ, PromotionCfg(margin=0.02)).promote
    assert not decide(better, champ, PromotionCfg(margin=0.05)).promote
    assert decide(better, champ, PromotionCfg(confidence=0.95, n_bootstrap=500)).promote
    worse_hd = _per_image([0.83, 0.84, 0.82, 0.83], hd95=[9, 9, 9, 9])
    d = decide(worse_hd, champ, PromotionCfg(guarded={"hd95": 1.0}))
    assert not d.promote and any("guarded hd95 regressed by 4.0000" in r for r in d.reasons)
    d = decide(better, champ, PromotionCfg(guarded={"robust_drop_s3_max": 0.01}),
               challenger_summary={"robust_drop_s3_max": 0.10}, champion_summary={"robust_drop_s3_max": 0.02})
    assert not d.promote and any("robust_drop_s3_max" in r for r in d.reasons)


def test_gate_refuses_to_compare_different_image_sets():
    d = decide(_per_image([0.9, 0.9, 0.9]), _per_image([0.1, 0.1]), PromotionCfg())
    assert not d.promote and "re-evaluate" in d.reasons[0]


def test_evaluate_train_promote_rollback_end_to_end(kvasir_workdir, tmp_path, tracking_env):
    """CLI-level stages against a real SQLite MLflow store: first model → champion; a worse one → challenger
    with reasons stored on the version; rollback gives champion back to the previous one."""
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
    p1 = steps.run_promote(t1["model_uri"], e1["run_id"], cfg)
    assert p1["promoted"] and p1["alias"] == "champion" and p1["version"] == 1

    # A deliberately worse challenger: rewrite its per-image results to Dice 0 (the fault cannot be trained
    # reliably into a 2-step model, so we plant it in its evaluation table).
    t2 = steps.run_train(tiny_cfg(kvasir_workdir, tmp_path / "run2", "train.max_steps=1", "train.seed=7"))
    e2 = steps.run_evaluate(t2["model_uri"], run_id=t2["run_id"], report_dir=str(tmp_path / "rep2"))
    bad = pd.read_csv(tmp_path / "rep2" / "per_image.csv")
    bad.loc[bad["method"] == "model", "dice"] = 0.0
    bad.to_csv(tmp_path / "rep2" / "per_image.csv", index=False)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    with mlflow.start_run(run_id=e2["run_id"]):
        mlflow.log_artifact(str(tmp_path / "rep2" / "per_image.csv"), "eval")
    p2 = steps.run_promote(t2["model_uri"], e2["run_id"], cfg)
    assert not p2["promoted"] and p2["alias"] == "challenger"
    mv = tracking.alias_version("medsam2", "challenger")
    assert mv.tags["gate_decision"] == "rejected" and "not above the margin" in mv.tags["gate_reasons"]
    assert int(tracking.alias_version("medsam2", "champion").version) == 1

    # A better one (planted perfect scores) is promoted; the old champion becomes `previous`; rollback.
    good = bad.copy()
    good.loc[good["method"] == "model", "dice"] = 1.0
    good.to_csv(tmp_path / "rep2" / "per_image.csv", index=False)
    with mlflow.start_run(run_id=e2["run_id"]):
        mlflow.log_artifact(str(tmp_path / "rep2" / "per_image.csv"), "eval")
    p3 = steps.run_promote(t2["model_uri"], e2["run_id"], cfg)
    assert p3["promoted"] and int(tracking.alias_version("medsam2", "previous").version) == 1
    rb = tracking.rollback("medsam2")
    assert rb["champion"] == 1 and int(tracking.alias_version("medsam2", "champion").version) == 1

    # the registered champion serves through MLflow's pyfunc
    model = mlflow.pyfunc.load_model("models:/medsam2@champion")
    img = np.zeros((80, 100, 3), np.uint8)
    masks = model.predict({"image": img, "box": [10, 10, 60, 50]})
    assert masks[0].shape == (80, 100) and set(np.unique(masks[0])) <= {0, 1}


def _log_model_with_results(cfg, dice: list[float], image_ids: list[str], tmp_path, seed: int = 0) -> tuple[str, str]:
    """An untrained tiny model logged as a pyfunc, and a run holding planted per-image results for it (the gate
    only reads those): (model_uri, eval_run_id)."""
    import mlflow

    from medsam2 import tracking
    from medsam2.engine.checkpoint import atomic_save, model_payload
    from medsam2.model.segmenter import build_segmenter

    model, base = build_segmenter(cfg.model, seed=seed)
    ckpt = atomic_save(model_payload(model, cfg, base), tmp_path / f"model-{seed}" / "final.pt")
    per_image = tmp_path / f"model-{seed}" / "per_image.csv"
    pd.DataFrame({"image_id": image_ids, "dice": dice, "method": "model", "condition": "clean",
                  "hd95": 1.0}).to_csv(per_image, index=False)
    tracking.setup(cfg)
    with mlflow.start_run() as run:
        uri = tracking.log_model(ckpt)
        mlflow.log_artifact(str(per_image), "eval")
        mlflow.log_metric("test_dice", float(np.mean(dice)))
    return uri, run.info.run_id


def test_promote_is_idempotent_and_reevaluates_into_its_own_folder(kvasir_workdir, tmp_path, tracking_env):
    """A retried promotion (the flow task has retries) registers no second version and keeps the decision; a
    champion re-evaluation writes to a folder of its own per call (concurrent promotions do not collide)."""
    from medsam2 import steps, tracking
    from medsam2.data.manifest import read_manifest
    from tests.conftest import tiny_cfg

    cfg = tiny_cfg(kvasir_workdir, tmp_path / "out")
    client = tracking._client()
    test_ids = sorted(read_manifest(kvasir_workdir).query("split == 'test'")["image_id"])
    uri1, eval1 = _log_model_with_results(cfg, [0.5, 0.6], test_ids[:2], tmp_path)
    first = tracking.promote(uri1, eval1, cfg)
    retry = tracking.promote(uri1, eval1, cfg)  # e.g. the response of the first call was lost
    assert first["promoted"] and retry["promoted"] and first["version"] == retry["version"] == 1
    assert retry["reasons"] == first["reasons"] and retry["alias"] == "champion"
    assert len(client.search_model_versions("name = 'medsam2'")) == 1

    # a challenger evaluated on images the champion's stored results do not cover: the champion is re-evaluated
    uri2, eval2 = _log_model_with_results(cfg, [0.0, 0.0, 0.0], test_ids, tmp_path, seed=1)
    p2 = steps.run_promote(uri2, eval2, cfg)
    p2_retry = steps.run_promote(uri2, eval2, cfg)
    assert not p2["promoted"] and not p2_retry["promoted"] and p2["version"] == p2_retry["version"] == 2
    assert len(client.search_model_versions("name = 'medsam2'")) == 2
    assert int(tracking.alias_version("medsam2", "champion").version) == 1
    assert tracking.alias_version("medsam2", "challenger").tags["gate_decision"] == "rejected"
    reevals = sorted((tracking_env / "reports").glob(f"champion-reeval-{eval2}-*"))
    assert len(reevals) == 2 and all((d / "per_image.csv").is_file() for d in reevals)


def test_self_trained_champion_carries_the_data_version(kvasir_workdir, tmp_path, tracking_env, monkeypatch):
    """The self-trained model's run has the data_version a training run has; once it is promoted, the same
    labelled data does not trigger another retraining."""
    import mlflow

    from medsam2 import steps, tracking
    from medsam2.data.selection import training_data_version
    from medsam2.engine.checkpoint import atomic_save, model_payload
    from medsam2.model.segmenter import build_segmenter
    from medsam2.semisup import self_training as st
    from tests.conftest import tiny_cfg

    cfg = tiny_cfg(kvasir_workdir, tmp_path / "run", "train.max_steps=2", "train.eval_every=2",
                   "model.adapter=decoder_only", "data.label_fraction=0.5", "semisup.self_training_rounds=1",
                   "semisup.threshold=0.0")
    teacher, base = build_segmenter(cfg.model)
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
    promoted = steps.run_promote(res["model_uri"], ev["run_id"], cfg)
    assert promoted["promoted"]
    assert tracking.alias_version("medsam2", "champion").tags["data_version"] == version
    check = steps.labels_changed_since_champion(cfg)
    assert not check["retrain"] and check["champion_data_version"] == version

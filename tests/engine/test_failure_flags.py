"""Failure flags end to end: calibrated on val, applied to test by ``evaluate`` (per-image confidence, needs
review, the flags' precision/recall in the report) and to ``medsam2 predict --calibration``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from medsam2.eval.calibration import CalibrationCfg, Calibrator
from tests.conftest import copy_kvasir_subset, tiny_cfg


@pytest.fixture(scope="module")
def val5_workdir(sample_data, tmp_path_factory):
    from medsam2.data.ingest import ingest

    root = tmp_path_factory.mktemp("flags")
    copy_kvasir_subset(root / "kvasir-seg", n_train=2, n_val=6, n_test=4)
    ingest(str(root / "kvasir-seg"), root / "work")
    return root / "work"


def test_evaluate_reports_flags_fitted_on_val(val5_workdir, tiny_checkpoint, tmp_path):
    from medsam2.engine.checkpoint import load_model
    from medsam2.engine.evaluate import evaluate

    net, _ = load_model(tiny_checkpoint, "cpu")
    cfg = tiny_cfg(val5_workdir, tmp_path / "run", "eval.gallery_size=0", "eval.baselines=false")
    ccfg = CalibrationCfg(review_below=0.3, min_fit=5)
    res = evaluate(net, cfg, tmp_path / "report", calibration=ccfg)
    cal = json.loads((tmp_path / "report" / "calibration.json").read_text())
    assert cal["fit_split"] == "val" and cal["val"]["n"] == 6 and cal["test"]["n"] == res.n_images == 4
    per = pd.read_csv(tmp_path / "report" / "per_image.csv")
    model = per[per["method"] == "model"]
    calibrator = Calibrator.from_dict(cal["calibrator"])
    # val was predicted in both views (the input is chosen there among every one), test only if the chosen
    # input reads the mirrored view; the chosen input is stored
    assert set(cal["input_spearman_val"]) == {"iou_pred", "flip_agreement", "iou_flip", "stability"}
    assert calibrator.input == cal["test"]["input"] and calibrator.input in cal["input_spearman_val"]
    assert ("flip_agreement" in model) == calibrator.needs_flip
    flips = model["flip_agreement"] if calibrator.needs_flip else None
    assert flips is None or flips.between(0, 1).all()
    assert model["stability"].between(0, 1).all()  # every prediction records SAM's stability score
    np.testing.assert_allclose(model["confidence"],
                               calibrator.confidence(model["iou_pred"], flips, model["stability"]))
    # needs review below the threshold chosen on val (cross-fitted), which the calibration stores
    assert cal["test"]["flag_below"] == calibrator.flag_threshold and 0 < calibrator.flag_threshold <= 1
    assert (model["needs_review"] == (model["confidence"] < calibrator.flag_threshold)).all()
    flags = cal["test"]["flags"]
    failed = model["dice"] < 0.3
    assert flags["n_flagged"] == int(model["needs_review"].sum()) and flags["n_failures"] == int(failed.sum())
    tp = int((model["needs_review"] & failed).sum())
    if flags["n_flagged"]:
        assert flags["precision"] == pytest.approx(tp / flags["n_flagged"])
        assert res.metrics["test_flag_precision"] == pytest.approx(flags["precision"])
    assert "test_confidence_ece" in res.metrics and "val_confidence_ece" in res.metrics
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["calibration"]["test"]["ece"] == pytest.approx(cal["test"]["ece"])
    assert (tmp_path / "report" / "reliability.png").stat().st_size > 1000
    assert "Failure flags" in (tmp_path / "report" / "report.html").read_text()

    with pytest.raises(ValueError, match="fitted on val"):
        evaluate(net, tiny_cfg(val5_workdir, tmp_path / "run", "eval.split=val"), tmp_path / "r2",
                 calibration=ccfg)


def test_too_few_val_rows_skip_the_flags(val5_workdir, tiny_checkpoint, tmp_path):
    from medsam2.engine.checkpoint import load_model
    from medsam2.engine.evaluate import evaluate

    net, _ = load_model(tiny_checkpoint, "cpu")
    cfg = tiny_cfg(val5_workdir, tmp_path / "run", "eval.gallery_size=0", "eval.baselines=false")
    res = evaluate(net, cfg, tmp_path / "report", calibration=CalibrationCfg(min_fit=7))
    assert not (tmp_path / "report" / "calibration.json").exists() and "test_flag_recall" not in res.metrics
    assert json.loads((tmp_path / "report" / "report.json").read_text())["calibration"] is None


def test_predict_marks_needs_review_with_a_calibration(tiny_checkpoint, tmp_path):
    from PIL import Image

    png = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(png)
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"calibrator": Calibrator((0.0, 1.0), (0.0, 0.5), 10, 0.99).to_dict()}))
    out = subprocess.run([sys.executable, "-m", "medsam2.cli", "predict", str(png), "--model", str(tiny_checkpoint),
                          "--out", str(tmp_path / "out"), "--box", "5,5,40,40", "--calibration", str(cal),
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (entry,) = json.loads(out.stdout.strip().splitlines()[-1])["outputs"]
    assert entry["confidence"] == pytest.approx(np.clip(entry["iou_pred"], 0, 1) / 2)
    assert entry["needs_review"] is True  # a confidence of at most 0.5 is below 0.99
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    out = subprocess.run([sys.executable, "-m", "medsam2.cli", "predict", str(png), "--model", str(tiny_checkpoint),
                          "--out", str(tmp_path / "out2"), "--box", "5,5,40,40", "--calibration", str(bad)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 3 and "not an isotonic calibration" in out.stderr and "Traceback" not in out.stderr
    # a calibration of the flip agreement: predict runs the mirrored view too and calibrates its agreement
    cal.write_text(json.dumps({"calibrator": Calibrator((0.0, 1.0), (0.0, 0.5), 10, 0.99,
                                                        input="flip_agreement").to_dict()}))
    out = subprocess.run([sys.executable, "-m", "medsam2.cli", "predict", str(png), "--model", str(tiny_checkpoint),
                          "--out", str(tmp_path / "out3"), "--box", "5,5,40,40", "--calibration", str(cal),
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (entry,) = json.loads(out.stdout.strip().splitlines()[-1])["outputs"]
    assert 0 <= entry["flip_agreement"] <= 1 and entry["confidence"] == pytest.approx(entry["flip_agreement"] / 2)

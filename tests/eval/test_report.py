"""Report: files, strict JSON, hand-checkable means on a tiny synthetic table."""

import json

import numpy as np
import pandas as pd
import pytest

from medsam2.eval.report import write_report


def tiny_results():
    rows = []
    for ds, modality in (("kvasir", "endoscopy"), ("busi", "ultrasound")):
        for i in range(3):
            dice = 0.9 - 0.1 * i if ds == "kvasir" else 0.7  # kvasir model: .9 .8 .7, busi: .7 .7 .7
            base = {"image_id": f"{ds}_{i}", "dataset": ds, "modality": modality}
            rows.append(
                base
                | {
                    "method": "model",
                    "condition": "clean",
                    "severity": 0,
                    "dice": dice,
                    "iou": dice / (2 - dice),
                    "precision": 1.0,
                    "recall": dice,
                    "hd95": 3.0,
                }
            )
            rows.append(
                base
                | {
                    "method": "ellipse_in_box",
                    "condition": "clean",
                    "severity": 0,
                    "dice": dice - 0.1,
                    "iou": 0.5,
                    "precision": 0.8,
                    "recall": 0.8,
                    "hd95": float("nan"),
                }
            )
            for sev in (1, 3):
                rows.append(
                    base
                    | {
                        "method": "model",
                        "condition": "blur",
                        "severity": sev,
                        "dice": dice - 0.05 * sev,
                        "iou": 0.5,
                        "precision": 1.0,
                        "recall": 0.5,
                        "hd95": 4.0,
                    }
                )
    return pd.DataFrame(rows)


def gallery_items():
    img = np.zeros((16, 16, 3), np.uint8)
    target = np.zeros((16, 16), bool)
    target[4:12, 4:12] = True
    return [
        {
            "image_id": f"g{i}",
            "image": img,
            "target": target,
            "pred": np.roll(target, i, axis=1),
            "dice": 1 - i / 8,
        }
        for i in range(3)
    ]


def test_full_report(tmp_path):
    out = write_report(
        tiny_results(),
        tmp_path / "r",
        title="Eval <b>run</b>",
        gallery=gallery_items(),
        summary={"run_id": "abc", "steps": 5},
        n_boot=50,
    )
    files = out["files"]
    for path in [files["html"], files["json"], *files["plots"].values()]:
        assert (tmp_path / "r").joinpath(path).exists()
    assert set(files["plots"]) == {"Dice histogram", "Datasets", "Dice vs severity", "Gallery"}
    on_disk = json.loads((tmp_path / "r" / "report.json").read_text())
    assert on_disk == out
    # Clean model Dice over the 6 images: (.9 + .8 + .7 + 3 × .7) / 6 = 0.75
    assert out["overall"]["model"]["dice"]["mean"] == pytest.approx(0.75)
    assert out["overall"]["model"]["dice"]["n"] == 6
    assert out["by_dataset"]["kvasir"]["model"]["dice"]["mean"] == pytest.approx(0.8)
    assert out["by_modality"]["ultrasound"]["ellipse_in_box"]["dice"]["mean"] == pytest.approx(0.6)
    assert out["overall"]["ellipse_in_box"]["hd95"] == {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    # Model beats the ellipse by exactly 0.1 on every image.
    comp = out["comparisons"]["model_vs_ellipse_in_box"]
    assert comp["mean_diff"] == pytest.approx(0.1) and comp["p_improve"] == 1.0 and comp["n"] == 6
    # Severity curve: clean .75, severity 1 → .70, severity 3 → .60; drops .05 and .15.
    assert out["severity_curves"]["model"]["blur"] == pytest.approx({"0": 0.75, "1": 0.70, "3": 0.60})
    assert out["severity_drop"]["model"]["blur"] == pytest.approx({"1": 0.05, "3": 0.15})
    cross = out["cross_dataset"]
    assert cross["rows_are"] == "method" and cross["columns"] == ["busi", "kvasir"]
    assert cross["dice"][cross["rows"].index("model")] == pytest.approx([0.7, 0.8])
    assert out["context"] == {"run_id": "abc", "steps": 5}
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Eval &lt;b&gt;run&lt;/b&gt;" in html and "<b>run</b>" not in html
    assert html.count("data:image/png;base64,") == 4


def test_single_row_minimal_columns(tmp_path):
    out = write_report(pd.DataFrame([{"image_id": "a", "dataset": "d", "dice": 0.5}]), tmp_path, title="one")
    assert out["overall"]["model"]["dice"] == {"mean": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n": 1}
    assert out["cross_dataset"] is None and out["comparisons"] == {} and out["severity_curves"] == {}
    assert set(out["files"]["plots"]) == {"Dice histogram", "Datasets"}
    json.loads((tmp_path / "report.json").read_text())


def test_train_dataset_column_gives_the_cross_dataset_matrix(tmp_path):
    df = pd.DataFrame(
        {
            "image_id": ["a", "b", "a", "b"],
            "dataset": ["k", "c", "k", "c"],
            "train_dataset": ["k", "k", "c", "c"],
            "dice": [0.9, 0.6, 0.5, 0.8],
        }
    )
    cross = write_report(df, tmp_path, title="x", n_boot=10)["cross_dataset"]
    assert cross["rows_are"] == "train_dataset"
    assert dict(zip(cross["rows"], cross["dice"], strict=True)) == {"c": [0.8, 0.5], "k": [0.6, 0.9]}


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        write_report(pd.DataFrame(columns=["image_id", "dataset", "dice"]), tmp_path, title="t")
    with pytest.raises(KeyError, match="dataset"):
        write_report(pd.DataFrame([{"image_id": "a", "dice": 1.0}]), tmp_path, title="t")
    bad = gallery_items()
    bad[0]["pred"] = np.zeros((3, 3), bool)
    with pytest.raises(ValueError, match="share"):
        write_report(tiny_results(), tmp_path, title="t", gallery=bad, n_boot=10)

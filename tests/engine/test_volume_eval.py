"""3-D evaluation (issue 16): ``medsam2 evaluate --volumes FILE`` scores SAM2-memory propagation per volume
(Dice, HD95 and NSD in mm, bootstrap CIs) beside the oracle slice-by-slice prompts and the key slice's prompt on
every slice, into ``volumes/volumes.html`` (a strip of slices per volume) and MLflow. Weights: random init."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import yaml
from typer.testing import CliRunner

from medsam2.cli import app
from medsam2.engine.volume_eval import METHODS

runner = CliRunner()
TS = "totalsegmentator-examples"


def test_evaluate_volumes_cli_reports_three_methods_with_cis(sample_data, tiny_checkpoint, tmp_path, tracking_env):
    cases = tmp_path / "volumes.yaml"
    cases.write_text(yaml.safe_dump([
        {"image": str(sample_data / TS / "example_ct_sm.nii.gz"), "label": str(sample_data / TS / "example_seg.nii.gz"),
         "labels": [5], "name": "ct_liver"},
        {"image": str(sample_data / TS / "example_mr_sm.nii.gz"),
         "label": str(sample_data / TS / "example_seg_mr.nii.gz"), "labels": [5], "name": "mr_5"},
    ]))
    report = tmp_path / "report"
    res = runner.invoke(app, ["evaluate", "--model", str(tiny_checkpoint), "--volumes", str(cases), "--volumes-only",
                              "--report", str(report), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["n_volumes"] == 2 and out["n_images"] == 0
    m = out["metrics"]
    for method in METHODS:
        for metric in ("dice", "hd95", "nsd"):
            assert m[f"volume_{method}_{metric}_ci_low"] <= m[f"volume_{method}_{metric}"] <= \
                m[f"volume_{method}_{metric}_ci_high"]
    table = pd.read_csv(report / "volumes" / "volumes.csv")
    assert sorted(table["method"].unique()) == sorted(METHODS) and len(table) == 6
    ct = table[table["volume"] == "ct_liver"].set_index("method")
    assert (ct["spacing_mm"] == "3x3x3").all() and (ct["slices"] == 30).all()
    assert np.isclose(m["volume_memory_dice"], table[table["method"] == "memory"]["dice"].mean())
    assert ((table["dice"] >= 0) & (table["dice"] <= 1) & (table["nsd"] >= 0) & (table["nsd"] <= 1)).all()
    html = (report / "volumes" / "volumes.html").read_text()
    assert "RANDOM INIT" in html and "data:image/png;base64" in html and "memory_vs_oracle_slice_prompts" in html
    summary = json.loads((report / "volumes" / "volumes.json").read_text())
    assert summary["comparisons"]["memory_vs_key_prompt_every_slice"]["dice"]["n"] == 2

    import mlflow

    from medsam2 import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    run = mlflow.get_run(out["run_id"])
    assert np.isclose(run.data.metrics["volume_memory_dice"], m["volume_memory_dice"])
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(out["run_id"], "eval/volumes")]
    assert "eval/volumes/volumes.html" in arts


def test_volumes_only_without_volumes_is_a_usage_error(tiny_checkpoint, tracking_env):
    res = runner.invoke(app, ["evaluate", "--model", str(tiny_checkpoint), "--volumes-only", "--json"])
    assert res.exit_code == 2 and "--volumes-only needs --volumes" in res.output

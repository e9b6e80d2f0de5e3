"""The honest promotion gate: a candidate must beat its prompt mode's trivial baseline and the champion under a
paired bootstrap at 95 % confidence, on the selection split (never the frozen test split), on the identical
images and mask versions. Pure ``decide`` on hand-built per-image tables, then ``tracking.promote`` against a
real SQLite MLflow store (a constant pyfunc stands in for the model: the gate only reads stored results)."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from medsam2.config import ExperimentCfg, PromotionCfg
from medsam2.promotion import baseline_methods, decide

N = 30


def frame(model, baselines: dict[str, np.ndarray | list[float]] | None = None, *, split="val", n=None,
          mask_hash: dict[int, str] | None = None, patients=None) -> pd.DataFrame:
    """Per-image results as ``evaluate`` writes them: model rows + baseline rows, identity columns included."""
    model = np.asarray(model, float)
    n = n or len(model)
    rows = []
    for method, vals in {"model": model, **(baselines or {})}.items():
        for k, v in enumerate(np.asarray(vals, float)):
            rows.append({"image_id": f"cvc:{k:03d}", "dataset": "cvc-clinicdb", "modality": "endoscopy",
                         "patient_id": patients[k] if patients is not None else f"seq{k // 3}", "split": split,
                         "pixel_sha256": f"px{k}", "mask_pixel_sha256": (mask_hash or {}).get(k, f"mk{k}"),
                         "method": method, "condition": "clean", "severity": 0, "dice": float(v),
                         "iou": float(v) * 0.8, "precision": float(v), "recall": float(v), "hd95": 5.0})
    return pd.DataFrame(rows)


def centred_noise(sd: float, seed: int, n: int = N) -> np.ndarray:
    """Noise with exactly zero mean, so the planted mean difference is exact."""
    z = np.random.default_rng(seed).normal(0, sd, n)
    return z - z.mean()


BASE = 0.6 + centred_noise(0.05, seed=1)  # the champion's per-image Dice
LOW = {"ellipse_in_box": np.full(N, 0.3)}  # a baseline every candidate here beats clearly


# ------------------------------------------------------------------------------------------- pure decide
def test_baseline_mapping_lives_in_one_function():
    assert baseline_methods("box") == ("ellipse_in_box", "fill_box")
    assert baseline_methods("none") == baseline_methods("points") == ("empty", "mean_mask")
    with pytest.raises(ValueError, match="prompt mode"):
        baseline_methods("scribble")


def test_defaults_are_the_honest_ones():
    pc = PromotionCfg()
    assert pc.confidence == 0.95 and pc.margin == 0.0 and pc.selection_split == "val" and pc.n_bootstrap > 0
    with pytest.raises(ValidationError, match="test"):
        PromotionCfg(selection_split="test")


def test_below_baseline_first_model_is_not_promoted_and_the_reason_names_it():
    ellipse = 0.8 + centred_noise(0.05, seed=2)
    d = decide(frame(ellipse - 0.016, {"ellipse_in_box": ellipse}), None, PromotionCfg(), prompt="box")
    assert not d.promote
    assert d.summary.startswith("below the box-prior baseline (ellipse_in_box) by 0.016 Dice"), d.summary
    assert d.stats["baseline_method"] == "ellipse_in_box" and d.stats["baseline_mean_diff"] == pytest.approx(-0.016)
    assert any("no champion yet" in r for r in d.reasons)


def test_first_model_needs_a_confident_gain_over_the_baseline():
    ellipse = 0.8 + centred_noise(0.05, seed=2)
    noisy = decide(frame(ellipse + 0.005 + centred_noise(0.1, seed=3), {"ellipse_in_box": ellipse}), None,
                   PromotionCfg(), prompt="box")
    assert not noisy.promote and "by only +0.005 Dice" in noisy.summary and "< 0.95" in noisy.summary
    clear = decide(frame(ellipse + 0.08 + centred_noise(0.05, seed=4), {"ellipse_in_box": ellipse}), None,
                   PromotionCfg(), prompt="box")
    assert clear.promote and clear.stats["baseline_p_improve"] >= 0.95
    assert "beats the box-prior baseline (ellipse_in_box) by +0.080 Dice" in clear.summary


def test_prompt_free_model_must_beat_the_better_of_empty_and_mean_mask():
    empty, mean_mask = np.zeros(N), 0.3 + centred_noise(0.05, seed=5)
    bl = {"empty": empty, "mean_mask": mean_mask}
    weak = decide(frame(0.2 + centred_noise(0.05, seed=6), bl), None, PromotionCfg(), prompt="none")
    assert not weak.promote and weak.stats["baseline_method"] == "mean_mask"
    assert weak.summary.startswith("below the mean-mask baseline (mean_mask) by 0.100 Dice"), weak.summary
    good = decide(frame(0.5 + centred_noise(0.05, seed=6), bl), None, PromotionCfg(), prompt="points")
    assert good.promote and good.stats["baseline_method"] == "mean_mask"
    # a box model's results carry no empty/mean_mask rows: a prompt-free model cannot pass on them
    missing = decide(frame(0.9 + centred_noise(0.05, seed=6), LOW), None, PromotionCfg(), prompt="none")
    assert not missing.promote and "no empty / mean_mask baseline results" in missing.summary


def test_noisy_small_gain_over_champion_is_rejected_and_a_clear_gain_promoted():
    champ = frame(BASE, LOW)
    noisy = frame(BASE + 0.005 + centred_noise(0.1, seed=7), LOW)
    d = decide(noisy, champ, PromotionCfg(), prompt="box", champion_name="champion v3")
    assert not d.promote and d.stats["mean_diff"] == pytest.approx(0.005)
    assert d.stats["p_improve"] < 0.95
    assert d.summary == f"beats champion v3 by only +0.005 Dice, P(improvement)={d.stats['p_improve']:.3f} < 0.95"
    # the same gain passes when the confidence test is off: the default confidence is what rejects it
    assert decide(noisy, champ, PromotionCfg(n_bootstrap=0), prompt="box").promote
    clear = decide(frame(BASE + 0.08 + centred_noise(0.05, seed=8), LOW), champ, PromotionCfg(), prompt="box",
                   champion_name="champion v3")
    assert clear.promote and clear.stats["p_improve"] >= 0.95
    assert "beats champion v3 by +0.080 Dice, P(improvement)=1.000 ≥ 0.95" in clear.summary
    assert "beats the box-prior baseline (ellipse_in_box)" in clear.summary


def test_worse_tie_margin_and_guard_against_the_champion():
    champ = frame(BASE, LOW)
    worse = decide(frame(BASE - 0.02, LOW), champ, PromotionCfg(), prompt="box", champion_name="champion v1")
    assert not worse.promote and worse.summary.startswith("below champion v1 by 0.020 Dice")
    assert not decide(champ.copy(), champ, PromotionCfg(), prompt="box").promote  # a tie never replaces it
    better = frame(BASE + 0.03 + centred_noise(0.01, seed=9), LOW)
    assert decide(better, champ, PromotionCfg(margin=0.02), prompt="box").promote
    under = decide(better, champ, PromotionCfg(margin=0.05), prompt="box", champion_name="champion v1")
    assert not under.promote and under.summary == "beats champion v1 by only +0.030 Dice, below the margin +0.050"
    worse_hd = better.assign(hd95=9.0)
    g = decide(worse_hd, champ, PromotionCfg(guarded={"hd95": 1.0}), prompt="box")
    assert not g.promote and any("guarded hd95 regressed by 4.0000" in r for r in g.reasons)


@pytest.mark.parametrize("where", ["challenger", "champion", "one_row"])
def test_decide_refuses_test_rows(where):
    champ, chal = frame(BASE, LOW), frame(BASE + 0.1, LOW)
    if where == "challenger":
        chal = frame(BASE + 0.1, LOW, split="test")
    elif where == "champion":
        champ = frame(BASE, LOW, split="test")
    else:
        chal.loc[chal.index[-1], "split"] = "test"
    with pytest.raises(ValueError, match="frozen test split"):
        decide(chal, champ, PromotionCfg(), prompt="box")


def test_decide_refuses_results_it_cannot_place_in_a_split():
    with pytest.raises(ValueError, match="no 'split' column"):
        decide(frame(BASE, LOW).drop(columns="split"), None, PromotionCfg(), prompt="box")
    with pytest.raises(ValueError, match="train"):
        decide(frame(BASE, LOW, split="train"), None, PromotionCfg(), prompt="box")


def test_different_images_or_mask_versions_are_never_compared():
    chal = frame(BASE + 0.1, LOW)
    relabelled = frame(BASE, LOW, mask_hash={4: "mk4-edited"})
    d = decide(chal, relabelled, PromotionCfg(), prompt="box", champion_name="champion v2")
    assert not d.promote and "champion v2 was not evaluated on the same val images and mask versions" in d.summary
    subset = frame(BASE[:20], {"ellipse_in_box": np.full(20, 0.3)})
    assert not decide(chal, subset, PromotionCfg(), prompt="box").promote
    assert decide(chal, frame(BASE, LOW), PromotionCfg(), prompt="box").promote


def test_bootstrap_resamples_video_sequences(monkeypatch):
    import medsam2.promotion as promotion

    seen = []
    real = promotion.paired_bootstrap

    def spy(a, b, **kw):
        seen.append(kw.get("groups"))
        return real(a, b, **kw)

    monkeypatch.setattr(promotion, "paired_bootstrap", spy)
    patients = [f"seq{k // 5}" for k in range(N - 1)] + [""]  # the last frame has no sequence: its own group
    d = decide(frame(BASE + 0.1, LOW, patients=patients), None, PromotionCfg(), prompt="box")
    assert d.promote and d.stats["n_groups"] == 7
    assert list(seen[0][:5]) == ["seq0"] * 5 and seen[0][-1] == "image:cvc:029"
    # whole sequences resampled: a gain carried by a single video is less certain than the same gain per frame
    one_video = BASE + np.where(np.arange(N) < 5, 0.06, 0.0)
    per_seq = decide(frame(one_video, LOW, patients=[f"seq{k // 5}" for k in range(N)]), frame(BASE, LOW),
                     PromotionCfg(), prompt="box")
    per_frame = decide(frame(one_video, LOW, patients=[f"f{k}" for k in range(N)]), frame(BASE, LOW),
                       PromotionCfg(), prompt="box")
    assert per_seq.stats["p_improve"] <= per_frame.stats["p_improve"]
    assert per_seq.stats["ci_low"] < per_frame.stats["ci_low"]


# -------------------------------------------------------------------------- tracking.promote on a real store
class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return [0]


def _candidate(sel: pd.DataFrame, test_dice: float = 0.5, prompt: str = "box") -> tuple[str, str]:
    """A registered-able model + an evaluation run with test results (eval/) and selection results."""
    from medsam2 import tracking

    tracking.setup(ExperimentCfg())
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=_Constant(), pip_requirements=[])
        mlflow.log_metric("test_dice", test_dice)
    tracking.log_selection_results(run.info.run_id, sel, split="val", prompt=prompt)
    _log_test_results(run.info.run_id, frame(np.full(N, test_dice), LOW, split="test"))
    return info.model_uri, run.info.run_id


def _log_test_results(run_id: str, df: pd.DataFrame | str) -> None:
    """(Re)write the run's frozen-test per-image table, ``eval/per_image.csv``."""
    from medsam2 import tracking

    text = df.to_csv(index=False) if isinstance(df, pd.DataFrame) else df
    tracking._client().log_text(run_id, text, "eval/per_image.csv")


def _cli(*args: str) -> dict:
    from medsam2.cli import app

    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_first_model_below_baseline_stays_challenger_in_the_registry(tracking_env):
    from medsam2 import tracking
    from medsam2.cli import app

    ellipse = 0.8 + centred_noise(0.05, seed=2)
    uri, run_id = _candidate(frame(ellipse - 0.016, {"ellipse_in_box": ellipse}), test_dice=0.99)
    res = tracking.promote(uri, run_id, ExperimentCfg())
    assert not res["promoted"] and res["alias"] == "challenger" and res["version"] == 1
    assert tracking.alias_version("medsam2", "champion") is None
    mv = tracking.alias_version("medsam2", "challenger")
    assert mv.tags["gate_decision"] == "rejected"
    assert "below the box-prior baseline (ellipse_in_box) by 0.016 Dice" in mv.tags["gate_summary"]
    assert "below the box-prior baseline (ellipse_in_box) by 0.016 Dice" in mv.tags["gate_reasons"]
    assert mv.tags["gate_selection_split"] == "val" and mv.tags["gate_n_images"] == str(N)
    assert mv.tags["test_dice"] == "0.990000"  # reported beside the decision, not decided on
    assert len(mv.tags["gate_selection_identity"]) == 16
    assert tracking.champion_summary("medsam2") is None

    shown = _cli("champion")
    assert shown["version"] is None and shown["last_challenger"]["version"] == 1
    assert "ellipse_in_box" in shown["last_challenger"]["gate_summary"]
    human = CliRunner().invoke(app, ["champion"])
    assert human.exit_code == 0 and human.exception is None
    assert "no champion" in human.output and "(ellipse_in_box)" in human.output and "0.016" in human.output


def test_registry_gate_noisy_gain_rejected_clear_gain_promoted_and_test_results_never_read(tracking_env):
    from flows.artifacts import gate_lines
    from medsam2 import tracking

    cfg = ExperimentCfg()
    uri1, run1 = _candidate(frame(BASE, LOW))
    assert tracking.promote(uri1, run1, cfg)["promoted"]  # beats its baseline: the first champion

    noisy_sel = frame(BASE + 0.005 + centred_noise(0.1, seed=7), LOW)
    uri2, run2 = _candidate(noisy_sel, test_dice=0.4)
    first = tracking.promote(uri2, run2, cfg)
    assert not first["promoted"] and first["alias"] == "challenger"
    assert first["summary"].startswith("beats champion v1 by only +0.005 Dice, P(improvement)=")
    assert first["selection"]["champion_results"] == "stored"
    md = "\n".join(gate_lines(first))
    assert "rejected, stays challenger" in md and "beats champion v1 by only +0.005 Dice" in md
    assert int(tracking.alias_version("medsam2", "champion").version) == 1
    shown = _cli("champion")
    assert shown["version"] == 1 and shown["last_challenger"]["gate_decision"] == "rejected"
    assert "champion v1 by only" in shown["last_challenger"]["gate_summary"]

    # corrupt the candidate's TEST results (perfect scores, then garbage): the decision does not move
    _log_test_results(run2, frame(np.ones(N), LOW, split="test"))
    again = tracking.promote(uri2, run2, cfg)
    _log_test_results(run2, "not,a\ncsv\x00")
    garbage = tracking.promote(uri2, run2, cfg)
    assert again["promoted"] is garbage["promoted"] is False and again["version"] == garbage["version"] == 2
    assert again["summary"] == garbage["summary"] == first["summary"] and again["stats"] == first["stats"]

    uri3, run3 = _candidate(frame(BASE + 0.08 + centred_noise(0.05, seed=8), LOW))
    clear = tracking.promote(uri3, run3, cfg)
    assert clear["promoted"] and clear["previous_champion"] == 1 and "beats champion v1 by +0.080 Dice" in \
        clear["summary"]
    assert int(tracking.alias_version("medsam2", "champion").version) == 3


def test_champion_is_reevaluated_when_images_or_masks_differ(tracking_env):
    from medsam2 import tracking

    cfg = ExperimentCfg()
    uri1, run1 = _candidate(frame(BASE, LOW))
    assert tracking.promote(uri1, run1, cfg)["promoted"]
    calls: list[str] = []

    def reevaluate(champion_uri: str) -> pd.DataFrame:
        calls.append(champion_uri)
        return frame(BASE, LOW, mask_hash={4: "mk4-edited"})  # the champion scored on the relabelled masks

    same = frame(BASE + 0.08 + centred_noise(0.05, seed=8), LOW)
    uri2, run2 = _candidate(same)
    res = tracking.promote(uri2, run2, cfg, reevaluate=reevaluate)
    assert res["promoted"] and calls == [] and res["selection"]["champion_results"] == "stored"

    # mask 4 was relabelled since champion v2 was scored: its stored results are not reused
    relabelled = frame(BASE + 0.2, LOW, mask_hash={4: "mk4-edited"})
    uri3, run3 = _candidate(relabelled)
    res = tracking.promote(uri3, run3, cfg, reevaluate=reevaluate)
    assert calls == ["models:/medsam2/2"] and res["selection"]["champion_results"] == "reevaluated"
    assert res["promoted"] and res["stats"]["champion_dice"] == pytest.approx(BASE.mean())  # the re-evaluated one
    stored = tracking.per_image_results(run3, "selection/champion_v2_per_image.csv")
    assert stored is not None and "mk4-edited" in set(stored["mask_pixel_sha256"])
    mv = tracking.alias_version("medsam2", "champion")
    assert mv.tags["gate_champion_results"] == "reevaluated" and mv.tags["gate_champion_version"] == "2"

    # an extra image is a different set too; without a way to re-evaluate, the candidate is rejected
    calls.clear()
    bigger = frame(np.r_[BASE + 0.3, 0.9], {"ellipse_in_box": np.full(N + 1, 0.3)}, mask_hash={4: "mk4-edited"})
    uri4, run4 = _candidate(bigger)
    res = tracking.promote(uri4, run4, cfg)
    assert not res["promoted"] and "re-evaluate it" in res["summary"] and calls == []
    res = tracking.promote(uri4, run4, cfg, reevaluate=lambda u: calls.append(u) or bigger)
    assert calls == ["models:/medsam2/3"]


def test_promote_refuses_a_run_without_selection_results(tracking_env):
    from medsam2 import tracking

    tracking.setup(ExperimentCfg())
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=_Constant(), pip_requirements=[])
    _log_test_results(run.info.run_id, frame(np.ones(N), LOW, split="test"))
    with pytest.raises(FileNotFoundError, match="selection/per_image.csv"):
        tracking.promote(info.model_uri, run.info.run_id, ExperimentCfg())

"""benchmarks/active_learning.py: the val-only choice of the best score, and ``--quick`` end to end on real
Kvasir images (every score an arm, one round, the JSON and plot written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.test_benchmarks import _bench_module, run_script


def _row(arm: str, rnd: int, val: float, test: float) -> dict:
    return {"arm": arm, "round": rnd, "val_dice": val, "test_dice": test, "test_confidence_spearman": 0.6}


def test_best_score_is_chosen_on_val_and_compared_with_random_on_test(monkeypatch) -> None:
    al = _bench_module("active_learning", monkeypatch)
    rows = [_row("start", 0, 0.5, 0.5), _row("entropy", 1, 0.80, 0.60), _row("kcenter", 1, 0.70, 0.99),
            _row("random", 1, 0.75, 0.55)]
    per_image = {("random", 1): {"a": 0.5, "b": 0.6, "c": 0.55}, ("entropy", 1): {"a": 0.6, "b": 0.62, "c": 0.58}}
    s = al.summarise(rows, ["entropy", "kcenter", "random"], per_image, {"test_dice": 0.58})
    assert s["headroom"]["ceiling_minus_random"] == pytest.approx(0.03)
    assert s["headroom"]["ceiling_minus_start"] == pytest.approx(0.08)
    assert s["best_score"] == "entropy"  # best val, though kcenter has the best test Dice
    assert s["gap_best_vs_random"]["gap"] == pytest.approx(0.05) and s["gap_best_vs_random"]["n"] == 3
    assert s["goals"]["best_beats_random"]["met"] is True and s["goals"]["spearman_confidence_dice"]["met"] is True
    # an arm that did not reach round 1 (cut by --max-minutes): nothing is compared
    assert al.summarise(rows[:2] + rows[3:], ["entropy", "kcenter", "random"], per_image)["last_round"] == 0
    # a headroom probe (--scores random): the ceiling's gap, no best score, no crash
    probe = al.summarise([rows[0], rows[3]], ["random"], per_image, {"test_dice": 0.58})
    assert probe["headroom"]["ceiling_minus_random"] == pytest.approx(0.03) and "best_score" not in probe


def test_set_overrides_are_read_as_yaml_and_checked(monkeypatch, tmp_path: Path) -> None:
    al = _bench_module("active_learning", monkeypatch)
    sets = al.parse_sets(["model.prompt=points", "model.box_mask=false", "model.box_crop=null", "train.lr=3e-4"])
    assert sets == {"model.prompt": "points", "model.box_mask": False, "model.box_crop": None, "train.lr": 3e-4}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        al.parse_sets(["model.prompt"])
    # points with the recipe's box-only levers still on is refused before any ingest or training
    with pytest.raises(SystemExit, match="needs model.prompt=box"):
        al.main(["--set", "model.prompt=points", "--out", str(tmp_path / "out")])


@pytest.mark.slow  # ~2.5 min on 2 cores: 6 one-step trainings of the demo recipe, each evaluated on 3 test images
def test_active_learning_quick(sample_data: Path, tmp_path: Path) -> None:
    res = run_script("active_learning", "--quick", "--data", str(sample_data), "--out", str(tmp_path), timeout=1200)
    assert json.loads((tmp_path / "active_learning.json").read_text()) == res
    assert (tmp_path / "active_learning.png").stat().st_size > 0
    assert res["complete"] is True and res["mode"] == "quick" and not res["skipped"]
    arms = res["plan"]["arms"]
    assert set(arms) == {"entropy", "kcenter", "pred_iou", "random", "tta_flip"}
    table = res["table"]
    start = table[0]
    assert start["arm"] == "start" and start["labelled_images"] == res["plan"]["start_images"] == 2
    rounds = [r for r in table if r["round"] == 1]
    assert sorted(r["arm"] for r in rounds) == sorted(arms)
    for r in rounds:
        assert r["labelled_images"] == 3 and len(r["chosen"]) == res["plan"]["add_images"] == 1
        assert r["test_dice_ci_low"] - 1e-9 <= r["test_dice"] <= r["test_dice_ci_high"] + 1e-9
        assert r["steps"] == start["steps"] == 1 and r["pool"] == 6 and r["n_test"] == 3
        assert "test_confidence_ece" in r  # the last round's models fit failure flags on val
        # and the row says which input they calibrated, chosen among every one on val (stability included)
        assert r["confidence_input"] in r["confidence_input_spearman_val"]
        assert {"iou_pred", "stability"} <= set(r["confidence_input_spearman_val"])
    assert res["summary"]["best_score"] in set(arms) - {"random"}
    ceiling = res["ceiling"]  # every train label (8), the same one step
    assert ceiling["labelled_images"] == 8 and ceiling["steps"] == 1 and ceiling["n_test"] == 3
    assert res["summary"]["headroom"]["ceiling_test_dice"] == ceiling["test_dice"]
    assert res["summary"]["goals"]["best_beats_random"]["threshold"] == 0.02

"""A 2-round self-training flow end to end (Prefect test harness, local SQLite MLflow): each round is an MLflow
child run of the pipeline's parent run with pseudo-label count, acceptance rate and pseudo-label Dice."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_two_round_self_training_flow(kvasir_workdir, tmp_path, tracking_env, monkeypatch):
    import mlflow
    from prefect.testing.utilities import prefect_test_harness

    from flows.train import train_medsam2
    from medsam2 import tracking

    monkeypatch.delenv("MEDSAM2_OVERRIDES", raising=False)
    overrides = [
        f"data.workdir={kvasir_workdir}", f"train.output_dir={tmp_path / 'runs'}", "model.image_size=64",
        "train.max_steps=2", "train.batch_size=2", "train.warmup_steps=1", "train.eval_every=2",
        "data.augment=none", "train.progress=false", "data.label_fraction=0.5",
        "semisup.self_training_rounds=2", "semisup.threshold=0.0", "tracking.experiment=selftrain-test",
    ]
    with prefect_test_harness(server_startup_timeout=120):
        res = train_medsam2(source=None, config=None, overrides=overrides)
    st = res["self_training"]
    assert st is not None and 1 <= len(st["rounds"]) <= 2
    parent = res["parent_run_id"]
    mlflow.set_tracking_uri(tracking.tracking_uri())
    children = mlflow.search_runs(experiment_names=["selftrain-test"],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'", output_format="list")
    rounds = [r for r in children if r.info.run_name.startswith("self-train-round-")]
    assert len(rounds) == len(st["rounds"])
    for r in rounds:
        m = r.data.metrics
        assert {"pseudo_n", "pseudo_accepted", "pseudo_acceptance_rate", "pseudo_dice"} <= set(m), sorted(m)
        assert m["pseudo_n"] >= 1 and 0 <= m["pseudo_acceptance_rate"] <= 1
    promo = res["promotion"]  # first model in this registry: promoted only if it beats the box-prior baseline
    assert promo["version"] == 1 and (promo["promoted"] or "ellipse_in_box" in promo["summary"])

"""Self-training library: pseudo-label acceptance on a tiny model, round manifests, and a 2-round smoke."""

from __future__ import annotations

import numpy as np
import pytest

from medsam2.data.dataset import load_cached
from medsam2.data.manifest import read_manifest
from medsam2.data.selection import select_rows
from medsam2.engine import self_training as st
from medsam2.engine.checkpoint import load_model
from tests.conftest import remove_checkpoints


@pytest.fixture(scope="module")
def teacher(kvasir_workdir, tiny_cfg, tmp_path_factory):
    """A 1-step supervised teacher checkpoint (decoder_only keeps it quick) and its config."""
    from medsam2.engine.train import train

    out = tmp_path_factory.mktemp("teacher")
    cfg = tiny_cfg(kvasir_workdir, out / "run", "train.max_steps=1", "model.adapter=decoder_only")
    yield train(cfg).checkpoint, cfg
    remove_checkpoints(out)  # a module-scoped dir outlives the module otherwise


def test_pseudo_label_acceptance(kvasir_workdir, teacher, tmp_path):
    ckpt, cfg = teacher
    model, _ = load_model(ckpt)
    _, pool = select_rows(cfg.data, "train", seed=cfg.train.seed)
    assert len(pool) == 3
    acc, stats = st.pseudo_label(
        model, pool, kvasir_workdir, confidence="mean_prob", threshold=0.0, out_dir=tmp_path / "all"
    )
    assert stats["n"] == 3 and stats["accepted"] == 3 and stats["acceptance_rate"] == 1.0
    assert 0.0 <= stats["pseudo_dice"] <= 1.0 and 0.5 <= stats["mean_confidence"] <= 1.0
    for (_, row), (_, src) in zip(acc.iterrows(), pool.iterrows(), strict=True):
        mask = np.load(row["mask_uri"])
        image, _ = load_cached(kvasir_workdir, src)
        assert mask.dtype == np.uint8 and mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 1}
        assert row["label_kind"] == "mask" and "pseudo_label" in row["flags"]
    none, stats = st.pseudo_label(
        model, pool, kvasir_workdir, confidence="entropy", threshold=1.0, out_dir=tmp_path / "none"
    )
    assert len(none) == 0 and stats["accepted"] == 0 and np.isnan(stats["pseudo_dice"])
    assert 0 <= stats["pseudo_dice_all"] <= 1


def test_round_manifest_hides_pool_and_adds_pseudo_rows(kvasir_workdir, teacher, tmp_path):
    ckpt, cfg = teacher
    model, _ = load_model(ckpt)
    lab, pool = select_rows(cfg.data, "train", seed=cfg.train.seed)
    acc, _ = st.pseudo_label(
        model, pool.iloc[:1], kvasir_workdir, confidence="pred_iou", threshold=0.0, out_dir=tmp_path / "p"
    )
    st.write_round_manifest(kvasir_workdir, tmp_path / "work", pool, acc)
    rcfg = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"workdir": str(tmp_path / "work"), "label_fraction": 1.0})}
    )
    rlab, rpool = select_rows(rcfg.data, "train")
    assert set(rlab["image_id"]) == set(lab["image_id"]) | {pool["image_id"].iloc[0]}
    assert set(rpool["image_id"]) == set(pool["image_id"].iloc[1:])
    assert len(read_manifest(tmp_path / "work")) == len(read_manifest(kvasir_workdir))
    image, mask = load_cached(tmp_path / "work", rlab.iloc[0])  # absolute uris resolve from the round dir
    assert mask is not None and image.shape[:2] == mask.shape


@pytest.mark.slow  # two tiny student trainings + pseudo-labelling + val evaluations
def test_two_rounds_smoke(kvasir_workdir, teacher, tmp_path, monkeypatch):
    ckpt, cfg = teacher
    cfg = cfg.model_copy(update={"semisup": cfg.semisup.model_copy(update={"threshold": 0.0})})
    real_val = st.val_dice
    seen = []

    def rising(model, c):  # the real metric once, then a rising sequence so both rounds run
        seen.append(real_val(model, c))
        return 0.1 * len(seen) - 1.0

    monkeypatch.setattr(st, "val_dice", rising)
    results = st.run_self_training(cfg, 2, ckpt, lambda r: [], work_root=tmp_path / "st")
    assert [r.round for r in results] == [1, 2] and all(r.improved for r in results)
    assert 0.0 <= seen[0] <= 1.0
    assert results[1].teacher_checkpoint == results[0].checkpoint
    assert results[0].pseudo["accepted"] == 3 and results[0].train["steps"] == 1
    assert st.best_checkpoint(results, ckpt) == results[1].checkpoint

    # no improvement → stop after round 1 (same work root: round 1's training resumes as already finished)
    monkeypatch.setattr(st, "val_dice", lambda model, c: 0.5)
    results = st.run_self_training(cfg, 3, ckpt, None, work_root=tmp_path / "st")
    assert len(results) == 1 and not results[0].improved
    assert st.best_checkpoint(results, ckpt) == str(ckpt)

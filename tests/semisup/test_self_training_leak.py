"""Self-training never trains on a ground-truth mask that ``data.label_fraction`` hid (weak labels or not).

Manifest level, no model: ``run_self_training`` runs for real with the teacher, the pseudo-labeller, the
student training and the val metric replaced by stand-ins; the stand-in ``train`` records what the round's
training would read (``select_rows`` on the round's config, then ``load_cached`` of every training row).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from medsam2.config import load_config
from medsam2.data.dataset import load_cached
from medsam2.data.manifest import MANIFEST_COLUMNS, MANIFEST_NAME, read_manifest, write_table
from medsam2.data.selection import select_rows
from medsam2.engine import self_training as st

N_MASK, N_NONE, N_VAL = 8, 2, 2


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _workdir(root: Path) -> Path:
    """8 mask-labelled train rows (each mask different), 2 unlabelled train rows, 2 val rows; 8×8 images."""
    wd = root / "work"
    (wd / "cache").mkdir(parents=True)
    rows = []
    for i in range(N_MASK + N_NONE + N_VAL):
        iid = f"img{i:02d}"
        image = np.full((8, 8, 3), i, np.uint8)
        np.save(wd / "cache" / f"{iid}.npy", image)
        labelled = i < N_MASK or i >= N_MASK + N_NONE
        mask = None
        if labelled:
            mask = np.zeros((8, 8), np.uint8)
            mask[: 1 + i % 7, : 1 + i // 7] = 1  # unique per row
            np.save(wd / "cache" / f"{iid}.mask.npy", mask)
        rows.append({
            "image_id": iid, "dataset": "toy", "patient_id": f"p{i}", "modality": "endoscopy",
            "image_uri": f"cache/{iid}.npy", "mask_uri": f"cache/{iid}.mask.npy" if labelled else None,
            "label_kind": "mask" if labelled else "none", "box": [0, 0, 4, 4],
            "split": "val" if i >= N_MASK + N_NONE else "train", "width": 8, "height": 8,
            "sha256": _sha(image), "mask_sha256": _sha(mask) if labelled else None,
            "source_uri": f"/src/images/{iid}.jpg", "mask_source_uri": f"/src/masks/{iid}.jpg" if labelled else None,
            "frame": 0, "target": None, "mask_fraction": float(mask.mean()) if labelled else 0.0,
            "intensity_mean": float(i), "intensity_std": 0.0, "pixel_sha256": _sha(image),
            "mask_pixel_sha256": _sha(mask) if labelled else None, "split_bucket": 500, "flags": "", "meta": "{}",
            "unit_key": iid, "unit_fingerprint": iid, "ingested_at": "2025-01-01T00:00:00Z",
        })
    write_table(pd.DataFrame(rows), wd / MANIFEST_NAME, MANIFEST_COLUMNS)
    return wd


def _run_rounds(cfg, tmp_path: Path, monkeypatch, rounds: int = 2) -> list[dict]:
    """Run ``run_self_training`` with stand-ins; return, per round, what its training saw."""
    import medsam2.engine.train as train_mod

    seen: list[dict] = []

    def fake_pseudo_label(model, rows, workdir, *, out_dir, **kw):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        acc = []
        for _, row in rows.iterrows():  # accept every pool image with an all-ones pseudo-mask
            pseudo = np.ones((int(row["height"]), int(row["width"])), np.uint8)
            path = out_dir / f"{row['image_id']}.pseudo.npy"
            np.save(path, pseudo)
            new = row.copy()
            new["image_uri"] = str((Path(workdir) / row["image_uri"]).resolve())
            new["mask_uri"], new["label_kind"], new["mask_sha256"] = str(path.resolve()), "mask", _sha(pseudo)
            new["flags"] = st.PSEUDO_FLAG
            acc.append(new)
        acc_df = pd.DataFrame(acc) if acc else rows.iloc[:0]
        return acc_df.reset_index(drop=True), {"n": float(len(rows)), "accepted": float(len(acc))}

    def fake_train(rcfg, callbacks=None):
        labelled, _ = select_rows(rcfg.data, "train", seed=rcfg.train.seed)
        wd = Path(rcfg.data.workdir)
        masks = {}
        for _, row in labelled.iterrows():
            _, mask = load_cached(wd, row)
            masks[row["image_id"]] = None if mask is None else _sha(np.asarray(mask))
        seen.append({"rows": labelled, "mask_sha": masks, "manifest": read_manifest(wd)})
        ckpt = tmp_path / f"student{len(seen)}.pt"
        return SimpleNamespace(checkpoint=str(ckpt), to_dict=lambda: {"checkpoint": str(ckpt)})

    scores = iter(np.linspace(0.1, 0.9, rounds + 1))
    monkeypatch.setattr(st, "load_model", lambda ckpt, device=None: (object(), None))
    monkeypatch.setattr(st, "pseudo_label", fake_pseudo_label)
    monkeypatch.setattr(st, "val_dice", lambda model, c: float(next(scores)))
    monkeypatch.setattr(train_mod, "train", fake_train)
    results = st.run_self_training(cfg, rounds, tmp_path / "teacher.pt", work_root=tmp_path / "st")
    assert len(results) == rounds == len(seen)
    return seen


@pytest.mark.parametrize("weak", [True, False])
def test_rounds_never_see_a_mask_hidden_by_label_fraction(tmp_path, monkeypatch, weak):
    wd = _workdir(tmp_path)
    cfg = load_config(overrides=[
        f"data.workdir={wd}", f"train.output_dir={tmp_path / 'out'}", "train.device=cpu",
        f"data.weak_labels={str(weak).lower()}", "data.label_fraction=0.5",
    ])
    src = read_manifest(wd).set_index("image_id")
    labelled, pool = select_rows(cfg.data, "train", seed=cfg.train.seed)
    kept = set(labelled.loc[labelled["label_kind"] == "mask", "image_id"])
    train_masks = set(src.index[(src["split"] == "train") & (src["label_kind"] == "mask")])
    hidden = train_masks - kept
    assert len(kept) == len(hidden) == N_MASK // 2  # label_fraction 0.5 of 8 masks
    true_sha = {i: src.at[i, "mask_sha256"] for i in hidden}
    true_uri = {str((wd / src.at[i, "mask_uri"]).resolve()) for i in hidden} | {src.at[i, "mask_uri"] for i in hidden}

    for r, round_ in enumerate(_run_rounds(cfg, tmp_path, monkeypatch), start=1):
        rows = round_["rows"].set_index("image_id")
        # No training row of the round carries a hidden row's true mask: not by uri, not by pixels.
        for iid, sha in round_["mask_sha"].items():
            assert sha is None or sha not in true_sha.values(), f"round {r}: {iid} trains on a hidden true mask"
        leaked = [i for i in hidden & set(rows.index) if rows.at[i, "label_kind"] == "mask"
                  and st.PSEUDO_FLAG not in str(rows.at[i, "flags"] or "")]
        assert not leaked, f"round {r}: rows {sorted(leaked)} train as true masks though label_fraction hid them"
        # ...nor does the round's manifest point at one (so nothing downstream can read it either).
        man = round_["manifest"]
        assert not set(man["mask_uri"].dropna()) & true_uri
        assert not set(man["mask_sha256"].dropna()) & set(true_sha.values())
        # The kept masks are still trained on, with their true pixels.
        assert kept <= set(rows.index) and all(round_["mask_sha"][i] == src.at[i, "mask_sha256"] for i in kept)
        if weak:  # hidden rows keep their box as a weak label
            assert hidden <= set(rows.index) and set(rows.loc[sorted(hidden), "label_kind"]) == {"box"}
            assert all(round_["mask_sha"][i] is None for i in hidden)
        else:  # hidden rows were in the pool: they train only through their pseudo-label
            assert set(pool["image_id"]) >= hidden
            assert all(st.PSEUDO_FLAG in rows.at[i, "flags"] for i in hidden & set(rows.index))

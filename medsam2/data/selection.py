"""Which manifest rows a run trains, validates and tests on (one place, so every stage agrees)."""

from __future__ import annotations

import hashlib

import pandas as pd

from medsam2.config import DataCfg
from medsam2.data.manifest import dataset_version, read_manifest

LABELLED_KINDS = ("mask",)
WEAK_KINDS = ("box", "image")  # box-only annotations; image-level "no finding" (flag no_finding) negatives


def _stable_rank(ids: pd.Series, seed: int) -> pd.Series:
    return ids.map(lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())


def select_rows(dc: DataCfg, split: str, *, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows of ``split`` → (labelled rows, unlabelled pool), both sorted by ``image_id``.

    train/val use ``data.train_datasets``; test uses ``data.eval_datasets`` (falling back to the train
    datasets). For train, ``data.label_fraction`` < 1 keeps a deterministic fraction of the labelled rows (by a
    seeded hash of the image id) and moves the rest, with their masks hidden, to the unlabelled pool, as do
    rows without a mask (``label_kind`` none/image). ``max_*_images`` caps are applied last, deterministically.
    """
    df = read_manifest(dc.workdir)
    if df.empty:
        raise FileNotFoundError(
            f"no manifest in {dc.workdir}: run `medsam2 ingest SRC --workdir {dc.workdir}`"
        )
    datasets = dc.train_datasets if split != "test" else (dc.eval_datasets or dc.train_datasets)
    if datasets:
        unknown = sorted(set(datasets) - set(df["dataset"]))
        if unknown:
            raise ValueError(
                f"datasets {unknown} are not in the manifest (have {sorted(set(df['dataset']))})"
            )
        df = df[df["dataset"].isin(datasets)]
    df = df[df["split"] == split].sort_values("image_id")
    kinds = LABELLED_KINDS + (WEAK_KINDS if dc.weak_labels and split != "test" else ())
    is_negative = (df["label_kind"] == "image") & df["flags"].fillna("").str.contains("no_finding")
    usable = df["label_kind"].isin(kinds) & ((df["label_kind"] != "image") | is_negative)
    labelled, unlabelled = df[usable], df[~usable]
    if split == "train" and dc.label_fraction < 1:
        masks = labelled[labelled["label_kind"] == "mask"]
        order = masks.assign(_r=_stable_rank(masks["image_id"], seed)).sort_values("_r").drop(columns="_r")
        keep = max(1, round(len(order) * dc.label_fraction))
        hidden = order.iloc[keep:]
        labelled = labelled[~labelled["image_id"].isin(hidden["image_id"])]
        if dc.weak_labels:  # the hidden rows keep their box: a realistic cheap annotation
            labelled = pd.concat([labelled, hidden.assign(label_kind="box", mask_uri=None)])
        else:
            unlabelled = pd.concat([unlabelled, hidden])
        labelled, unlabelled = labelled.sort_values("image_id"), unlabelled.sort_values("image_id")
    cap = dc.max_eval_images if split == "test" else dc.max_train_images
    if cap is not None:
        labelled = labelled.iloc[:cap]
    return labelled.reset_index(drop=True), unlabelled.reset_index(drop=True)


def training_data_version(dc: DataCfg) -> str:
    """Dataset version of the labelled rows a training run can see (train + val of the chosen datasets)."""
    df = read_manifest(dc.workdir)
    if dc.train_datasets:
        df = df[df["dataset"].isin(dc.train_datasets)]
    return dataset_version(df[df["split"].isin(["train", "val"])])


def cross_dataset_rows(dc: DataCfg) -> pd.DataFrame:
    """Every labelled dataset in the manifest, for cross-dataset evaluation: the test rows of the datasets the
    model trained on, and all labelled rows of the datasets it never saw (they are external test sets)."""
    df = read_manifest(dc.workdir)
    df = df[df["label_kind"].isin(LABELLED_KINDS)]
    trained = set(dc.train_datasets or df.loc[df["split"] != "test", "dataset"].unique())
    seen = df["dataset"].isin(trained)
    rows = pd.concat([df[seen & (df["split"] == "test")], df[~seen]]).sort_values(["dataset", "image_id"])
    if dc.max_eval_images is not None:
        rows = rows.groupby("dataset", group_keys=False).head(dc.max_eval_images)
    return rows.reset_index(drop=True)

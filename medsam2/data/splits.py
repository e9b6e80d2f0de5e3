"""Patient-grouped, deterministic train/val/test assignment.

The rule, applied to every row of one dataset each time it is ingested (so it is a pure function of the data):

1. A dataset-level ``split`` option (layout ``{"split": "test"}``) puts every row of the dataset in that split
   — used for cross-dataset evaluation (e.g. CVC-ClinicDB as an external test set for a Kvasir-trained model).
2. A frozen test list (Kvasir's ``split_pranet_test.txt`` — from the source, else the copy shipped in
   ``medsam2/data/resources/`` — or layout ``test_list``) marks rows whose image stem is listed as ``test`` —
   and with them *every row of the same patient*, so a patient is never split across test and train/val. Test
   rows never move, whatever else changes. A dataset expecting a list that is missing or matches none of its
   images is an ingest error (``sidecars.TestListError``), never a silently lost test split.
3. Every other row is ``val`` if its patient's bucket < ``val_fraction × 1000``, else ``train``. The bucket
   (0–999) is ``sha256("split\\0" + raw patient key)`` mod 1000, computed at ingest from the raw patient key
   (DICOM PatientID, BraTS case, CVC sequence, image stem, ...) *before* it is pseudonymised. Using the raw
   key (not the salted ``patient_id``) keeps splits — and so the dataset version — identical across work dirs
   with different de-identification salts; storing only a 1-of-1000 bucket reveals nothing about the key. All
   rows of a patient share the bucket, so no patient is in two splits.

Groups: CVC-ClinicDB rows are grouped by video sequence (frame-number table in its README), BraTS by case id
in the file name, DICOM by PatientID (else study, series, folder), SAM-Med2D by scan id, others by image
stem.
"""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath

import pandas as pd

DEFAULT_VAL_FRACTION = 0.1


def split_bucket(raw_patient_key: str) -> int:
    """0–999, uniform, deterministic in the raw key (independent of the de-identification salt)."""
    return int.from_bytes(hashlib.sha256(b"split\0" + raw_patient_key.encode()).digest()[:8], "big") % 1000


def source_stem(source_uri: str) -> str:
    from medsam2.data.readers import stem_of

    return stem_of(PurePosixPath(str(source_uri)).name)


def assign_splits(
    rows: pd.DataFrame,
    *,
    test_stems: set[str] | None = None,
    dataset_split: str | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> pd.Series:
    """Split per row of one dataset (columns used: ``patient_id``, ``split_bucket``, ``source_uri``).

    Returns a string Series aligned with ``rows`` with values in {train, val, test}.
    """
    if len(rows) == 0:
        return pd.Series([], dtype="string", index=rows.index)
    if dataset_split:
        return pd.Series(dataset_split, index=rows.index, dtype="string")
    out = pd.Series("train", index=rows.index, dtype="string")
    out[rows["split_bucket"].astype(int) < int(round(val_fraction * 1000))] = "val"
    if test_stems:
        listed = rows["source_uri"].map(source_stem).isin(test_stems)
        test_patients = set(rows.loc[listed, "patient_id"])
        out[rows["patient_id"].isin(test_patients)] = "test"
    return out

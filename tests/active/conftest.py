"""Active-learning fixtures: the engine tests' tiny random-init checkpoint, and a work dir with an unlabelled
pool (real Kvasir images without masks in train, val and test, plus a DICOM CT)."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import copy_kvasir_subset, sample_root
from tests.engine.conftest import tiny_checkpoint  # noqa: F401  (the fixture, shared)


def _stems_by_split(n_train: int, n_val: int) -> tuple[list[str], list[str]]:
    """Train and val stems that ``copy_kvasir_subset`` (6 train, 2 val) does not take."""
    from medsam2.data.splits import DEFAULT_VAL_FRACTION, split_bucket

    other = (sample_root() / "kvasir-seg" / "split_other.txt").read_text().split()
    cut = round(DEFAULT_VAL_FRACTION * 1000)
    train = [s for s in other if split_bucket(f"kvasir-seg:{s}") >= cut][6:6 + n_train]
    val = [s for s in other if split_bucket(f"kvasir-seg:{s}") < cut][2:2 + n_val]
    return train, val


@pytest.fixture(scope="module")
def pool_workdir(sample_data, tmp_path_factory):
    """Ingested work dir: 6 train / 2 val / 3 test labelled Kvasir pairs; unlabelled: 4 train, 1 val and 1 test
    Kvasir image (no mask) and the pydicom CT (train) and MR (val). Returns (workdir, pool stems by split)."""
    from medsam2.data.ingest import ingest

    root = tmp_path_factory.mktemp("pool")
    src = copy_kvasir_subset(root / "kvasir-seg")
    kv = sample_data / "kvasir-seg"
    train, val = _stems_by_split(4, 1)
    test = (kv / "split_pranet_test.txt").read_text().split()[10:11]
    for stem in train + val + test:
        shutil.copy(kv / "images" / f"{stem}.jpg", src / "images")
    with open(src / "split_pranet_test.txt", "a") as f:
        f.write("\n".join(test) + "\n")
    ingest(str(src), root / "work")
    dcm = root / "dicom"
    dcm.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(sample_data / "dicom" / "pydicom" / name, dcm)
    ingest(str(dcm), root / "work")
    yield root / "work", {"train": train, "val": val, "test": test}
    shutil.rmtree(root, ignore_errors=True)

"""Helpers of the data-platform tests: small copies of the shared real data (imported by name, not through
``conftest``: two conftest modules exist, and ``from conftest import`` got whichever was imported last)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SALT = "test-salt"


def copy_kvasir_pairs(sample: Path, dest: Path, n_test: int, n_other: int) -> tuple[list[str], list[str]]:
    """The first ``n_test`` PraNet-listed and ``n_other`` other Kvasir pairs into ``dest``/images|masks (no split
    list); returns (listed stems, other stems)."""
    src = sample / "kvasir-seg"
    test = sorted((src / "split_pranet_test.txt").read_text().split())[:n_test]
    other = sorted((src / "split_other.txt").read_text().split())[:n_other]
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    for stem in test + other:
        shutil.copy(src / "images" / f"{stem}.jpg", dest / "images" / f"{stem}.jpg")
        shutil.copy(src / "masks" / f"{stem}.jpg", dest / "masks" / f"{stem}.jpg")
    return test, other


def copy_kvasir(sample: Path, dest: Path, n_test: int = 3, n_other: int = 7) -> Path:
    """A Kvasir-SEG subset in ``dest`` (images/, masks/, split_pranet_test.txt, kavsir_bboxes.json)."""
    src = sample / "kvasir-seg"
    test, other = copy_kvasir_pairs(sample, dest, n_test, n_other)
    (dest / "split_pranet_test.txt").write_text("\n".join(test) + "\n")
    boxes = json.loads((src / "kavsir_bboxes.json").read_text())
    (dest / "kavsir_bboxes.json").write_text(json.dumps({k: boxes[k] for k in test + other if k in boxes}))
    return dest

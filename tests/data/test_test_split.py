"""No silently lost test split: the shipped PraNet list for Kvasir sources without one, and clear errors where a
dataset expects a test list that does not apply."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from data_helpers import SALT, copy_kvasir_pairs
from PIL import Image

from medsam2.data import layouts as L
from medsam2.data import sidecars
from medsam2.data.ingest import ingest
from medsam2.data.manifest import read_manifest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sidecars.RESOURCES / "kvasir_split_pranet_test.txt"


def _kvasir_like(sample: Path, dest: Path, n_test: int = 2, n_other: int = 3, own_list: list[str] | None = None):
    """A folder like the official Kvasir-SEG download: images/ + masks/ (same stems), no split list unless
    ``own_list``. Returns (folder, PraNet-listed stems copied, other stems copied)."""
    test, other = copy_kvasir_pairs(sample, dest, n_test, n_other)
    if own_list is not None:
        (dest / "split_pranet_test.txt").write_text("\n".join(own_list) + "\n")
    return dest, test, other


def _splits(workdir: Path) -> dict[str, str]:
    df = read_manifest(workdir)
    return dict(zip(df["source_uri"].map(lambda u: Path(u).stem), df["split"], strict=True))


def _png_folder(root: Path, stems: list[str]) -> Path:
    """A tiny synthetic 2D dataset: images/<stem>.png + masks/<stem>.png (16×16)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for s in stems:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{s}.png")
        m = np.zeros((16, 16), np.uint8)
        m[4:10, 4:10] = 255
        Image.fromarray(m).save(root / "masks" / f"{s}.png")
    return root


def test_shipped_list_is_the_pranet_list_and_is_package_data(sample_data: Path) -> None:
    stems = sidecars.load_stems(SHIPPED)
    assert len(stems) == 100
    assert stems == sidecars.load_stems(sample_data / "kvasir-seg" / "split_pranet_test.txt")
    pkg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "resources/*.txt" in pkg["medsam2.data"]
    assert L.resolve_layout("Kvasir-SEG", None)["shipped_test_list"] == SHIPPED.name  # the Simula folder name


def test_kvasir_without_list_gets_the_shipped_test_split(sample_data: Path, tmp_path: Path) -> None:
    src, test, other = _kvasir_like(sample_data, tmp_path / "kvasir-seg")
    assert not list(src.glob("*.txt"))
    ingest(str(src), tmp_path / "work", salt=SALT)
    splits = _splits(tmp_path / "work")
    assert {s: splits[s] for s in test} == dict.fromkeys(test, "test")
    assert all(splits[s] in ("train", "val") for s in other)


def test_source_with_its_own_list_still_uses_it(sample_data: Path, tmp_path: Path) -> None:
    # The source's list names one 'other' image and none of the PraNet ones: the source wins over the shipped list.
    src, test, other = _kvasir_like(sample_data, tmp_path / "kvasir-seg", own_list=[])
    (src / "split_pranet_test.txt").write_text(other[0] + "\n")
    ingest(str(src), tmp_path / "work", salt=SALT)
    splits = _splits(tmp_path / "work")
    assert splits[other[0]] == "test"
    assert all(splits[s] in ("train", "val") for s in test + other[1:])


def test_expected_list_missing_is_a_clear_error(tmp_path: Path) -> None:
    # A layout naming a test list the source lacks (and no list ships for this dataset).
    src = _png_folder(tmp_path / "lab-polyps", ["a", "b", "c"])
    with pytest.raises(sidecars.TestListError) as exc:
        ingest(str(src), tmp_path / "work", layout={"test_list": "test_ids.txt"}, salt=SALT)
    msg = str(exc.value)
    assert "'lab-polyps'" in msg and "'test_ids.txt'" in msg and "test_list" in msg and str(src) in msg
    assert isinstance(exc.value, FileNotFoundError)
    assert not (tmp_path / "work" / "manifest.parquet").exists()  # nothing written
    # The same for a Kvasir source that names its own (absent) list: no silent fallback to the shipped one.
    kv = _png_folder(tmp_path / "kvasir-seg", ["x", "y"])
    with pytest.raises(sidecars.TestListError, match="'my_test.txt'"):
        ingest(str(kv), tmp_path / "work2", layout={"test_list": "my_test.txt"}, salt=SALT)


def test_list_matching_no_image_is_a_clear_error(tmp_path: Path, sample_data: Path) -> None:
    # A Kvasir source with none of the PraNet images: the shipped list applies and names none of them.
    src, _, _ = _kvasir_like(sample_data, tmp_path / "kvasir-seg", n_test=0, n_other=2)
    with pytest.raises(sidecars.TestListError) as exc:
        ingest(str(src), tmp_path / "work", salt=SALT)
    msg = str(exc.value)
    assert "'kvasir-seg'" in msg and "names none of the 2 images" in msg and "shipped:" in msg
    assert "split_pranet_test.txt" in msg and "test_list" in msg
    # The source's own list naming none of its images: the same error, naming that file.
    own = _png_folder(tmp_path / "lab", ["a", "b"])
    (own / "test.txt").write_text("zzz\n")
    with pytest.raises(sidecars.TestListError, match=r"'test.txt'.*names none of the 2 images"):
        ingest(str(own), tmp_path / "work2", salt=SALT)
    # An empty list is an error too.
    (own / "test.txt").write_text("\n")
    with pytest.raises(sidecars.TestListError, match="names no image stems"):
        ingest(str(own), tmp_path / "work3", salt=SALT)


def test_opt_outs_need_no_list(tmp_path: Path) -> None:
    kv = _png_folder(tmp_path / "kvasir-seg", ["x", "y", "z"])
    # test_list: null → no frozen test split (explicitly); split: test → the whole dataset is the test set.
    ingest(str(kv), tmp_path / "w1", layout={"test_list": None}, salt=SALT)
    assert len(_splits(tmp_path / "w1")) == 3 and "test" not in set(_splits(tmp_path / "w1").values())
    ingest(str(kv), tmp_path / "w2", layout={"split": "test"}, salt=SALT)
    assert list(_splits(tmp_path / "w2").values()) == ["test"] * 3
    # A dataset whose profile expects no list still ingests without one.
    ingest(str(_png_folder(tmp_path / "busi", ["p", "q"])), tmp_path / "w3", salt=SALT)
    assert len(_splits(tmp_path / "w3")) == 2 and "test" not in set(_splits(tmp_path / "w3").values())


def test_cli_prints_the_error_without_a_traceback(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medsam2.cli import app

    src = _png_folder(tmp_path / "lab-polyps", ["a", "b"])
    layout = tmp_path / "layout.yaml"
    layout.write_text("test_list: test_ids.txt\n")
    res = CliRunner().invoke(app, ["ingest", str(src), "--workdir", str(tmp_path / "w"), "--layout", str(layout)])
    assert res.exit_code == 3 and isinstance(res.exception, SystemExit), res.exception  # input data error
    out = res.output + (res.stderr if res.stderr_bytes is not None else "")
    assert "Error" in out and "'test_ids.txt'" in out and "Traceback" not in out

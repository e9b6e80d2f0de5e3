"""Validate a work dir's manifest with great-expectations (GX 1.x, ephemeral context, pandas data source).

Checks (each one GX expectation; row-level checks that need files or cross-row logic are computed into boolean
helper columns first, then expected to be all True):

* schema: the required columns exist; ``image_id`` unique and non-null; key columns non-null;
* ranges: ``width``/``height`` in [8, 20000]; ``mask_fraction`` in [0, 1]; ``label_kind``, ``modality``,
  ``split`` in their allowed sets;
* geometry: ``box`` inside the image (``0 <= x0 < x1 <= width``, same for y) when present;
* cache: the image cache file exists, is uint8 (height, width, 3); for mask rows the mask file exists, is
  uint8 (height, width) and binary ({0, 1}); ``label_kind == "mask"`` iff ``mask_uri`` is set;
* leakage: no train/val row shares a source file hash (``sha256``) or decoded-pixel hash (``pixel_sha256``)
  with a test row (any dataset); no ``patient_id`` in two splits.

``validate(workdir, data_docs_dir=...)`` also writes GX Data Docs (HTML) there. Importing GX costs ~8 s of CPU
on first use; validation itself takes well under a second for a few thousand rows (plus one mmap per cache
file).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsam2.data.manifest import LABEL_KINDS, MODALITIES, SPLITS, read_manifest

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = [
    "image_id",
    "dataset",
    "patient_id",
    "modality",
    "image_uri",
    "mask_uri",
    "label_kind",
    "box",
    "split",
    "width",
    "height",
    "sha256",
    "source_uri",
    "ingested_at",
    "mask_fraction",
]
NOT_NULL = [
    "image_id",
    "dataset",
    "patient_id",
    "modality",
    "image_uri",
    "label_kind",
    "split",
    "sha256",
    "source_uri",
]
#: helper column → what a False value means (each must be all True)
ROW_CHECKS = {
    "_box_inside_image": "box outside the image",
    "_image_cache_ok": "image cache file missing or not uint8 (height, width, 3)",
    "_mask_cache_ok": "mask cache file missing, wrong shape or not binary {0,1}",
    "_mask_uri_matches_kind": "label_kind 'mask' without mask_uri (or mask_uri on a non-mask row)",
    "_no_test_content_in_train": "train/val image with the same sha256 / pixel hash as a test image",
    "_patient_in_one_split": "patient_id present in more than one split",
}


@dataclass
class ValidationResult:
    success: bool
    failures: list[str] = field(default_factory=list)
    statistics: dict[str, Any] = field(default_factory=dict)
    data_docs: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _box_ok(r: Any) -> bool:
    b = r.box
    if b is None or (isinstance(b, float) and np.isnan(b)):
        return True
    try:
        x0, y0, x1, y1 = (int(v) for v in b)
    except (TypeError, ValueError):
        return False
    return 0 <= x0 < x1 <= int(r.width) and 0 <= y0 < y1 <= int(r.height)


def _cache_checks(df: pd.DataFrame, workdir: Path) -> tuple[list[bool], list[bool]]:
    img_ok, mask_ok = [], []
    for r in df.itertuples(index=False):
        try:
            a = np.load(workdir / r.image_uri, mmap_mode="r")
            img_ok.append(a.dtype == np.uint8 and a.shape == (int(r.height), int(r.width), 3))
        except (OSError, ValueError, TypeError):
            img_ok.append(False)
        if not isinstance(r.mask_uri, str):
            mask_ok.append(True)
            continue
        try:
            m = np.load(workdir / r.mask_uri, mmap_mode="r")
            mask_ok.append(
                m.dtype == np.uint8 and m.shape == (int(r.height), int(r.width)) and int(m.max()) <= 1
            )
        except (OSError, ValueError, TypeError):
            mask_ok.append(False)
    return img_ok, mask_ok


def _helper_columns(df: pd.DataFrame, workdir: Path) -> pd.DataFrame:
    df = df.copy()
    df["_box_inside_image"] = [_box_ok(r) for r in df.itertuples(index=False)]
    df["_image_cache_ok"], df["_mask_cache_ok"] = _cache_checks(df, workdir)
    has_mask = df["mask_uri"].map(lambda v: isinstance(v, str) and v != "")
    df["_mask_uri_matches_kind"] = (df["label_kind"] == "mask") == has_mask
    test = df[df["split"] == "test"]
    trainval = df["split"].isin(["train", "val"])
    leak = trainval & (
        df["sha256"].isin(set(test["sha256"])) | df["pixel_sha256"].isin(set(test["pixel_sha256"].dropna()))
    )
    df["_no_test_content_in_train"] = ~leak
    nsplits = df.groupby("patient_id")["split"].transform("nunique")
    df["_patient_in_one_split"] = nsplits <= 1
    for c in ROW_CHECKS:
        df[c] = df[c].astype(bool)
    return df


def _suite(gx: Any) -> Any:
    E = gx.expectations
    suite = gx.ExpectationSuite(name="manifest")
    suite.add_expectation(E.ExpectTableColumnsToMatchSet(column_set=REQUIRED_COLUMNS, exact_match=False))
    suite.add_expectation(E.ExpectColumnValuesToBeUnique(column="image_id"))
    for c in NOT_NULL:
        suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=c))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="width", min_value=8, max_value=20000))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="height", min_value=8, max_value=20000))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="mask_fraction", min_value=0, max_value=1))
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="label_kind", value_set=list(LABEL_KINDS)))
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="modality", value_set=list(MODALITIES)))
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)))
    for c in ROW_CHECKS:
        suite.add_expectation(E.ExpectColumnValuesToBeInSet(column=c, value_set=[True]))
    return suite


def _describe(res: Any) -> str:
    cfg = res.expectation_config
    kw = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
    col = kw.pop("column", None)
    what = ROW_CHECKS.get(col, "")
    r = res.result or {}
    bits = [f"{cfg.type}({col or ''})"]
    if what:
        bits.append(what)
    if "unexpected_count" in r:
        bits.append(f"{r['unexpected_count']} rows fail")
    examples = r.get("partial_unexpected_list") or []
    if examples and not (col or "").startswith("_"):
        bits.append(f"e.g. {examples[:5]}")
    if "observed_value" in r:
        bits.append(f"observed {r['observed_value']}")
    if res.exception_info and res.exception_info.get("raised_exception"):
        bits.append(f"error: {res.exception_info.get('exception_message')}")
    return " — ".join(bits)


def _gx_frame(df: pd.DataFrame) -> pd.DataFrame:
    """GX-friendly copy: ``box`` lists as strings, pandas extension dtypes as plain objects."""
    out = df.copy()
    out["box"] = out["box"].map(lambda b: None if b is None or not hasattr(b, "__len__") else str(list(b)))
    for c in out.columns:
        if str(out[c].dtype) == "string":
            out[c] = out[c].astype(object).where(out[c].notna(), None)
        elif str(out[c].dtype) in ("Int64", "Float64", "boolean"):
            out[c] = out[c].astype(object)
    return out


def validate(workdir: str | Path, *, data_docs_dir: str | Path | None = None) -> ValidationResult:
    """Run the manifest expectations (module docstring) on ``workdir``; optionally write Data Docs HTML."""
    t0 = time.monotonic()
    workdir = Path(workdir)
    df = read_manifest(workdir)
    stats: dict[str, Any] = {"rows": int(len(df))}
    if len(df) == 0:
        return ValidationResult(False, [f"no manifest rows in {workdir}"], stats, None)
    df = _helper_columns(df, workdir)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (
        ctx.data_sources.add_pandas("medsam2")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = ctx.suites.add(_suite(gx))
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="manifest", data=batch_def, suite=suite))
    actions = []
    docs_path = None
    if data_docs_dir is not None:
        base = Path(data_docs_dir).absolute()
        base.mkdir(parents=True, exist_ok=True)
        ctx.add_data_docs_site(
            site_name="medsam2",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(base)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["medsam2"]))
        docs_path = str(base / "index.html")
    cp = ctx.checkpoints.add(
        gx.Checkpoint(
            name="manifest",
            validation_definitions=[vd],
            actions=actions,
            result_format={"result_format": "SUMMARY"},
        )
    )
    run = cp.run(batch_parameters={"dataframe": _gx_frame(df)})
    vr = next(iter(run.run_results.values()))
    failures = [_describe(r) for r in vr.results if not r.success]
    stats.update({k: v for k, v in vr.statistics.items()})
    stats["by_dataset"] = {k: int(v) for k, v in df["dataset"].value_counts().sort_index().items()}
    stats["by_split"] = {k: int(v) for k, v in df["split"].value_counts().sort_index().items()}
    stats["by_label_kind"] = {k: int(v) for k, v in df["label_kind"].value_counts().sort_index().items()}
    stats["seconds"] = round(time.monotonic() - t0, 3)
    if docs_path and not Path(docs_path).exists():
        docs_path = None
    res = ValidationResult(bool(vr.success), failures, stats, docs_path)
    log.info("validate %s: success=%s failures=%d", workdir, res.success, len(failures))
    return res

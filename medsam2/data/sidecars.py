"""A dataset's sidecar files and per-dataset options: box JSONs, the frozen test list (the source's own, or the
one shipped in ``resources/``) and the functions a layout gives for a file's patient key and modality."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medsam2.data.layouts import modality_from_name


def load_boxes(path: Path) -> dict[str, list[int]]:
    """Box sidecar → {stem: [x0, y0, x1, y1]} (union of several boxes per image).

    Accepts Kvasir's ``{stem: {"bbox": [{"xmin", "ymin", "xmax", "ymax"}, ...]}}`` or ``{stem: [x0, y0, x1,
    y1]}``.
    """
    data = json.loads(path.read_text())
    out: dict[str, list[int]] = {}
    for stem, v in data.items():
        boxes = []
        if isinstance(v, dict):
            for b in v.get("bbox", []):
                boxes.append([b["xmin"], b["ymin"], b["xmax"], b["ymax"]])
        elif isinstance(v, list) and len(v) == 4:
            boxes.append(v)
        if boxes:
            out[Path(stem).stem] = [
                int(min(b[0] for b in boxes)),
                int(min(b[1] for b in boxes)),
                int(max(b[2] for b in boxes)),
                int(max(b[3] for b in boxes)),
            ]
    return out


def load_stems(path: Path) -> set[str]:
    """A test-list text file → set of stems (one per line; extensions and folders stripped)."""
    return {Path(line.strip()).stem for line in path.read_text().splitlines() if line.strip()}


class TestListError(FileNotFoundError):
    """A dataset that should have a frozen test split has none: no test list, or one that names none of its
    images. Raised by ingest before anything is written; the message says which dataset, which file, and how
    to fix it (``medsam2 ingest`` prints just the message and exits 1)."""

    __test__ = False  # not a pytest test class, whatever its name


RESOURCES = Path(__file__).resolve().parent / "resources"


def _fix_hint(dataset: str, want: str | None) -> str:
    put = f"put the list at <source>/{want} (one image stem per line), " if want else ""
    return (
        f"To fix: {put}pass a layout with test_list: <a file in the source> (medsam2 ingest --layout FILE.yaml), "
        f"or, to ingest {dataset!r} without a frozen test split, a layout with test_list: null "
        f"(or split: test to use the whole dataset as an external test set)."
    )


def resolve_test_stems(
    files: list[str], opts: dict[str, Any], dataset: str, read: Callable[[str], str], source: str = "the source"
) -> tuple[set[str], str | None]:
    """Frozen test stems of a dataset and where they came from.

    Order: the source's own list (``opts['test_list']`` or an auto-detected root-level ``split_*test*.txt``),
    else the list shipped for the dataset's profile (``opts['shipped_test_list']`` in :data:`RESOURCES`), else
    no list. A dataset-level ``split`` option needs no list.

    Args:
        files: the source's relative paths. opts: resolved layout. dataset: manifest dataset name.
        read: relative path → text of that file in the source. source: the source's URI (for messages).

    Returns:
        ``(stems, origin)``: the listed stems and ``'<source file>'`` / ``'shipped:<name>'``, or
        ``(set(), None)`` when no list applies.

    Raises:
        TestListError: ``opts['test_list']`` is set (by the profile or a layout) but neither the source nor the
            package has that list, or the list is empty.
    """
    if opts.get("split"):
        return set(), None
    found = find_test_list(files, opts)
    if found is not None:
        stems = {Path(line.strip()).stem for line in read(found).splitlines() if line.strip()}
        origin = found
    elif opts.get("test_list"):
        shipped = opts.get("shipped_test_list")
        if not shipped or not (RESOURCES / shipped).is_file():
            raise TestListError(
                f"dataset {dataset!r} expects a frozen test list {opts['test_list']!r} in {source}, but the source "
                f"has no such file and no list ships with medsam2 for it, so its test split would silently go to "
                f"train/val. " + _fix_hint(dataset, opts["test_list"])
            )
        stems, origin = load_stems(RESOURCES / shipped), f"shipped:{shipped}"
    else:
        return set(), None
    if not stems:
        raise TestListError(
            f"dataset {dataset!r}: the test list {origin!r} names no image stems. " + _fix_hint(dataset, found)
        )
    return stems, origin


def check_test_stems(
    stems: set[str], origin: str | None, image_stems: set[str], dataset: str, opts: dict[str, Any], source: str
) -> None:
    """Raise :class:`TestListError` when a test list applies (``origin`` set) but names none of the dataset's
    image stems (``image_stems``: stems of the source's image files; an empty set checks nothing)."""
    if not origin or not image_stems or stems & image_stems:
        return
    want = origin if not origin.startswith("shipped:") else opts.get("test_list")
    raise TestListError(
        f"dataset {dataset!r}: its test list {origin!r} ({len(stems)} stems, e.g. {sorted(stems)[0]!r}) names "
        f"none of the {len(image_stems)} images in {source} (e.g. {sorted(image_stems)[0]!r}), so the dataset "
        f"would have no test split. A test list holds image file names without extension, one per line. "
        + _fix_hint(dataset, want)
    )


def find_test_list(files: list[str], opts: dict[str, Any]) -> str | None:
    """The test-list file: ``opts['test_list']`` if present, else a root-level
    ``split_*test*.txt``/``test.txt``."""
    if opts.get("test_list"):
        return opts["test_list"] if opts["test_list"] in files else None
    root = [f for f in files if "/" not in f]
    for f in root:
        if re.fullmatch(r"(split_.*test.*|test|test_list)\.txt", f, re.IGNORECASE):
            return f
    return None


def patient_key_fn(opts: dict[str, Any]) -> Callable[[str], str]:
    """stem → raw patient key (never stored), from ``patient_fn``, a ``patient`` regex, or the stem itself."""
    if "patient_fn" in opts:
        return opts["patient_fn"]
    if opts.get("patient"):
        rx = re.compile(opts["patient"])

        def by_regex(stem: str) -> str:
            m = rx.search(stem)
            if not m:
                return stem
            return m.group(1) if m.groups() else m.group(0)

        return by_regex
    return lambda stem: stem


def modality_fn(opts: dict[str, Any]) -> Callable[[str], str]:
    if opts.get("modality"):
        return lambda stem, m=opts["modality"]: m
    if "modality_fn" in opts:
        return opts["modality_fn"]
    return lambda stem: modality_from_name(stem)

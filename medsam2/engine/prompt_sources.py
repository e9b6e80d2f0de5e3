"""Where ``medsam2 predict`` gets one prompt per image: the command line, a CSV/JSON prompt file, or a manifest.

Every source yields :class:`PromptItem` s, one per input. A problem that concerns one input (a malformed box in
its row, an image id the manifest does not have) is kept on that item (``error``) and reported for it, so the
rest of the batch still runs; only a prompt file that cannot be read as a whole is a usage error.

Prompt files (``--prompts FILE``):

- **CSV** with a header: ``image`` (path; relative paths are relative to the prompt file's folder, else to the
  current folder), then either ``box`` (``"x0,y0,x1,y1"``) or the four columns ``x0,y0,x1,y1``, and/or
  ``points`` (``"x,y[,label];x,y[,label]…"``, label 1 foreground, 0 background) with optional ``labels``
  (``"1;0"``, overriding the labels in ``points``); optional ``id`` names the output.
- **JSON**: a list of objects with the same keys (``box`` as ``[x0, y0, x1, y1]`` or the string form, ``points``
  as ``[[x, y], …]`` or the string form, ``labels`` as a list), or an object ``{image: box}`` /
  ``{image: {box | points | labels}}``.

Boxes and points are in each image's own pixel coordinates (x right, y down; box ends exclusive).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsam2.errors import InputDataError, UsageError

KEYS = ("image", "id", "box", "x0", "y0", "x1", "y1", "points", "labels")
"""The columns / keys a prompt file may have."""


@dataclass(frozen=True)
class PromptItem:
    """One input of a batch and its prompt.

    ``path``: an image file, or None for a manifest row (then ``cache`` is its (H,W,3) uint8 ``.npy``).
    ``box``: (4,) float32 or None; ``points``: (N,2) float32 and ``labels``: (N,) int32, or None.
    ``error``: why this input cannot run (set by the source), else None.
    """

    name: str
    input: str = ""
    """What the JSON summary calls the input (default: the path, else ``name``)."""
    path: Path | None = None
    cache: Path | None = None
    box: np.ndarray | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        """How the input is named in the JSON summary."""
        return self.input or (str(self.path) if self.path is not None else self.name)


def parse_box(text: Any) -> np.ndarray | None:
    """``"x0,y0,x1,y1"`` or a 4-sequence → (4,) float32; None / "" → None. Raises ValueError when malformed."""
    if text is None or (isinstance(text, str) and not text.strip()) or (isinstance(text, float) and np.isnan(text)):
        return None
    try:
        vals = [float(v) for v in (text.replace(" ", "").split(",") if isinstance(text, str) else text)]
    except (TypeError, ValueError):
        raise ValueError(f"box must be x0,y0,x1,y1 (four numbers), got {text!r}") from None
    if len(vals) != 4 or not all(np.isfinite(vals)):
        raise ValueError(f"box must be x0,y0,x1,y1 (four numbers), got {text!r}")
    return np.array(vals, np.float32)


def parse_points(text: Any) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """``"x,y[,label];x,y[,label]"`` or ``[[x, y(, label)], …]`` → ((N,2) float32, (N,) int32); label defaults to 1."""
    if text is None or (isinstance(text, str) and not text.strip()) or (isinstance(text, float) and np.isnan(text)):
        return None, None
    items = [i.split(",") for i in text.split(";") if i.strip()] if isinstance(text, str) else list(text)
    pts, labels = [], []
    for item in items:
        try:
            vals = [float(v) for v in item]
        except (TypeError, ValueError):
            raise ValueError(f"point {item!r} is not x,y or x,y,label") from None
        if len(vals) not in (2, 3) or not all(np.isfinite(vals)):
            raise ValueError(f"point {item!r} is not x,y or x,y,label")
        pts.append(vals[:2])
        labels.append(int(vals[2]) if len(vals) == 3 else 1)
    if not pts:
        return None, None
    return np.array(pts, np.float32), np.array(labels, np.int32)


def check_prompt(box: np.ndarray | None, points: np.ndarray | None, hw: tuple[int, int]) -> None:
    """ValueError unless the box is non-empty and meets the (H,W) image and every point lies inside it."""
    h, w = hw
    if box is not None:
        x0, y0, x1, y1 = (float(v) for v in box)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {box.tolist()} is empty: it needs x0 < x1 and y0 < y1")
        if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
            raise ValueError(f"box {box.tolist()} lies outside the {w}×{h} image")
    if points is not None:
        bad = [p.tolist() for p in points if not (0 <= p[0] <= w and 0 <= p[1] <= h)]
        if bad:
            raise ValueError(f"points {bad} lie outside the {w}×{h} image")


def _item(row: dict[str, Any], base: Path, where: str) -> PromptItem:
    image = row.get("image")
    if image is None or not str(image).strip():
        return PromptItem(name=where, error=f"{where}: no image given")
    path = Path(str(image).strip()).expanduser()
    if not path.is_absolute() and ((base / path).exists() or not path.exists()):
        path = base / path
    name = str(row.get("id") or path.stem)
    try:
        box_text = row.get("box")
        corners = [row.get(k) for k in ("x0", "y0", "x1", "y1")]
        if box_text in (None, "") and any(c not in (None, "") for c in corners):
            box_text = corners
        box = parse_box(box_text)
        pts, labels = parse_points(row.get("points"))
        if row.get("labels") not in (None, "") and pts is not None:
            raw = row["labels"]
            given = [int(float(v)) for v in (raw.split(";") if isinstance(raw, str) else raw)]
            if len(given) != len(pts):
                raise ValueError(f"{len(given)} labels for {len(pts)} points")
            labels = np.array(given, np.int32)
    except ValueError as e:
        return PromptItem(name=name, path=path, error=f"{where}: {e}")
    return PromptItem(name=name, path=path, box=box, points=pts, labels=labels)


def _rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) pairs of a CSV or JSON prompt file; UsageError when the file as a whole is unusable."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" or text.lstrip()[:1] in ("[", "{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"prompt file {path}: not valid JSON ({e})", "see `medsam2 predict --help`") from None
        if isinstance(doc, dict):  # {image: box} or {image: {box/points/labels}}
            doc = [{"image": k, **(v if isinstance(v, dict) else {"box": v})} for k, v in doc.items()]
        if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
            raise UsageError(f"prompt file {path}: expected a list of objects or an object image → box",
                             "see `medsam2 predict --help`")
        rows = [(f"{path.name} item {i}", r) for i, r in enumerate(doc)]
    else:
        reader = csv.DictReader(text.splitlines())
        header = [h.strip() for h in reader.fieldnames or []]
        if "image" not in header:
            raise UsageError(f"prompt file {path}: the CSV header has no 'image' column (header: {header})",
                             f"columns: {', '.join(KEYS)}")
        rows = [(f"{path.name} line {i + 2}", {k.strip(): (v.strip() if isinstance(v, str) else v)
                                                for k, v in r.items() if k is not None})
                for i, r in enumerate(reader)]
    unknown = sorted({k for _, r in rows for k in r} - set(KEYS))
    if unknown:
        import difflib

        near = {k: difflib.get_close_matches(k, KEYS, n=1) for k in unknown}
        named = ", ".join(f"{k!r}" + (f" (did you mean {m[0]!r}?)" if m else "") for k, m in near.items())
        raise UsageError(f"prompt file {path}: unknown column {named}", f"columns: {', '.join(KEYS)}")
    return rows


def from_prompt_file(path: Path) -> list[PromptItem]:
    """The items of a CSV or JSON prompt file (see the module docstring), in file order."""
    if not path.is_file():
        raise InputDataError(f"prompt file {str(path)!r} does not exist", "give a CSV or JSON file to --prompts")
    return [_item(row, path.parent, where) for where, row in _rows(path)]


def from_manifest(workdir: str | Path, ids: list[str] | None = None) -> list[PromptItem]:
    """Manifest rows (all, or those with ``ids``, in that order) with their boxes; the image is the ingest cache
    (the pixels the box refers to). An id the manifest lacks is a failed item, not an error of the batch."""
    from medsam2.data.manifest import CACHE_DIR, read_manifest

    df = read_manifest(workdir)
    by_id = {str(r.image_id): r for r in df.itertuples(index=False)}
    items = []
    for image_id in ids or list(by_id):
        safe = re.sub(r"[^\w.-]+", "_", image_id)
        row = by_id.get(image_id)
        if row is None:
            items.append(PromptItem(name=safe, input=image_id,
                                    error=f"image id {image_id!r} is not in the manifest of {workdir}"))
            continue
        box = None if row.box is None else np.asarray(row.box, np.float32)
        items.append(PromptItem(name=safe, input=image_id, cache=Path(workdir) / CACHE_DIR / f"{image_id}.npy",
                                box=box))
    return items


def collect(paths: list[Path], *, box: str | None = None, points: str | None = None, prompts: Path | None = None,
            workdir: str | None = None, ids: list[str] | None = None) -> list[PromptItem]:
    """``medsam2 predict``'s inputs and prompts → one :class:`PromptItem` per input.

    ``box``/``points`` (the option text) prompt every one of ``paths``; ``prompts`` (a prompt file) gives each
    image its row (with ``paths`` too: only those images, each matched to its row by path, else by file name);
    ``workdir`` [``ids``] takes manifest rows and their boxes. Mixing sources is a UsageError; every path
    missing (with ``--box``/``--points``) is an InputDataError before any model is loaded.
    """
    if (box or points) and (prompts or workdir):
        raise UsageError("--box/--points give one prompt for every input; --prompts and --workdir give their own",
                         "use one of them")
    if prompts and workdir:
        raise UsageError("give either --prompts or --workdir, not both", "see `medsam2 predict --help`")
    if ids and not workdir:
        raise UsageError("--id selects manifest rows: it needs --workdir", "see `medsam2 predict --help`")
    try:
        b = parse_box(box)
    except ValueError as e:
        raise UsageError(f"--box: {e}", "see `medsam2 predict --help`") from None
    try:
        pts, labels = parse_points(points)
    except ValueError as e:
        raise UsageError(f"--points: {e}", "see `medsam2 predict --help`") from None
    if prompts is not None:
        items = from_prompt_file(prompts)
        if paths:  # only the images named on the command line, each with its row
            by_path = {it.path.resolve(): it for it in items if it.path is not None}
            by_name = {it.path.name: it for it in items if it.path is not None}
            items = [by_path.get(p.resolve()) or by_name.get(p.name)
                     or PromptItem(name=p.stem, path=p, error=f"no row for this image in {prompts}") for p in paths]
    elif workdir is not None:
        if paths:
            raise UsageError("--workdir segments manifest rows: give --id, not image paths",
                             "see `medsam2 predict --help`")
        items = from_manifest(workdir, ids)
    else:
        if not paths:
            raise UsageError("nothing to segment: give images, --prompts FILE or --workdir DIR",
                             "see `medsam2 predict --help`")
        missing = [str(p) for p in paths if not p.exists()]
        if len(missing) == len(paths):
            raise InputDataError(f"input {'file' if len(missing) == 1 else 'files'} not found: "
                                 f"{', '.join(missing)}", "check the paths (PNG/JPEG/TIFF/DICOM images)")
        items = [PromptItem(name=p.stem, path=p, box=b, points=pts, labels=labels) for p in paths]
    if not items:
        raise InputDataError("nothing to segment: the prompt source has no rows", "check the file or work dir")
    return items

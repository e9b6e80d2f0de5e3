"""Same content twice: a unit's fingerprint (has it changed since the last ingest?) and the :class:`Deduper`
(has its content been accepted already, under another path or another dataset?)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pandas as pd

from medsam2.data import layouts as L
from medsam2.data.process import INGEST_VERSION


def fingerprint(u: L.Unit, shas: dict[str, str]) -> str:
    """sha256 of what decides a unit's rows: its files' sha256, its labels and options, :data:`INGEST_VERSION`."""
    blob = json.dumps(
        [
            INGEST_VERSION,
            u.kind,
            [(f, shas.get(f)) for f in u.files],
            u.target,
            u.box,
            u.modality,
            u.patient_id,
            u.split_bucket,
            sorted(u.options.items()),
        ],
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _pixel_key(sha: str, mask_sha: Any) -> tuple[str, str | None]:
    return sha, mask_sha if isinstance(mask_sha, str) else None


class Deduper:
    """The content accepted so far, so that a second copy is quarantined as ``duplicate_content``.

    ``by_bytes``: a file's sha256 → the ``source_uri`` of the first row read from those bytes. ``by_pixels``:
    (decoded image's sha256, decoded mask's sha256 or None) → (``image_id``, ``source_uri``) of the row holding
    that image and mask. Seeded with the other datasets' rows; this dataset's rows join as they are accepted, so
    the first path in sorted order wins.
    """

    def __init__(self, others: pd.DataFrame) -> None:
        self.by_bytes: dict[str, str] = {r.sha256: r.source_uri for r in others.itertuples()}
        self.by_pixels: dict[tuple[str, str | None], tuple[str, str]] = {
            _pixel_key(r.pixel_sha256, r.mask_pixel_sha256): (r.image_id, r.source_uri) for r in others.itertuples()
        }

    def same_bytes(self, sha: str, ref: str) -> str | None:
        """The ``source_uri`` of an accepted row read from the bytes ``sha`` at another path than ``ref``, if any."""
        first = self.by_bytes.get(sha)
        return first if first is not None and first != ref else None

    def claim(self, row: dict[str, Any]) -> str | None:
        """Accept ``row`` unless another image already holds its decoded image and mask; then return that one's
        ``source_uri`` (and accept nothing)."""
        key = _pixel_key(row["pixel_sha256"], row["mask_pixel_sha256"])
        first = self.by_pixels.get(key)
        if first is not None and first[0] != row["image_id"]:
            return first[1]
        self.by_pixels[key] = (row["image_id"], row["source_uri"])
        self.by_bytes.setdefault(row["sha256"], row["source_uri"])
        return None

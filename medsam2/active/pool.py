"""The unlabelled pool of a work dir, the signals the acquisition scores read, and the ranked suggestion.

**The pool** (:func:`pool_rows`) is the manifest's ``train`` rows that have no mask: ``label_kind`` ``none``,
``box`` (a box is not a segmentation) or ``image`` without the ``no_finding`` flag — exactly the unlabelled
rows :func:`~medsam2.data.selection.select_rows` gives for train at ``label_fraction`` 1, over every dataset
of the work dir. Val and test rows are never in it, labelled or not: labelling them would move nothing into
training and would change the sets the gate and the report are judged on. **The labelled set**
(:func:`labelled_rows`) is the train rows with a mask; k-center starts from their embeddings.

Prompts for pool images are :func:`~medsam2.engine.self_training.row_prompt`'s: the row's box (Kvasir's bbox
JSON, a box-only label), else a hidden mask's box where a benchmark hid one, else the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medsam2.config import DataCfg
from medsam2.data.dataset import load_cached, resize_pair
from medsam2.data.selection import select_rows
from medsam2.engine.predict import Prediction, TorchEngine, predict
from medsam2.engine.self_training import row_prompt
from medsam2.errors import InputDataError
from medsam2.model.segmenter import Segmenter, normalize

from .scores import ACQUISITIONS, PoolSignals


class EmptyPoolError(InputDataError):
    """The work dir has no unlabelled train image to suggest (exit 3, like any input-data answer)."""


def _pool_cfg(workdir: str | Path) -> DataCfg:
    return DataCfg(workdir=str(workdir), label_fraction=1.0, weak_labels=False)


def pool_rows(workdir: str | Path) -> pd.DataFrame:
    """Manifest rows of the unlabelled pool (see the module docstring), sorted by ``image_id``."""
    return select_rows(_pool_cfg(workdir), "train")[1]


def labelled_rows(workdir: str | Path) -> pd.DataFrame:
    """Manifest train rows with a mask, sorted by ``image_id``."""
    return select_rows(_pool_cfg(workdir), "train")[0]


def _engine(model):
    """An engine for ``model`` with test-time flipping off: the flip score compares the two views, so neither
    may be the mean of both."""
    engine = TorchEngine(model) if isinstance(model, Segmenter) else model
    if getattr(engine.cfg, "tta_flip", False):
        engine.cfg = engine.cfg.model_copy(update={"tta_flip": False})
    return engine


def _images(rows: pd.DataFrame, workdir: Path) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    images, masks = [], []
    for _, row in rows.iterrows():
        image, mask = load_cached(workdir, row)
        images.append(np.asarray(image))
        masks.append(None if mask is None else np.asarray(mask) > 0)
    return images, masks


def _predict(engine, rows: pd.DataFrame, images: list[np.ndarray], masks: list, *, flip: bool,
             precision: str, batch_size: int) -> list[Prediction]:
    """Predictions of ``images`` with the rows' prompts (``flip``: with each one's ``flip_agreement``)."""
    mode = engine.cfg.prompt
    prompts = [row_prompt(mode, row, img.shape[:2], m)
               for (_, row), img, m in zip(rows.iterrows(), images, masks, strict=True)]
    return predict(engine, images,
                   boxes=[p["box"] for p in prompts] if mode == "box" else None,
                   points=[p["points"] for p in prompts] if mode == "points" else None,
                   point_labels=[p["point_labels"] for p in prompts] if mode == "points" else None,
                   precision=precision, batch_size=batch_size, agreement=flip)


@torch.no_grad()
def embeddings(model, images: list[np.ndarray], batch_size: int = 8) -> np.ndarray:
    """(N,D) float32 image embeddings: the image encoder's last map (``image_embed``, (B,256,S/16,S/16)) of each
    whole image resized to S×S, averaged over space (D = 256)."""
    engine = _engine(model)
    size = engine.image_size
    out = []
    for s in range(0, len(images), batch_size):
        u8 = np.stack([resize_pair(img, None, size)[0] for img in images[s:s + batch_size]])
        x = normalize(torch.from_numpy(u8.astype(np.float32) / 255.0).permute(0, 3, 1, 2).to(engine.device))
        out.append(engine.encode(x)["image_embed"].float().mean((2, 3)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 256), np.float32)


def pool_signals(model, pool: pd.DataFrame, workdir: str | Path, needs: frozenset[str], *,
                 labelled: pd.DataFrame | None = None, precision: str = "auto", batch_size: int = 8,
                 hide_masks: bool = True) -> PoolSignals:
    """The signals of ``pool`` (manifest rows of ``workdir``) that ``needs`` asks for (``pred`` always).

    ``labelled``: rows whose embeddings are k-center's first centres. ``hide_masks``: prompts never read a
    pool row's mask (a benchmark's hidden mask would otherwise give its box); set False to let a simulated
    annotator's box come from it, as self-training's pool prompts do."""
    workdir = Path(workdir)
    engine = _engine(model)
    images, masks = _images(pool, workdir)
    prompt_masks = [None] * len(masks) if hide_masks else masks
    sig = PoolSignals(preds=_predict(engine, pool, images, prompt_masks, flip="flip" in needs,
                                     precision=precision, batch_size=batch_size))
    if "embed" in needs:
        sig.embeddings = embeddings(engine, images, batch_size)
        lab_images = _images(labelled, workdir)[0] if labelled is not None and len(labelled) else []
        sig.labelled_embeddings = embeddings(engine, lab_images, batch_size)
    return sig


@dataclass
class Suggested:
    """One image to label: its manifest row, rank (1 = first), acquisition score, and the model's prediction."""

    row: pd.Series
    rank: int
    score: float
    pred: Prediction


def rank_pool(model, pool: pd.DataFrame, workdir: str | Path, score: str, budget: int, *,
              labelled: pd.DataFrame | None = None, seed: int = 0, precision: str = "auto", batch_size: int = 8,
              hide_masks: bool = True) -> list[Suggested]:
    """The ``budget`` pool rows the acquisition ``score`` (a name in ``ACQUISITIONS``) ranks first."""
    acq = ACQUISITIONS.get(score)
    sig = pool_signals(model, pool, workdir, acq.needs, labelled=labelled, precision=precision,
                       batch_size=batch_size, hide_masks=hide_masks)
    return [Suggested(pool.iloc[i], rank, s, sig.preds[i])
            for rank, (i, s) in enumerate(acq(sig, budget, seed), start=1)]

"""Acquisition scores: which unlabelled images to label next. One registry, :data:`ACQUISITIONS`, is the one
source of their names (``medsam2 suggest --score``, the active-learning benchmark's arms).

Each score is an :class:`Acquisition`: the signals it needs (``pred``: the model's prediction of each pool
image; ``flip``: that prediction's ``flip_agreement`` with its mirror image's, flipped back, from
``predict(agreement=True)``; ``embed``: image embeddings of the pool and of the labelled images) and
``select(signals, budget, seed) -> [(pool index, score), …]``, best first, exactly ``budget`` long. Higher
score = more worth labelling. Per-image scores (every uncertainty) take the top ``budget``; ``kcenter`` is a
set selection; ``random`` a seeded draw.

==========  ==========================================================================================
name        score of an image
==========  ==========================================================================================
pred_iou    1 − SAM's predicted IoU of its mask (clipped to [0, 1])
entropy     mean binary entropy of its foreground probabilities, in bits ([0, 1])
tta_flip    1 − ``flip_agreement``: Dice between the mask and the mask of its mirror image flipped back ([0, 1])
kcenter     k-center greedy (Sener & Savarese 2018) over mean-pooled image embeddings: the distance from
            the image to its nearest centre (labelled images and those already chosen) when it is chosen
random      a seeded uniform draw in [0, 1) (the baseline every score must beat)
==========  ==========================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from medsam2.engine.predict import Prediction
from medsam2.engine.self_training import confidence_score
from medsam2.registry import Registry


@dataclass
class PoolSignals:
    """What the scores read about a pool of N images (each list is N long, in pool order)."""

    preds: list[Prediction]
    """The model's prediction of each image (``prob`` (H,W) float32 in [0,1], ``iou_pred`` in [0,1];
    ``flip_agreement`` in [0,1] when the ``flip`` signal was asked for, else None)."""
    embeddings: np.ndarray | None = None
    """(N,D) float32 mean-pooled image embeddings of the pool; None unless needed."""
    labelled_embeddings: np.ndarray | None = None
    """(M,D) float32 embeddings of the labelled images (k-center's first centres; M may be 0)."""

    def __len__(self) -> int:
        return len(self.preds)


@dataclass(frozen=True)
class Acquisition:
    needs: frozenset[str]
    """Signals beyond ``pred``: a subset of {"flip", "embed"}."""
    select: Callable[[PoolSignals, int, int], list[tuple[int, float]]] = field(repr=False)

    def __call__(self, signals: PoolSignals, budget: int, seed: int = 0) -> list[tuple[int, float]]:
        if not 0 < budget <= len(signals):
            raise ValueError(f"budget {budget} must be in 1..{len(signals)} (the pool size)")
        return self.select(signals, budget, seed)


ACQUISITIONS: Registry = Registry("acquisition score")
"""Name → :class:`Acquisition` (``ACQUISITIONS.get("entropy")(signals, budget)``)."""


def _top(scores: np.ndarray, budget: int) -> list[tuple[int, float]]:
    """Indices of the ``budget`` highest scores (ties: lower index first) with their scores."""
    order = np.lexsort((np.arange(scores.size), -scores))[:budget]
    return [(int(i), float(scores[i])) for i in order]


def per_image(needs: frozenset[str] = frozenset()):
    """Register a per-image score ``fn(signals) -> (N,) float`` as a top-``budget`` acquisition."""

    def deco(fn: Callable[[PoolSignals], np.ndarray]) -> Acquisition:
        return Acquisition(needs, lambda s, budget, seed: _top(np.asarray(fn(s), np.float64), budget))

    return deco


def pred_iou_uncertainty(signals: PoolSignals) -> np.ndarray:
    return np.array([1.0 - confidence_score(p, "pred_iou") for p in signals.preds])


def entropy_uncertainty(signals: PoolSignals) -> np.ndarray:
    return np.array([1.0 - confidence_score(p, "entropy") for p in signals.preds])


def flip_disagreement(signals: PoolSignals) -> np.ndarray:
    if any(p.flip_agreement is None for p in signals.preds):
        raise ValueError("tta_flip needs each prediction's flip_agreement (predict with agreement=True)")
    return np.array([1.0 - float(p.flip_agreement) for p in signals.preds])


ACQUISITIONS.register("pred_iou")(per_image()(pred_iou_uncertainty))
ACQUISITIONS.register("entropy")(per_image()(entropy_uncertainty))
ACQUISITIONS.register("tta_flip")(per_image(frozenset({"flip"}))(flip_disagreement))


def kcenter_greedy(pool: np.ndarray, centres: np.ndarray, budget: int) -> list[tuple[int, float]]:
    """k-center greedy: repeatedly take the pool point (``pool``: (N,D)) farthest (Euclidean) from its nearest
    centre (``centres``: (M,D), M ≥ 0; each chosen point becomes one). Returns ``budget`` (index, distance at
    choice) pairs; with no centres the first choice is the point farthest from the pool mean."""
    x = np.asarray(pool, np.float64)
    c = np.asarray(centres, np.float64).reshape(-1, x.shape[1])
    if len(c):
        nearest = np.sqrt(((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)).min(1)
    else:
        nearest = np.full(len(x), np.inf)
    out: list[tuple[int, float]] = []
    for _ in range(budget):
        if np.isinf(nearest).all():  # no centre yet: the point farthest from the pool mean
            i = int(np.argmax(((x - x.mean(0)) ** 2).sum(1)))
            score = float(np.sqrt(((x[i] - x.mean(0)) ** 2).sum()))
        else:
            i = int(np.argmax(nearest))
            score = float(nearest[i])
        out.append((i, score))
        nearest = np.minimum(nearest, np.sqrt(((x - x[i]) ** 2).sum(1)))
        nearest[i] = -np.inf  # chosen: never again
    return out


def _kcenter(signals: PoolSignals, budget: int, seed: int) -> list[tuple[int, float]]:
    if signals.embeddings is None:
        raise ValueError("kcenter needs the pool's embeddings (signals.embeddings)")
    labelled = signals.labelled_embeddings
    centres = labelled if labelled is not None else np.zeros((0, signals.embeddings.shape[1]), np.float32)
    return kcenter_greedy(signals.embeddings, centres, budget)


def _random(signals: PoolSignals, budget: int, seed: int) -> list[tuple[int, float]]:
    return _top(np.random.default_rng(seed).random(len(signals)), budget)


ACQUISITIONS.register("kcenter")(Acquisition(frozenset({"embed"}), _kcenter))
ACQUISITIONS.register("random")(Acquisition(frozenset(), _random))

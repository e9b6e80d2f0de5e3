"""Bootstrap confidence intervals for per-image metrics (vectorised numpy, seeded, NaN-aware).

Both functions resample *images* (the unit that varies between test sets), not pixels. Percentile bootstrap:
the interval is the ``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled means.

Cluster bootstrap: with ``groups`` (one label per item, e.g. the ``patient_id`` / video sequence of each frame)
the *groups* are resampled with replacement — G draws out of the G groups — and every drawn group brings all its
items. Each resample's statistic is the item mean over the drawn items (sum of the drawn groups' sums divided by
the sum of their sizes), so the point estimate is still the plain item mean. Frames of one video are correlated;
resampling them one by one makes the interval too narrow, resampling whole videos does not. Groups are numbered
in order of first appearance, so with one item per group the draws, and hence the interval, are exactly the
item bootstrap's for the same seed.

NaN handling: NaN values are dropped before resampling (a metric that is undefined for an image does not count
for it); ``paired_bootstrap`` drops a pair if either side is NaN. After dropping, no values at all is an error
(``ValueError``), so a caller never averages nothing by accident. ``n_boot=0`` skips resampling: the mean is
still returned and the interval bounds (and ``p_improve``) are NaN.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# Resample in chunks so that (chunk x n) index matrices stay around this many elements (~32 MB of int64).
_CHUNK_ELEMS = 4_000_000


def _as_clean_1d(values: Iterable[float] | np.ndarray, what: str = "values") -> np.ndarray:
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        raise ValueError(f"bootstrap needs at least one non-NaN value in {what}; got none")
    return arr


def _as_groups(groups: Iterable | np.ndarray | None, n: int) -> np.ndarray | None:
    """``groups`` as an object array of length ``n`` (one label per item), or None."""
    if groups is None:
        return None
    arr = np.asarray(list(groups) if not isinstance(groups, np.ndarray) else groups, dtype=object).reshape(-1)
    if arr.size != n:
        raise ValueError(f"groups needs one label per value; got {arr.size} labels for {n} values")
    return arr


def _group_codes(groups: np.ndarray) -> np.ndarray:
    """Integer code of each item's group, numbered 0..G-1 in order of first appearance; shape (N,)."""
    _, first, inverse = np.unique(groups.astype(str), return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.reshape(-1)]


def _bootstrap_means(values: np.ndarray, n_boot: int, seed: int, codes: np.ndarray | None = None) -> np.ndarray:
    """Means of ``n_boot`` resamples of ``values``; shape (n_boot,), float64.

    Without ``codes`` the N items are resampled (with replacement, N draws). With ``codes`` (shape (N,), group
    numbers 0..G-1) the G groups are resampled (G draws) and each resample's mean is over all drawn items.
    """
    rng = np.random.default_rng(seed)
    if codes is None:
        sums, sizes = values, None
    else:
        n_groups = int(codes.max()) + 1
        sums = np.bincount(codes, weights=values, minlength=n_groups)
        sizes = np.bincount(codes, minlength=n_groups).astype(np.float64)
    n = sums.size
    chunk = max(1, _CHUNK_ELEMS // n)
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = sums[idx].mean(axis=1) if sizes is None else sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)
    return out


def bootstrap_ci(
    values: Iterable[float] | np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Iterable | np.ndarray | None = None,
) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile-bootstrap ``1 - alpha`` confidence interval.

    Args:
        values: 1-D per-item metric values (any float; NaNs dropped). Shape (N,).
        n_boot: number of resamples; 0 returns NaN bounds.
        alpha: two-sided error rate, in (0, 1).
        seed: seed of the resampling generator (same inputs + seed → same interval).
        groups: optional cluster label of each item, shape (N,) (e.g. patient or video id; compared as
            strings). Given, whole groups are resampled (cluster bootstrap, see the module docstring); an item
            whose value is NaN is dropped with its label.

    Returns:
        ``(mean, low, high)`` as Python floats. A single value gives ``(v, v, v)``.

    Raises:
        ValueError: no non-NaN values, ``n_boot < 0``, ``alpha`` outside (0, 1) or ``groups`` of another length.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    raw = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).reshape(-1)
    grp = _as_groups(groups, raw.size)
    arr = _as_clean_1d(raw)
    mean = float(arr.mean())
    if n_boot == 0:
        return mean, float("nan"), float("nan")
    codes = None if grp is None else _group_codes(grp[~np.isnan(raw)])
    means = _bootstrap_means(arr, n_boot, seed, codes)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return mean, float(low), float(high)


def paired_bootstrap(
    a: Iterable[float] | np.ndarray,
    b: Iterable[float] | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: Iterable | np.ndarray | None = None,
) -> dict[str, float]:
    """Paired bootstrap of the mean difference ``b - a`` over the same items (``b`` is the challenger).

    Args:
        a: baseline / champion per-item values, shape (N,).
        b: challenger per-item values on the same items in the same order, shape (N,).
        n_boot: number of resamples of the N pairs; 0 gives NaN bounds and NaN ``p_improve``.
        seed: resampling seed.
        alpha: two-sided error rate of the interval.
        groups: optional cluster label of each pair, shape (N,) (e.g. ``patient_id``). Given, whole groups of
            pairs are resampled (cluster bootstrap); pairs dropped for a NaN take their label with them.

    Returns:
        ``{"mean_diff", "ci_low", "ci_high", "p_improve", "n"}``: mean of ``b - a``, its interval, the
        fraction of resamples whose mean difference is > 0 (a bootstrap estimate of P(challenger better)),
        and the number of pairs used (pairs with a NaN on either side are dropped).

    Raises:
        ValueError: lengths differ (of ``a``, ``b`` or ``groups``), or no complete pair remains.
    """
    a_arr = np.asarray(list(a) if not isinstance(a, np.ndarray) else a, dtype=np.float64).reshape(-1)
    b_arr = np.asarray(list(b) if not isinstance(b, np.ndarray) else b, dtype=np.float64).reshape(-1)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired_bootstrap needs equally long a and b; got {a_arr.size} and {b_arr.size}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    grp = _as_groups(groups, a_arr.size)
    all_diff = b_arr - a_arr  # NaN where either side is NaN (or both are the same infinity)
    keep = ~np.isnan(all_diff)
    diff = _as_clean_1d(all_diff[keep], what="paired differences")
    mean = float(diff.mean())
    if n_boot == 0:
        nan = float("nan")
        return {"mean_diff": mean, "ci_low": nan, "ci_high": nan, "p_improve": nan, "n": int(diff.size)}
    means = _bootstrap_means(diff, n_boot, seed, None if grp is None else _group_codes(grp[keep]))
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {
        "mean_diff": mean,
        "ci_low": float(low),
        "ci_high": float(high),
        "p_improve": float(np.mean(means > 0)),
        "n": int(diff.size),
    }

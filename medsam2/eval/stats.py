"""Bootstrap confidence intervals for per-image metrics (vectorised numpy, seeded, NaN-aware).

Both functions resample *images* (the unit that varies between test sets), not pixels. Percentile bootstrap:
the interval is the ``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled means.

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


def _bootstrap_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement, same size) of ``values``; shape (n_boot,), float64."""
    n = values.size
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMS // n)
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[idx].mean(axis=1)
    return out


def bootstrap_ci(
    values: Iterable[float] | np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile-bootstrap ``1 - alpha`` confidence interval.

    Args:
        values: 1-D per-item metric values (any float; NaNs dropped). Shape (N,).
        n_boot: number of resamples; 0 returns NaN bounds.
        alpha: two-sided error rate, in (0, 1).
        seed: seed of the resampling generator (same inputs + seed → same interval).

    Returns:
        ``(mean, low, high)`` as Python floats. A single value gives ``(v, v, v)``.

    Raises:
        ValueError: no non-NaN values, ``n_boot < 0`` or ``alpha`` outside (0, 1).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    arr = _as_clean_1d(values)
    mean = float(arr.mean())
    if n_boot == 0:
        return mean, float("nan"), float("nan")
    means = _bootstrap_means(arr, n_boot, seed)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return mean, float(low), float(high)


def paired_bootstrap(
    a: Iterable[float] | np.ndarray,
    b: Iterable[float] | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Paired bootstrap of the mean difference ``b - a`` over the same items (``b`` is the challenger).

    Args:
        a: baseline / champion per-item values, shape (N,).
        b: challenger per-item values on the same items in the same order, shape (N,).
        n_boot: number of resamples of the N pairs; 0 gives NaN bounds and NaN ``p_improve``.
        seed: resampling seed.
        alpha: two-sided error rate of the interval.

    Returns:
        ``{"mean_diff", "ci_low", "ci_high", "p_improve", "n"}``: mean of ``b - a``, its interval, the
        fraction of resamples whose mean difference is > 0 (a bootstrap estimate of P(challenger better)),
        and the number of pairs used (pairs with a NaN on either side are dropped).

    Raises:
        ValueError: lengths differ, or no complete pair remains.
    """
    a_arr = np.asarray(list(a) if not isinstance(a, np.ndarray) else a, dtype=np.float64).reshape(-1)
    b_arr = np.asarray(list(b) if not isinstance(b, np.ndarray) else b, dtype=np.float64).reshape(-1)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired_bootstrap needs equally long a and b; got {a_arr.size} and {b_arr.size}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    keep = ~(np.isnan(a_arr) | np.isnan(b_arr))
    diff = _as_clean_1d(b_arr[keep] - a_arr[keep], what="paired differences")
    mean = float(diff.mean())
    if n_boot == 0:
        nan = float("nan")
        return {"mean_diff": mean, "ci_low": nan, "ci_high": nan, "p_improve": nan, "n": int(diff.size)}
    means = _bootstrap_means(diff, n_boot, seed)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {
        "mean_diff": mean,
        "ci_low": float(low),
        "ci_high": float(high),
        "p_improve": float(np.mean(means > 0)),
        "n": int(diff.size),
    }

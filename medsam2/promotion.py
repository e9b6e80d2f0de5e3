"""The promotion gate: does a candidate beat its trivial baseline and the champion on the selection split?

Pure (no MLflow): takes per-image results (the DataFrame ``medsam2.engine.evaluate`` writes: columns
``image_id, patient_id, split, pixel_sha256, mask_pixel_sha256, method, condition, <metric>, …``) and returns a
decision with its reasons. ``tracking.promote`` applies the decision to the registry. Rules, all of which must
hold to promote:

1. Decisions are made on ``promotion.selection_split`` (default ``val``: labelled, not test). Results holding a
   row of the frozen ``test`` split, or of any other split, or without a ``split`` column, are refused
   (``ValueError``): the test split is reported beside the decision, never decided on.
2. The candidate beats the trivial baseline of its prompt mode (:func:`baseline_methods`, from
   ``eval.baselines.PROMPT_BASELINES``: the better of ``ellipse_in_box`` and ``fill_box`` on the decision set for
   box prompts; the better of ``empty`` and ``mean_mask`` for ``points``/``none``):
   paired mean improvement of ``promotion.metric`` > 0 and, when ``promotion.n_bootstrap`` > 0, the paired
   bootstrap's P(improvement > 0) ≥ ``promotion.confidence`` (default 0.95). This holds for the first model too.
3. If there is a champion, both were evaluated on the identical image set and mask versions (the same set of
   ``(image_id, pixel_sha256, mask_pixel_sha256)``; the caller re-evaluates the champion otherwise), and the
   candidate beats it: paired mean improvement ≥ ``promotion.margin`` and > 0 (a tie never replaces the
   champion), and P(improvement > 0) ≥ ``promotion.confidence``.
4. Each guarded metric (``promotion.guarded``: name → tolerance) regresses against the champion by at most its
   tolerance. A guarded metric is a per-image column (``hd95``: lower is better, see ``LOWER_IS_BETTER``) or a
   run-level number (e.g. ``robust_drop_s3_max``) passed in ``*_summary``.

Bootstraps resample whole groups of images (``patient_id``: a CVC-ClinicDB video sequence, a patient; an image
without one is its own group) and are seeded by ``promotion.seed``.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from medsam2.config import PromotionCfg
from medsam2.eval.baselines import PROMPT_BASELINES
from medsam2.eval.stats import paired_bootstrap

LOWER_IS_BETTER = {"hd95"}
LOWER_IS_BETTER_PREFIXES = ("robust_drop",)
IDENTITY_KEY = ("image_id", "pixel_sha256", "mask_pixel_sha256")
"""What makes two per-image results comparable: the same image id, image pixels and mask pixels."""

BASELINE_LABELS = {"ellipse_in_box": "box-prior baseline", "fill_box": "filled-box baseline",
                   "empty": "empty-mask baseline", "mean_mask": "mean-mask baseline"}
_METRIC_LABELS = {"dice": "Dice", "iou": "IoU", "hd95": "HD95"}


def baseline_methods(prompt: str) -> tuple[str, ...]:
    """The trivial baseline methods a model with prompt mode ``prompt`` (``box|points|none``) must beat."""
    try:  # the evaluation computes exactly these rows; with several, the better on the decision set counts
        return PROMPT_BASELINES[prompt]
    except KeyError:
        raise ValueError(f"no trivial baseline is defined for prompt mode {prompt!r} "
                         f"(known: {sorted(PROMPT_BASELINES)})") from None


@dataclass
class GateDecision:
    promote: bool
    reasons: list[str]
    stats: dict[str, float | int | str] = field(default_factory=dict)
    summary: str = ""
    """One line: the first failed test of a rejection, or what the promoted model beat."""

    def to_dict(self) -> dict:
        return asdict(self)


def _model_clean(df: pd.DataFrame) -> pd.DataFrame:
    """Clean-condition rows of the model (``method == "model"``), one per image, in ``image_id`` order."""
    if "method" in df.columns:
        df = df[df["method"] == "model"]
    return _clean(df)


def _clean(df: pd.DataFrame) -> pd.DataFrame:
    if "condition" in df.columns:
        df = df[df["condition"] == "clean"]
    return df.drop_duplicates("image_id").set_index("image_id").sort_index()


def _lower_better(name: str) -> bool:
    return name in LOWER_IS_BETTER or name.startswith(LOWER_IS_BETTER_PREFIXES)


def check_decision_rows(df: pd.DataFrame, cfg: PromotionCfg, who: str = "challenger") -> None:
    """Raise ``ValueError`` unless every row of ``df`` is of the selection split (never the frozen test split)."""
    if "split" not in df.columns:
        raise ValueError(f"{who} per-image results have no 'split' column: the gate cannot tell them from the "
                         f"frozen test split and decides on '{cfg.selection_split}' results only")
    splits = set(df["split"].fillna("").astype(str))
    if "test" in splits:
        raise ValueError(f"{who} per-image results hold rows of the frozen test split: the gate never decides on "
                         f"test results (it decides on '{cfg.selection_split}')")
    other = sorted(splits - {cfg.selection_split})
    if other:
        raise ValueError(f"{who} per-image results hold rows of split(s) {other}: the gate decides on "
                         f"'{cfg.selection_split}' only")


def result_identity(df: pd.DataFrame | None) -> frozenset[tuple[str, str, str]] | None:
    """The set of ``(image_id, pixel_sha256, mask_pixel_sha256)`` of the clean model rows; None if the results
    are missing or lack a hash column (results written before hashes existed cannot be matched)."""
    if df is None or any(c not in df.columns for c in IDENTITY_KEY):
        return None
    rows = _model_clean(df).reset_index()[list(IDENTITY_KEY)].fillna("").astype(str)
    return frozenset(map(tuple, rows.to_numpy().tolist()))


def identity_complete(identity: frozenset | None) -> bool:
    """True when every image of ``identity`` has both hashes (only then can stored results be trusted)."""
    return bool(identity) and all(p and m for _, p, m in identity)


def identity_digest(identity: frozenset | None) -> str:
    """Short sha256 of an identity set (a version tag: which images and masks the decision was made on)."""
    if identity is None:
        return "unknown"
    text = "\n".join("\t".join(t) for t in sorted(identity))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _metric_label(metric: str) -> str:
    return _METRIC_LABELS.get(metric, metric)


def _groups(rows: pd.DataFrame) -> np.ndarray | None:
    """Cluster ids for the bootstrap (``patient_id``; an image without one is its own cluster)."""
    if "patient_id" not in rows.columns:
        return None
    pid = rows["patient_id"].fillna("").astype(str)
    ids = rows.index.to_series().astype(str)
    return np.where(pid.to_numpy() != "", pid.to_numpy(), ("image:" + ids).to_numpy())


def _bootstrap(old: np.ndarray, new: np.ndarray, groups: np.ndarray | None, cfg: PromotionCfg) -> dict:
    # cluster bootstrap: the frames of one video sequence / the images of one patient are resampled together
    return paired_bootstrap(old, new, n_boot=cfg.n_bootstrap, seed=cfg.seed, groups=groups)


def _compare(old: pd.Series, new: pd.Series, groups, cfg: PromotionCfg, label: str,
             margin: float) -> tuple[bool, str, dict]:
    """Paired test of challenger ``new`` against ``old`` (same index): (passed, reason, bootstrap stats)."""
    sign = -1.0 if _lower_better(cfg.metric) else 1.0  # improvement is always reported as a positive number
    boot = _bootstrap(sign * old.to_numpy(float), sign * new.to_numpy(float), groups, cfg)
    diff, p = float(boot["mean_diff"]), float(boot["p_improve"])
    m = _metric_label(cfg.metric)
    confident = cfg.n_bootstrap > 0 and cfg.confidence > 0
    p_txt = f"P(improvement)={p:.3f}"
    if diff < 0:
        return False, f"below {label} by {-diff:.3f} {m}" + (f", {p_txt}" if confident else ""), boot
    if diff == 0:
        return False, f"no better than {label} (mean {m} difference 0)", boot
    if diff < margin:
        return False, f"beats {label} by only {diff:+.3f} {m}, below the margin {margin:+.3f}", boot
    if confident and not p >= cfg.confidence:
        return False, f"beats {label} by only {diff:+.3f} {m}, {p_txt} < {cfg.confidence:g}", boot
    txt = f"beats {label} by {diff:+.3f} {m}"
    txt += f", {p_txt} ≥ {cfg.confidence:g}" if confident else " (confidence test off)"
    if margin > 0:
        txt += f", margin {margin:+.3f}"
    return True, txt, boot


def _boot_stats(prefix: str, boot: dict) -> dict[str, float]:
    return {f"{prefix}mean_diff": float(boot["mean_diff"]), f"{prefix}ci_low": float(boot["ci_low"]),
            f"{prefix}ci_high": float(boot["ci_high"]), f"{prefix}p_improve": float(boot["p_improve"])}


def _pick_baseline(challenger: pd.DataFrame, new: pd.DataFrame, prompt: str, metric: str):
    """(method, aligned clean rows) of the better trivial baseline on the challenger's images, or (None, reason)."""
    names = baseline_methods(prompt)
    have = {}
    if "method" in challenger.columns:
        for name in names:
            rows = _clean(challenger[challenger["method"] == name])
            if new.index.isin(rows.index).all() and len(rows):
                have[name] = rows.loc[new.index]
    if not have:
        return None, (f"no {' / '.join(names)} baseline results on the challenger's images: cannot show that "
                      f"the {prompt!r}-prompt model beats its trivial baseline")
    lower = _lower_better(metric)
    best = sorted(have, key=lambda n: have[n][metric].mean() * (1 if lower else -1))[0]
    return best, have[best]


def decide(
    challenger: pd.DataFrame,
    champion: pd.DataFrame | None,
    cfg: PromotionCfg,
    *,
    prompt: str,
    champion_name: str = "the champion",
    challenger_summary: dict[str, float] | None = None,
    champion_summary: dict[str, float] | None = None,
) -> GateDecision:
    """Gate a challenger on its selection-split per-image results (rules in the module docstring).

    Args:
        challenger: the candidate's per-image results: model rows and its baseline rows (``method``).
        champion: the champion's per-image results on the same images and masks, or None (no champion).
        cfg: the promotion settings.
        prompt: the candidate's prompt mode, which decides its trivial baseline (:func:`baseline_methods`).
        champion_name: how reasons name the champion (``"champion v3"``).

    Raises:
        ValueError: a row of either table is not of ``cfg.selection_split`` (e.g. the frozen test split).
    """
    check_decision_rows(challenger, cfg, "challenger")
    if champion is not None:
        check_decision_rows(champion, cfg, "champion")
    metric, m = cfg.metric, _metric_label(cfg.metric)
    new = _model_clean(challenger)
    if new.empty:
        return GateDecision(False, ["challenger has no selection results"], summary="challenger has no results")
    stats: dict[str, float | int | str] = {f"challenger_{metric}": float(new[metric].mean()),
                                           "n_images": int(len(new)), "selection_split": cfg.selection_split}
    groups = _groups(new)
    if groups is not None:
        stats["n_groups"] = int(len(set(groups)))
    reasons: list[str] = []
    failed: list[str] = []
    passed: list[str] = []

    def record(ok: bool, reason: str) -> None:
        reasons.append(reason)
        (passed if ok else failed).append(reason)

    base_name, base = _pick_baseline(challenger, new, prompt, metric)
    if base_name is None:
        record(False, base)
    else:
        label = f"the {BASELINE_LABELS.get(base_name, 'trivial baseline')} ({base_name})"
        ok, reason, boot = _compare(base[metric], new[metric], groups, cfg, label, margin=0.0)
        stats.update({"baseline_method": base_name, f"baseline_{metric}": float(base[metric].mean()),
                      **_boot_stats("baseline_", boot)})
        record(ok, reason)

    if champion is None:
        reasons.append("no champion yet: only the baseline test applies")
    else:
        old = _model_clean(champion)
        if result_identity(challenger) != result_identity(champion) or not old.index.equals(new.index):
            record(False, f"{champion_name} was not evaluated on the same {cfg.selection_split} images and mask "
                          "versions (image_id, pixel_sha256, mask_pixel_sha256): re-evaluate it on the "
                          "challenger's set")
        else:
            ok, reason, boot = _compare(old[metric], new[metric], groups, cfg, champion_name, margin=cfg.margin)
            stats.update({f"champion_{metric}": float(old[metric].mean()), **_boot_stats("", boot)})
            record(ok, reason)
            for name, tol in cfg.guarded.items():
                if name in new.columns and name in old.columns:
                    a, b = float(old[name].mean()), float(new[name].mean())
                elif challenger_summary and champion_summary and name in challenger_summary \
                        and name in champion_summary:
                    a, b = float(champion_summary[name]), float(challenger_summary[name])
                else:
                    record(False, f"guarded metric {name!r} is missing from the selection results")
                    continue
                regression = (b - a) if _lower_better(name) else (a - b)
                stats[f"guard_{name}_regression"] = regression
                if regression > tol:
                    record(False, f"guarded {name} regressed by {regression:.4f} > tolerance {tol:.4f}")
                else:
                    record(True, f"guarded {name} within tolerance ({regression:+.4f} ≤ {tol:.4f})")
    ok = not failed
    summary = "; ".join(passed) if ok else failed[0]
    stats["metric"] = m
    return GateDecision(ok, reasons, stats, summary)

"""The promotion gate: is a challenger better than the champion on the same frozen evaluation set?

Pure (no MLflow): takes per-image results and returns a decision with its reasons. ``tracking.promote`` applies
the decision to the registry. Rules, all of which must hold to promote:

1. Both were evaluated on the same images (the caller re-evaluates the champion when its stored results do
   not cover the challenger's evaluation set).
2. Paired mean improvement of ``promotion.metric`` (challenger − champion, per image) ≥ ``promotion.margin``
   and > 0 (a tie never replaces the champion).
3. If ``promotion.confidence`` > 0: the paired bootstrap's P(improvement > 0) ≥ that confidence.
4. Each guarded metric (``promotion.guarded``: name → tolerance) regresses by at most its tolerance. A guarded
   metric is a per-image column (e.g. ``hd95`` where lower is better is handled by ``LOWER_IS_BETTER``) or a
   run-level number (e.g. ``robust_drop_s3_max``) passed in ``*_summary``.
No champion → the challenger is promoted (first model).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pandas as pd

from medsam2.config import PromotionCfg
from medsam2.eval.stats import paired_bootstrap

LOWER_IS_BETTER = {"hd95"}
LOWER_IS_BETTER_PREFIXES = ("robust_drop",)


@dataclass
class GateDecision:
    promote: bool
    reasons: list[str]
    stats: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _model_clean(df: pd.DataFrame) -> pd.DataFrame:
    if "method" in df.columns:
        df = df[df["method"] == "model"]
    if "condition" in df.columns:
        df = df[df["condition"] == "clean"]
    return df.drop_duplicates("image_id").set_index("image_id")


def _lower_better(name: str) -> bool:
    return name in LOWER_IS_BETTER or name.startswith(LOWER_IS_BETTER_PREFIXES)


def decide(
    challenger: pd.DataFrame,
    champion: pd.DataFrame | None,
    cfg: PromotionCfg,
    *,
    challenger_summary: dict[str, float] | None = None,
    champion_summary: dict[str, float] | None = None,
) -> GateDecision:
    """Compare per-image results (columns image_id, the metric, guarded metrics; optional method/condition)."""
    new = _model_clean(challenger)
    if new.empty:
        return GateDecision(False, ["challenger has no evaluation results"])
    if champion is None:
        return GateDecision(True, ["no champion yet: first model is promoted"],
                            {f"challenger_{cfg.metric}": float(new[cfg.metric].mean())})
    old = _model_clean(champion)
    missing = new.index.difference(old.index)
    if len(missing):
        return GateDecision(False, [f"champion has no results for {len(missing)} of the challenger's images: "
                                    "re-evaluate it on the same set"])
    old = old.loc[new.index]
    boot = paired_bootstrap(old[cfg.metric].to_numpy(float), new[cfg.metric].to_numpy(float),
                            n_boot=max(cfg.n_bootstrap, 1))
    stats = {
        f"challenger_{cfg.metric}": float(new[cfg.metric].mean()),
        f"champion_{cfg.metric}": float(old[cfg.metric].mean()),
        "mean_diff": float(boot["mean_diff"]), "ci_low": float(boot["ci_low"]), "ci_high": float(boot["ci_high"]),
        "p_improve": float(boot["p_improve"]), "n_images": int(len(new)),
    }
    reasons, ok = [], True
    diff = float(boot["mean_diff"])
    if diff < cfg.margin or diff <= 0:  # "better" is strict even with a zero margin
        ok = False
        reasons.append(f"{cfg.metric} improvement {diff:+.4f} is not above the margin {cfg.margin:+.4f}")
    else:
        reasons.append(f"{cfg.metric} improvement {diff:+.4f} ≥ margin {cfg.margin:+.4f}")
    if cfg.confidence > 0:
        if boot["p_improve"] < cfg.confidence:
            ok = False
            reasons.append(f"P(improvement) {boot['p_improve']:.3f} < required {cfg.confidence:.3f}")
        else:
            reasons.append(f"P(improvement) {boot['p_improve']:.3f} ≥ {cfg.confidence:.3f}")
    for name, tol in cfg.guarded.items():
        if name in new.columns:
            a, b = float(old[name].mean()), float(new[name].mean())
        elif challenger_summary and champion_summary and name in challenger_summary and name in champion_summary:
            a, b = float(champion_summary[name]), float(challenger_summary[name])
        else:
            ok = False
            reasons.append(f"guarded metric {name!r} is missing from the results")
            continue
        regression = (b - a) if _lower_better(name) else (a - b)
        stats[f"guard_{name}_regression"] = regression
        if regression > tol:
            ok = False
            reasons.append(f"guarded {name} regressed by {regression:.4f} > tolerance {tol:.4f}")
        else:
            reasons.append(f"guarded {name} within tolerance ({regression:+.4f} ≤ {tol:.4f})")
    return GateDecision(ok, reasons, stats)

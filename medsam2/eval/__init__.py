"""Evaluation toolkit: statistics, trivial baselines, robustness suite, leakage check and HTML/JSON reports.

Modules (import what you need; ``report`` pulls in matplotlib, so it is not imported here):

- :mod:`medsam2.eval.stats` — ``bootstrap_ci``, ``paired_bootstrap``.
- :mod:`medsam2.eval.baselines` — ``mask_to_box``, ``ellipse_in_box``, ``fill_box`` (box-prompt floors).
- :mod:`medsam2.eval.robustness` — ``CORRUPTIONS``, ``apply_corruption``, ``severity_drop``.
- :mod:`medsam2.eval.leakage` — ``find_leaks`` (sha256 + perceptual-hash duplicates across splits).
- :mod:`medsam2.eval.calibration` — ``fit_isotonic``, ``assess`` (failure flags: calibrated confidence, ECE,
  precision/recall of "needs review").
- :mod:`medsam2.eval.report` — ``write_report``.

Per-image metrics live in :mod:`medsam2.metrics`.
"""

from medsam2.eval.baselines import ellipse_in_box, fill_box, mask_to_box
from medsam2.eval.stats import bootstrap_ci, paired_bootstrap

__all__ = ["bootstrap_ci", "ellipse_in_box", "fill_box", "mask_to_box", "paired_bootstrap"]

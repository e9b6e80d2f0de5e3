"""Label efficiency on Kvasir-SEG: test Dice vs the fraction of labelled training images, per method.

Training images are Kvasir's ``split_other`` + ``split_pool`` (the ingest puts the PraNet test split in the
frozen ``test`` split and a patient-bucketed 10 % in ``val``; neither is ever trained on). At each label
fraction (``data.label_fraction``: a deterministic subset keeps its masks, the rest becomes the unlabelled
pool) every method trains for the same number of steps:

- ``none`` (supervised only), ``mean_teacher``, ``mutual_consistency``, ``adversarial`` (``semisup.method``);
- ``self_training``: the supervised model of that fraction is the teacher; ``--st-rounds`` val-gated rounds of
  pseudo-labelling + a fresh student with the same step budget (the teacher's steps come on top).

At 100 % there is no pool, so only ``none`` runs (the others would be identical). Every model is evaluated on
the PraNet test split at original resolution (``engine.evaluate``). Prints one JSON object (device, torch
version, config, table) on its last stdout line and writes ``label_efficiency.json`` +
``label_efficiency.png`` (Dice vs label fraction) to ``--out``.

    python benchmarks/label_efficiency.py --quick      # CPU smoke: 64 px, 1 step, a handful of images
    python benchmarks/label_efficiency.py              # one H100, sized for < 12 min (hiera_t @256)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("none", "mean_teacher", "mutual_consistency", "adversarial", "self_training")
FULL = {"fractions": (0.1, 0.25, 0.5, 1.0), "image_size": 256, "steps": 300, "batch": 16, "st_rounds": 1}
QUICK = {"fractions": (0.5,), "image_size": 64, "steps": 1, "batch": 2, "st_rounds": 1}


def kvasir_source(data: str | None) -> Path:
    root = Path(data or os.environ.get("MEDSAM2_SAMPLE_DATA", "/work/shared/data"))
    src = root / "kvasir-seg" if (root / "kvasir-seg").is_dir() else root
    if not (src / "images").is_dir():
        raise SystemExit(f"Kvasir-SEG not found under {root}: pass --data or set MEDSAM2_SAMPLE_DATA")
    return src


def quick_subset(src: Path, dest: Path, n_train: int = 6, n_val: int = 2, n_test: int = 2) -> Path:
    """A few Kvasir pairs: train/val stems by their patient split bucket, test stems from the PraNet list."""
    from medsam2.data.splits import DEFAULT_VAL_FRACTION, split_bucket

    names = (src / "split_other.txt").read_text().split()
    cut = round(DEFAULT_VAL_FRACTION * 1000)
    val = [s for s in names if split_bucket(f"kvasir-seg:{s}") < cut][:n_val]
    train = [s for s in names if split_bucket(f"kvasir-seg:{s}") >= cut][:n_train]
    test = (src / "split_pranet_test.txt").read_text().split()[:n_test]
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "masks").mkdir(exist_ok=True)
    for stem in train + val + test:
        shutil.copy(src / "images" / f"{stem}.jpg", dest / "images")
        shutil.copy(src / "masks" / f"{stem}.jpg", dest / "masks")
    (dest / "split_pranet_test.txt").write_text("\n".join(test) + "\n")
    return dest


def base_overrides(workdir: Path, plan: dict, quick: bool) -> list[str]:
    o = [
        f"data.workdir={workdir}",
        "data.train_datasets=[kvasir-seg]",
        "model.backbone=hiera_t",
        f"model.image_size={plan['image_size']}",
        f"train.max_steps={plan['steps']}",
        f"train.batch_size={plan['batch']}",
        "train.progress=false",
        "eval.gallery_size=0",
        f"train.eval_every={plan['steps']}",
        f"train.checkpoint_every={plan['steps']}",
        f"train.warmup_steps={0 if quick else 20}",
    ]
    if quick:
        o += ["data.augment=none", "model.adapter=decoder_only", "eval.batch_size=4"]
    else:
        o += ["data.num_workers=4", "eval.batch_size=32"]
    return o


def run_one(
    overrides: list[str], out: Path, method: str, fraction: float, st_rounds: int, teacher=None
) -> dict:
    """Train (or self-train from ``teacher``) and evaluate on the test split → one table row."""
    from medsam2.config import load_config
    from medsam2.engine.checkpoint import load_model
    from medsam2.engine.evaluate import evaluate
    from medsam2.engine.train import train
    from medsam2.semisup.self_training import best_checkpoint, run_self_training

    tag = f"{method}_f{fraction:g}"
    sem = "none" if method == "self_training" else method
    cfg = load_config(
        overrides=[
            *overrides,
            f"data.label_fraction={fraction}",
            f"semisup.method={sem}",
            f"train.output_dir={out / 'runs' / tag}",
        ]
    )
    t0 = time.perf_counter()
    row: dict = {"method": method, "fraction": fraction}
    if method == "self_training":
        rounds = run_self_training(cfg, st_rounds, teacher, work_root=out / "runs" / tag)
        ckpt = best_checkpoint(rounds, teacher)
        row["rounds"] = [
            {
                "round": r.round,
                "val_dice": r.val_dice,
                "improved": r.improved,
                "acceptance_rate": r.pseudo["acceptance_rate"],
                "pseudo_dice": r.pseudo["pseudo_dice"],
            }
            for r in rounds
        ]
        row["steps"] = sum(r.train["steps"] for r in rounds)
    else:
        res = train(cfg)
        ckpt, row["steps"] = res.checkpoint, res.steps
        row["images_per_s"] = res.images_per_s
    row["train_s"] = time.perf_counter() - t0
    model, _ = load_model(ckpt, "cuda" if torch.cuda.is_available() else "cpu")
    ev = evaluate(model, cfg, out / "eval" / tag, title=f"label efficiency: {tag}")
    m = ev.metrics
    row.update(
        test_dice=m.get("test_dice"),
        test_dice_ci_low=m.get("test_dice_ci_low"),
        test_dice_ci_high=m.get("test_dice_ci_high"),
        test_iou=m.get("test_iou"),
        baseline_ellipse_in_box_dice=m.get("baseline_ellipse_in_box_dice"),
        checkpoint=ckpt,
        n_test=ev.n_images,
    )
    del model
    return row


def _finite(x):
    """NaN/inf → None, recursively, so the printed JSON is standard."""
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        rows = sorted([r for r in table if r["method"] == method], key=lambda r: r["fraction"])
        if rows:
            ax.plot([100 * r["fraction"] for r in rows], [r["test_dice"] for r in rows], "o-", label=method)
    base = [
        r["baseline_ellipse_in_box_dice"] for r in table if r.get("baseline_ellipse_in_box_dice") is not None
    ]
    if base:
        ax.axhline(base[0], ls="--", c="grey", lw=1, label="ellipse-in-box")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images (%)")
    ax.set_ylabel("Dice, PraNet test split")
    ax.set_title("Kvasir-SEG label efficiency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="tiny CPU smoke (64 px, 1 step, a handful of images)"
    )
    ap.add_argument("--data", help="folder holding kvasir-seg/ (default $MEDSAM2_SAMPLE_DATA or shared data)")
    ap.add_argument(
        "--out", help="output folder (default: a temp dir for --quick, else benchmarks/results/...)"
    )
    ap.add_argument("--fractions", type=float, nargs="+")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--st-rounds", type=int)
    args = ap.parse_args(argv)

    import logging

    logging.getLogger("medsam2").setLevel(logging.WARNING)
    from medsam2.data.ingest import ingest

    plan = dict(QUICK if args.quick else FULL)
    for k, v in (("fractions", args.fractions), ("steps", args.steps), ("st_rounds", args.st_rounds)):
        if v is not None:
            plan[k] = tuple(v) if k == "fractions" else v
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(
        args.out
        or (
            tempfile.mkdtemp(prefix="label_eff_")
            if args.quick
            else Path(__file__).parent / "results" / f"label_efficiency_{stamp}"
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = kvasir_source(args.data)
    if args.quick:
        src = quick_subset(src, out / "src" / "kvasir-seg")
    ingest(str(src), out / "work", dataset="kvasir-seg")
    overrides = base_overrides(out / "work", plan, args.quick)
    table: list[dict] = []
    for fraction in plan["fractions"]:
        teacher = None
        for method in args.methods:
            if fraction >= 1.0 and method != "none":
                continue  # no unlabelled pool: identical to supervised
            if method == "self_training":
                if teacher is None:
                    teacher = run_one(overrides, out, "none", fraction, 0)["checkpoint"]
                table.append(run_one(overrides, out, method, fraction, plan["st_rounds"], teacher))
                continue
            row = run_one(overrides, out, method, fraction, 0)
            teacher = row["checkpoint"] if method == "none" else teacher
            table.append(row)
            print(
                json.dumps({k: row[k] for k in ("method", "fraction", "test_dice", "train_s")}),
                file=sys.stderr,
            )
    full = {r["method"]: r["test_dice"] for r in table if r["fraction"] >= 1.0}
    for r in table:
        if "none" in full and full["none"]:
            r["relative_to_full_labels"] = r["test_dice"] / full["none"]
    plot(table, out / "label_efficiency.png")
    result = {
        "benchmark": "label_efficiency",
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.processor()})",
        "torch": torch.__version__,
        "mode": "quick" if args.quick else "full",
        "config": {
            **plan,
            "fractions": list(plan["fractions"]),
            "overrides": overrides,
            "methods": args.methods,
        },
        "table": [{k: v for k, v in r.items() if k != "checkpoint"} for r in table],
        "plot": str(out / "label_efficiency.png"),
        "wall_s": time.perf_counter() - t0,
    }
    result = _finite(result)
    (out / "label_efficiency.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

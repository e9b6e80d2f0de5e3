"""Quality run (issue 8): box-prompted and prompt-free SAM2.1 hiera-t from random init, a fixed wall-clock
budget of training each on Kvasir's non-test images, evaluated on the frozen PraNet split (with the corruption
suite) and on CVC-ClinicDB as an external set. Prints one JSON object; ``--out`` writes it.

    python benchmarks/quality.py --data ../shared/data --out benchmarks/results/quality-h100.json   # one H100
    python benchmarks/quality.py --quick                                                            # CPU smoke

Goals (BENCHMARKS.md): box-prompted Dice ≥ 0.90 (ellipse-in-box baseline 0.805), prompt-free ≥ 0.80,
cross-dataset drop to CVC ≤ 0.05, severity-3 corruption drop ≤ 0.05. The library's own ``train`` and
``evaluate`` are used unchanged (no MLflow/Prefect), so these numbers are what the platform delivers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common as bench
import numpy as np

GOALS = {"box_dice": 0.90, "prompt_free_dice": 0.80, "cross_dataset_drop": 0.05, "severity3_drop": 0.05}
# box: the box also enters as a dense mask prompt (model.box_mask), which random-init SAM2 learns from far sooner:
# on 2 CPU cores, 150 steps at 128 px reached val Dice 0.854 with it vs 0.436 without (same seed and data).
MODES = {"box": {"prompt": "box", "decoder": "sam2", "box_mask": True},
         "prompt_free": {"prompt": "none", "decoder": "prompt_free"}}


def prepare_workdir(data: Path, dest: Path, quick: bool) -> Path:
    """Ingest Kvasir-SEG (frozen PraNet test split honoured) and CVC-ClinicDB (external) into ``dest``."""
    from medsam2.data.ingest import ingest

    if quick:  # a handful of images: 6 train/val + 3 test from Kvasir, 4 from CVC
        import shutil

        from medsam2.data.splits import DEFAULT_VAL_FRACTION, split_bucket

        k = data / "kvasir-seg"
        test = (k / "split_pranet_test.txt").read_text().split()[:3]
        other = [s for s in (k / "split_other.txt").read_text().split()
                 if split_bucket(f"kvasir-seg:{s}") >= round(DEFAULT_VAL_FRACTION * 1000)][:6]
        cvc = sorted(p.stem for p in (data / "cvc-clinicdb" / "images").glob("*.png"))[:4]
        for name, stems, ext in (("kvasir-seg", test + other, ".jpg"), ("cvc-clinicdb", cvc, ".png")):
            src = data / name
            for sub in ("images", "masks"):
                (dest / "src" / name / sub).mkdir(parents=True, exist_ok=True)
                for s in stems:
                    shutil.copy(src / sub / f"{s}{ext}", dest / "src" / name / sub / f"{s}{ext}")
        (dest / "src" / "kvasir-seg" / "split_pranet_test.txt").write_text("\n".join(test) + "\n")
        data = dest / "src"
    for name in ("kvasir-seg", "cvc-clinicdb"):
        ingest(str(data / name), dest / "work")
    return dest / "work"


def run_mode(mode: str, workdir: Path, out: Path, args) -> dict:
    from medsam2.config import ExperimentCfg
    from medsam2.data.selection import cross_dataset_rows
    from medsam2.engine.checkpoint import load_model
    from medsam2.engine.evaluate import evaluate, flat_metrics
    from medsam2.engine.runtime import pick_device
    from medsam2.engine.train import train

    cfg = ExperimentCfg.model_validate({
        "name": f"quality-{mode}",
        "data": {"workdir": str(workdir), "train_datasets": ["kvasir-seg"], "eval_datasets": ["kvasir-seg"],
                 "augment": "light", "num_workers": args.workers},
        "model": {"backbone": "hiera_t", "image_size": args.image_size, "checkpoint": "none", "adapter": "full",
                  **MODES[mode]},
        "train": {"max_steps": args.max_steps, "max_minutes": args.minutes, "batch_size": args.batch,
                  "lr": args.lr, "warmup_steps": min(50, args.max_steps // 10), "eval_every": args.eval_every,
                  "checkpoint_every": 10_000, "output_dir": str(out / mode), "progress": False, "seed": 0},
        "eval": {"robustness": not args.no_robustness, "batch_size": args.batch, "gallery_size": 8},
    })
    t0 = time.perf_counter()
    res = train(cfg)
    model, _ = load_model(res.checkpoint, pick_device("auto"))
    kv = evaluate(model, cfg, out / mode / "eval-kvasir", title=f"{mode}: Kvasir PraNet test")
    rows = cross_dataset_rows(cfg.data)
    cvc_rows = rows[rows["dataset"] == "cvc-clinicdb"]
    cvc_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"robustness": False})})
    cvc = evaluate(model, cvc_cfg, out / mode / "eval-cvc", rows=cvc_rows, title=f"{mode}: CVC-ClinicDB")
    m, c = kv.metrics, flat_metrics(cvc.per_image)
    drops3 = {k: v for k, v in m.items() if k.startswith("robust_drop_") and k.endswith("_s3")}
    return {
        "train": {"steps": res.steps, "wall_s": round(res.wall_s, 1), "img_s": round(res.images_per_s, 1),
                  "final_loss": res.metrics.get("final_loss"), "best_val_dice": res.metrics.get("best_val_dice"),
                  "trainable_params": res.trainable_params},
        "kvasir_test": {k: m[k] for k in ("test_dice", "test_dice_ci_low", "test_dice_ci_high", "test_iou",
                                          "test_precision", "test_recall", "test_hd95") if k in m},
        "baselines_kvasir": {k: m[k] for k in m if k.startswith("baseline_")},
        "cvc": {"dice": c.get("test_dice"), "iou": c.get("test_iou"), "n": int(len(cvc_rows)),
                "baseline_ellipse_in_box_dice": c.get("baseline_ellipse_in_box_dice")},
        "cross_dataset_drop": (m["test_dice"] - c["test_dice"]) if "test_dice" in c else None,
        "severity3_drops": drops3,
        "severity3_drop_max": max(drops3.values()) if drops3 else None,
        "n_test": kv.n_images, "wall_s": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=bench.default_kvasir_source().parent
                    if bench.default_kvasir_source() else None, help="folder holding kvasir-seg/ and cvc-clinicdb/")
    ap.add_argument("--workdir", type=Path, help="an already ingested work dir (skips ingest)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--modes", default="box,prompt_free")
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget per mode")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--no-robustness", action="store_true")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: 64 px, 2 steps, tiny data")
    args = ap.parse_args(argv)
    if args.quick:
        args.minutes, args.max_steps, args.image_size, args.batch, args.workers = None, 2, 64, 2, 0
        args.eval_every = 2
    if args.data is None and args.workdir is None:
        sys.exit("no data: pass --data (folder with kvasir-seg/ and cvc-clinicdb/) or --workdir")
    device = bench.pick_device("auto")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medsam2-quality-") as tmp:
        tmp = Path(tmp)
        workdir = args.workdir or prepare_workdir(args.data, tmp, args.quick)
        results = {mode: run_mode(mode, workdir, tmp / "runs", args) for mode in args.modes.split(",")}
    box, free = results.get("box", {}), results.get("prompt_free", {})
    checks = {
        "box_dice": box.get("kvasir_test", {}).get("test_dice"),
        "prompt_free_dice": free.get("kvasir_test", {}).get("test_dice"),
        "cross_dataset_drop": box.get("cross_dataset_drop"),
        "severity3_drop": box.get("severity3_drop_max"),
    }
    goals = {k: {"value": v, "goal": GOALS[k],
                 "met": None if v is None else bool(v >= GOALS[k] if k.endswith("dice") else v <= GOALS[k])}
             for k, v in checks.items()}
    report = {"benchmark": "quality", "mode": "quick" if args.quick else "full", "device": bench.device_info(device),
              "git_commit": bench.git_commit(), "args": {k: str(v) for k, v in vars(args).items()},
              "results": results, "goals": goals, "wall_s": round(time.perf_counter() - t0, 1)}
    text = json.dumps(report, default=lambda o: float(o) if isinstance(o, np.floating) else str(o))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()

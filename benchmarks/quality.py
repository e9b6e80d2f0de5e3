"""Quality run (issue 8): box-prompted and prompt-free SAM2.1 hiera-t from random init, a fixed wall-clock
budget of training each on Kvasir's non-test images, evaluated on the frozen PraNet split (with the corruption
suite) and on CVC-ClinicDB as an external set. Prints one JSON object; ``--out`` writes it.

    python benchmarks/quality.py --data ../shared/data --out benchmarks/results/quality-h100.json   # one H100
    python benchmarks/quality.py --quick                                                            # CPU smoke

Goals (BENCHMARKS.md): box-prompted Dice ≥ 0.90 (ellipse-in-box baseline 0.805), prompt-free ≥ 0.80,
cross-dataset drop to CVC ≤ 0.05, severity-3 corruption drop ≤ 0.05. The library's own ``train`` and
``evaluate`` are used unchanged (no MLflow/Prefect), so these numbers are what the platform delivers.

CPU profile (issue 12, part 4): ``--profile cpu --budget-minutes N`` trains the *demo recipe*
(``configs/demo.yaml``, loaded with ``medsam2.config.load_config`` semantics; only the overrides listed in the
JSON are changed) box-prompted for N minutes and prompt-free for ``--prompt-free-minutes`` (default N/3) on two CPU
cores, evaluates on the 100 PraNet test images (corruptions at severity 3 only) and CVC-ClinicDB (87), and checks
the CPU goals of BENCHMARKS.md (demo champion ≥ 0.85 with CI low > 0.805; ≥ 0.88 within 15 minutes; prompt-free
clearly above its trivial baselines)::

    python benchmarks/quality.py --profile cpu --budget-minutes 15 \
        --out benchmarks/results/quality-cpu-$(date +%Y%m%d).json          # ≈ 15 + 5 min training + eval
    python benchmarks/quality.py --profile cpu --quick                    # seconds-long smoke of the same path
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


# ---------------------------------------------------------------------------------------------- CPU profile

#: CPU goals of BENCHMARKS.md ("On two CPU cores"), plus the GPU section's drop limits (same thresholds).
CPU_GOALS = {
    "demo_champion": {"text": "demo recipe within the demo budget: box-prompted Kvasir test Dice >= 0.85 with its "
                              "95 % CI lower bound above the ellipse-in-box baseline 0.805",
                      "dice": 0.85, "ci_low_above": 0.805},
    "budget_15min": {"text": "box-prompted Kvasir test Dice >= 0.88 within a 15-minute CPU budget",
                     "dice": 0.88, "max_minutes": 15.0},
    "prompt_free_beats_trivial": {"text": "prompt-free clearly beats its trivial baselines: the 95 % CI lower bound "
                                          "of its Dice is above the best trivial baseline's mean Dice "
                                          "(empty mask, mean training mask)"},
    "cross_dataset_drop": {"text": "box-prompted Dice drop Kvasir -> CVC-ClinicDB <= 0.05 (GPU target)", "max": 0.05},
    "severity3_drop": {"text": "box-prompted worst severity-3 corruption Dice drop <= 0.05 (GPU target)",
                       "max": 0.05},
}
TRIVIAL_PROMPT_FREE = ("empty", "mean_mask")
CPU_SEVERITIES = (3,)
#: The corruptions the severity-3 goal names (BENCHMARKS.md: "noise/blur/low contrast"); ``--corruptions all`` runs
#: evaluate's whole suite (jpeg, brightness and, for box models, box_jitter/box_scale too: ~2x the eval time).
CPU_CORRUPTIONS = ("gaussian_noise", "blur", "low_contrast")
QUICK_BUDGET_MINUTES = 0.05  # --quick: 3 s of box training (1-2 steps), a third of that prompt-free (1 step)


def baseline_table(per_image) -> dict:
    """Mean Dice/IoU with 95 % CIs of every non-model method of the clean rows (ellipse_in_box, fill_box and,
    where the evaluation adds them, empty / mean_mask), from ``medsam2.metrics.summarize``."""
    from medsam2.metrics import summarize

    clean = per_image[per_image["condition"] == "clean"]
    out = {}
    for method, rows in clean[clean["method"] != "model"].groupby("method"):
        s = summarize(rows, metrics=("dice", "iou"))
        out[str(method)] = {"dice": s["dice"]["mean"], "dice_ci_low": s["dice"]["ci_low"],
                            "dice_ci_high": s["dice"]["ci_high"], "iou": s["iou"]["mean"], "n": s["dice"]["n"],
                            "source": "medsam2.engine.evaluate"}
    return out


def trivial_prompt_free_baselines(cfg, test_rows) -> dict:
    """Fallback for evaluations that do not add them: the empty mask and the mean training mask (the mean of the
    training masks on a 256² grid, resized to each test image; its top pixels kept so the predicted area fraction
    equals the mean training area fraction), scored with ``medsam2.metrics.segmentation_metrics``."""
    import cv2

    from medsam2.data.dataset import load_cached
    from medsam2.data.selection import select_rows
    from medsam2.metrics import segmentation_metrics, summarize

    workdir = Path(cfg.data.workdir)
    train_rows, _ = select_rows(cfg.data, "train", seed=cfg.train.seed)
    acc, fracs = np.zeros((256, 256), np.float64), []
    for _, row in train_rows.iterrows():
        _, m = load_cached(workdir, row)
        m = (np.asarray(m) > 0).astype(np.float32)
        acc += cv2.resize(m, (256, 256), interpolation=cv2.INTER_AREA)
        fracs.append(float(m.mean()))
    mean_mask = acc / max(1, len(train_rows))
    cut = np.quantile(mean_mask, 1 - float(np.mean(fracs))) if fracs else 1.0
    recs: dict[str, list] = {"empty": [], "mean_mask": []}
    for _, row in test_rows.iterrows():
        _, gt = load_cached(workdir, row)
        gt = np.asarray(gt) > 0
        h, w = gt.shape
        recs["empty"].append({"patient_id": row.get("patient_id"), **segmentation_metrics(np.zeros_like(gt), gt)})
        mm = cv2.resize(mean_mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= cut
        recs["mean_mask"].append({"patient_id": row.get("patient_id"), **segmentation_metrics(mm, gt)})
    out = {}
    for name, rows in recs.items():
        s = summarize(rows, metrics=("dice", "iou"))
        out[name] = {"dice": s["dice"]["mean"], "dice_ci_low": s["dice"]["ci_low"],
                     "dice_ci_high": s["dice"]["ci_high"], "iou": s["iou"]["mean"], "n": s["dice"]["n"],
                     "source": "benchmarks/quality.py fallback"}
    return out


def cpu_mode_config(mode: str, workdir: Path, out: Path, minutes: float, quick: bool):
    """The demo recipe for one mode, with the profile's overrides (every one of them recorded)."""
    overrides = {
        "name": f"quality-cpu-{mode}",
        "data.workdir": str(workdir),
        "data.train_datasets": ["kvasir-seg"],
        "data.eval_datasets": ["kvasir-seg"],
        "train.max_minutes": minutes,
        "train.max_steps": 1_000_000,  # the wall-clock budget ends training, never the step count
        "train.output_dir": str(out / mode),
        "train.device": "cpu",
        "train.progress": False,
        "eval.robustness": True,
        "eval.cross_dataset": False,
    }
    if quick:  # tiny data: a gallery of 8 would be every image; keep the smoke run lean
        overrides["eval.gallery_size"] = 0
    return bench.recipe_config(overrides, path=bench.DEMO_CONFIG, prompt_free=mode == "prompt_free")


def run_mode_cpu(mode: str, workdir: Path, out: Path, minutes: float, quick: bool,
                 corruptions: tuple[str, ...] | None) -> dict:
    """Train the demo recipe for ``minutes`` with ``medsam2.engine.train.train``, evaluate with
    ``medsam2.engine.evaluate`` on Kvasir test (+ severity-3 corruptions) and CVC-ClinicDB."""
    from medsam2.data.selection import cross_dataset_rows, select_rows
    from medsam2.engine.checkpoint import load_model
    from medsam2.engine.evaluate import evaluate
    from medsam2.engine.train import train
    from medsam2.metrics import summarize

    cfg, record = cpu_mode_config(mode, workdir, out, minutes, quick)
    phases: dict[str, float] = {}
    t = time.perf_counter()
    res = train(cfg)
    phases["train_s"] = time.perf_counter() - t
    phases["train_loop_s"] = res.wall_s
    model, _ = load_model(res.checkpoint, "cpu")
    t = time.perf_counter()
    with bench.robustness_subset(CPU_SEVERITIES, corruptions):
        kv = evaluate(model, cfg, out / mode / "eval-kvasir", title=f"quality cpu {mode}: Kvasir PraNet test")
    phases["eval_kvasir_s"] = time.perf_counter() - t
    rows = cross_dataset_rows(cfg.data)
    cvc_rows = rows[rows["dataset"] == "cvc-clinicdb"]
    cvc_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"robustness": False})})
    t = time.perf_counter()
    cvc = evaluate(model, cvc_cfg, out / mode / "eval-cvc", rows=cvc_rows, title=f"quality cpu {mode}: CVC-ClinicDB")
    phases["eval_cvc_s"] = time.perf_counter() - t
    m, c = kv.metrics, cvc.metrics
    baselines = baseline_table(kv.per_image)
    trivial = {}
    if mode == "prompt_free":
        trivial = {k: v for k, v in baselines.items() if k in TRIVIAL_PROMPT_FREE}
        if set(trivial) != set(TRIVIAL_PROMPT_FREE):
            t = time.perf_counter()
            test_rows, _ = select_rows(cfg.data, "test", seed=cfg.train.seed)
            fb = trivial_prompt_free_baselines(cfg, test_rows)
            trivial.update({k: v for k, v in fb.items() if k not in trivial})
            phases["trivial_baselines_s"] = time.perf_counter() - t
    steps_run = res.steps - res.resumed_from
    bs = cfg.train.batch_size * cfg.train.grad_accum
    corr_rows = kv.per_image[(kv.per_image["method"] == "model") & (kv.per_image["condition"] != "clean")]
    drops3 = {k[len("robust_drop_"):-len("_s3")]: v for k, v in m.items()
              if k.startswith("robust_drop_") and k.endswith("_s3")}
    cvc_clean = cvc.per_image[(cvc.per_image["method"] == "model") & (cvc.per_image["condition"] == "clean")]
    n_seq = int(cvc_clean["patient_id"].nunique()) if "patient_id" in cvc_clean else None
    out_row = {
        "mode": mode,
        "budget_minutes": minutes,
        "config": record,
        "train": {"steps": res.steps, "steps_run": steps_run, "images_seen": steps_run * bs,
                  "s_per_step": res.wall_s / steps_run if steps_run else None, "img_s": res.images_per_s,
                  "stopped_by_budget": res.stopped_early, "final_loss": res.metrics.get("final_loss"),
                  "best_val_dice": res.metrics.get("best_val_dice"), "last_val_dice": res.metrics.get("last_val_dice"),
                  "trainable_params": res.trainable_params, "total_params": res.total_params,
                  "base_weights": res.base_weights},
        "kvasir_test": {k: m[k] for k in (
            "test_dice", "test_dice_ci_low", "test_dice_ci_high", "test_iou", "test_iou_ci_low", "test_iou_ci_high",
            "test_precision", "test_recall", "test_hd95") if k in m},
        "n_test": kv.n_images,
        "baselines_kvasir": baselines,
        "trivial_baselines_kvasir": trivial,
        "cvc": {"dice": c.get("test_dice"), "dice_ci_low": c.get("test_dice_ci_low"),
                "dice_ci_high": c.get("test_dice_ci_high"), "iou": c.get("test_iou"),
                "iou_ci_low": c.get("test_iou_ci_low"), "iou_ci_high": c.get("test_iou_ci_high"),
                "n": int(len(cvc_rows)), "sequences": n_seq,
                "ci_cluster_bootstrap_by_patient_id": "patient_id" in (summarize.__doc__ or ""),
                "baselines": baseline_table(cvc.per_image)},
        "cross_dataset_drop": (m["test_dice"] - c["test_dice"]) if "test_dice" in c and "test_dice" in m else None,
        "robustness": {"severities": list(CPU_SEVERITIES), "corruptions": sorted(drops3), "rows": int(len(corr_rows))},
        "robust_drop_s3": drops3,
        "robust_drop_s3_max": m.get("robust_drop_s3_max"),
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "eval_s_per_image": {"kvasir_with_s3_corruptions": phases["eval_kvasir_s"] / max(1, kv.n_images),
                             "cvc_clean": phases["eval_cvc_s"] / max(1, len(cvc_rows))},
    }
    del model
    return out_row


def _goal(spec: dict, value, meets: bool | None, applies: bool, **extra) -> dict:
    return {"goal": spec["text"], "value": value, **extra, "applies": applies, "meets_threshold": meets,
            "met": meets if applies else None}


def cpu_goals(box: dict, free: dict, box_minutes: float | None, demo_minutes: float | None) -> dict:
    """Each CPU goal with the numbers it is computed from; ``met`` is None when the goal does not apply to this
    run's budget (e.g. the demo-budget goal for a 15-minute run) or a number is missing."""
    g = CPU_GOALS
    kt = box.get("kvasir_test", {})
    dice, lo = kt.get("test_dice"), kt.get("test_dice_ci_low")
    goals = {}
    ok = None if dice is None or lo is None else bool(dice >= g["demo_champion"]["dice"] and
                                                       lo > g["demo_champion"]["ci_low_above"])
    goals["demo_champion"] = _goal(g["demo_champion"], dice, ok,
                                   box_minutes is not None and demo_minutes is not None and box_minutes <= demo_minutes,
                                   ci_low=lo, threshold=g["demo_champion"]["dice"],
                                   ci_low_threshold=g["demo_champion"]["ci_low_above"],
                                   budget_minutes=box_minutes, demo_budget_minutes=demo_minutes,
                                   measured_ellipse_dice=box.get("baselines_kvasir", {}).get("ellipse_in_box", {})
                                   .get("dice"))
    ok = None if dice is None else bool(dice >= g["budget_15min"]["dice"])
    goals["budget_15min"] = _goal(g["budget_15min"], dice, ok,
                                  box_minutes is not None and box_minutes <= g["budget_15min"]["max_minutes"],
                                  threshold=g["budget_15min"]["dice"], budget_minutes=box_minutes)
    fk = free.get("kvasir_test", {})
    triv = {k: v["dice"] for k, v in free.get("trivial_baselines_kvasir", {}).items() if v.get("dice") is not None}
    best = max(triv.values()) if triv else None
    flo = fk.get("test_dice_ci_low")
    ok = None if flo is None or best is None else bool(flo > best)
    goals["prompt_free_beats_trivial"] = _goal(g["prompt_free_beats_trivial"], fk.get("test_dice"), ok,
                                               bool(free), ci_low=flo, trivial_dice=triv, best_trivial_dice=best)
    for key, val in (("cross_dataset_drop", box.get("cross_dataset_drop")),
                     ("severity3_drop", box.get("robust_drop_s3_max"))):
        ok = None if val is None else bool(val <= g[key]["max"])
        extra = {"corruptions": box.get("robustness", {}).get("corruptions")} if key == "severity3_drop" else {}
        goals[key] = _goal(g[key], val, ok, bool(box), threshold=g[key]["max"], **extra)
    return goals


def main_cpu(args) -> dict:
    import torch
    import yaml

    if args.quick:
        args.budget_minutes = args.budget_minutes or QUICK_BUDGET_MINUTES
    box_min = float(args.budget_minutes or 15.0)
    free_min = float(args.prompt_free_minutes or box_min / 3)
    modes = [m for m in args.modes.split(",") if m]
    minutes = {"box": box_min, "prompt_free": free_min}
    out = args.out
    if out is None and not args.quick:
        out = bench.REPO / "benchmarks" / "results" / f"quality-cpu-{time.strftime('%Y%m%d')}.json"
    corruptions = None if args.corruptions == "all" else tuple(bench.csv(args.corruptions))
    demo_minutes = (yaml.safe_load(bench.DEMO_CONFIG.read_text()) or {}).get("train", {}).get("max_minutes")
    t0 = time.perf_counter()
    report = {
        "benchmark": "quality", "profile": "cpu", "mode": "quick" if args.quick else "full", "complete": False,
        **bench.cpu_environment(), "device_info": bench.device_info(torch.device("cpu")),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budget_minutes": {"box": box_min if "box" in modes else None,
                           "prompt_free": free_min if "prompt_free" in modes else None},
        "recipe": str(bench.DEMO_CONFIG.relative_to(bench.REPO)), "demo_budget_minutes": demo_minutes,
        "eval_protocol": {"kvasir": "PraNet test split, original resolution, medsam2.engine.evaluate; corruptions "
                                    f"{'all' if corruptions is None else list(corruptions)} at severities "
                                    f"{list(CPU_SEVERITIES)} only (CPU profile)",
                          "cvc": "all CVC-ClinicDB images (external set, never trained on), clean only"},
        "args": {k: str(v) for k, v in vars(args).items()}, "results": {}, "phases_s": {},
    }
    with tempfile.TemporaryDirectory(prefix="medsam2-quality-cpu-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        workdir = args.workdir or prepare_workdir(args.data, tmp, args.quick)
        report["phases_s"]["ingest_s"] = round(time.perf_counter() - t, 2)
        for mode in modes:
            bench.log(f"quality cpu: {mode}, {minutes[mode]:g} min of training")
            report["results"][mode] = run_mode_cpu(mode, workdir, tmp / "runs", minutes[mode], args.quick,
                                                   corruptions)
            report["phases_s"][mode] = report["results"][mode]["phases_s"]
            report["wall_s"] = round(time.perf_counter() - t0, 1)
            bench.write_json(out, report)
    box, free = report["results"].get("box", {}), report["results"].get("prompt_free", {})
    report["goals"] = cpu_goals(box, free, box_min if box else None, demo_minutes)
    report["complete"], report["wall_s"] = True, round(time.perf_counter() - t0, 1)
    report = bench.finite(report)
    bench.write_json(out, report)
    print(json.dumps(report))
    return report


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
    ap.add_argument("--quick", action="store_true", help="CPU smoke: 64 px, 2 steps, tiny data (with --profile cpu: "
                    f"the demo recipe for {QUICK_BUDGET_MINUTES} min, tiny data)")
    ap.add_argument("--profile", choices=("gpu", "cpu"), default="gpu",
                    help="gpu: the sizes above (one H100); cpu: the demo recipe (configs/demo.yaml) on 2 CPU cores")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="--profile cpu: training budget of the box-prompted model (default 15)")
    ap.add_argument("--prompt-free-minutes", type=float, default=None,
                    help="--profile cpu: training budget of the prompt-free model (default budget-minutes / 3)")
    ap.add_argument("--corruptions", default=",".join(CPU_CORRUPTIONS),
                    help="--profile cpu: corruptions evaluated at severity 3 (comma list, or 'all')")
    args = ap.parse_args(argv)
    if args.profile == "cpu":
        if args.data is None and args.workdir is None:
            sys.exit("no data: pass --data (folder with kvasir-seg/ and cvc-clinicdb/) or --workdir")
        return main_cpu(args)
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

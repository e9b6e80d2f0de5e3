"""Data-loader throughput: SegDataset + DataLoader images/s per num_workers × augment, vs what the model eats.

    python benchmarks/loader_throughput.py --quick                       # CPU: 64 px, workers {0,2}
    python benchmarks/loader_throughput.py --workdir WORK \\
        --model-json train_throughput.json --out loader.json             # GPU machine: 1024 px, workers {0..16}

The loader is the training path's own: ``SegDataset`` over the manifest + cache (resize, augmentation, box and
point prompts), ``StepSampler`` seeds, ``runtime.collate``, pinned memory on CUDA, ``prefetch_factor=4``. Per
configuration: start-up (iterator creation to first batch), then steady img/s over ``--steps`` batches after
skipping the first ``num_workers + 2`` (the burst in which every worker delivers its first batch at once).

What the model consumes: ``--model-img-s N`` (one or more, comma separated), or ``--model-json`` of
``train_throughput.py`` (the model-only img/s of each variant at the same image size), or else a quick
measurement (hiera_t train step, bf16 on CUDA / fp32 on CPU, synthetic batch). BENCHMARKS.md's target: the
loader delivers >= 1.5x what the model consumes. Without ``--workdir`` a temporary work dir is ingested from
``$MEDSAM2_SAMPLE_DATA/kvasir-seg`` (``--n-images`` pairs).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common as bench
import numpy as np
import torch

from medsam2.data.dataset import SegDataset, load_cached, resize_pair

TARGET_RATIO = 1.5


def parse_args(argv: list[str] | None):
    ap = bench.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--augments", default="none,light", help="comma list of augment strengths")
    ap.add_argument("--workers", default=None, help="comma list of num_workers (default 0,2,4,8,16; quick: 0,2)")
    ap.add_argument("--image-size", type=int, default=None, help="default 1024 (quick: 64)")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (quick: 2)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed batches per configuration (default max(24, 4 x workers); quick: 2)")
    ap.add_argument("--model-img-s", default=None, help="what the model consumes, img/s (comma list allowed)")
    ap.add_argument("--model-json", type=Path, default=None, help="train_throughput.py JSON to take it from")
    ap.add_argument("--n-images", type=int, default=60, help="pairs to ingest when no --workdir is given")
    args = ap.parse_args(argv)
    q = args.quick
    if q:
        args.device = "cpu"
    args.image_size = args.image_size or (bench.QUICK_IMAGE_SIZE if q else 1024)
    args.batch = args.batch or (bench.QUICK_BATCH if q else 8)
    args.workers = args.workers or ("0,2" if q else "0,2,4,8,16")
    if q and args.n_images == 60:
        args.n_images = 6
    return args


def measure(rows, workdir, cfg, *, batch: int, workers: int, augment: str, steps: int, seed: int,
            pin: bool) -> dict[str, Any]:
    skip = workers + 2
    loader = bench.make_loader(rows, workdir, cfg, batch=batch, num_workers=workers, augment=augment,
                               steps=skip + steps, seed=seed, pin=pin)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    startup = time.perf_counter() - t0
    for _ in range(skip - 1):
        next(it)
    t1 = time.perf_counter()
    n = 0
    for b in it:
        n += b["image"].shape[0]
    steady = time.perf_counter() - t1
    total = time.perf_counter() - t0
    del it, loader
    return {
        "num_workers": workers, "augment": augment, "batch": batch, "timed_batches": steps,
        "startup_s": round(startup, 3), "steady_s": round(steady, 3),
        "img_s": round(n / steady, 2) if steady > 0 else None,
        "img_s_incl_startup": round((skip + steps) * batch / total, 2),
    }


def per_sample_breakdown(rows, workdir, cfg, augment: str, n: int = 6) -> dict[str, float]:
    """Mean ms per sample of each stage of SegDataset.__getitem__, in this process (one core)."""
    ds = SegDataset(rows, workdir, cfg, augment)
    rng_seed = 12345
    times = {"load_ms": 0.0, "resize_ms": 0.0, "augment_ms": 0.0, "prompts_and_tensors_ms": 0.0}
    ds[(0, rng_seed)]  # warm-up: first-call imports (scipy, albumentations) are not per-sample cost
    k = min(n, len(ds))
    for i in range(k):
        row = ds.rows.iloc[i]
        t = time.perf_counter()
        image, mask = load_cached(ds.workdir, row)
        image, mask = np.asarray(image), (np.zeros(image.shape[:2], np.uint8) if mask is None else np.asarray(mask))
        t1 = time.perf_counter()
        img, msk = resize_pair(image, mask, ds.size)
        img = img.astype(np.float32) / 255.0
        t2 = time.perf_counter()
        rng = np.random.default_rng(rng_seed + i)
        if ds.augment is not None:
            ds.augment.set_random_seed(int(rng.integers(2**31)))
            out = ds.augment(image=img, mask=msk)
            img, msk = np.clip(out["image"], 0, 1).astype(np.float32), out["mask"]
        t3 = time.perf_counter()
        ds.make_sample(img, msk, rng, i)
        t4 = time.perf_counter()
        for key, dt in zip(times, (t1 - t, t2 - t1, t3 - t2, t4 - t3), strict=True):
            times[key] += 1000 * dt / k
    return {key: round(v, 2) for key, v in times.items()}


def model_consumption(args, device: torch.device) -> dict[str, Any]:
    if args.model_img_s:
        vals = [float(x) for x in bench.csv(args.model_img_s)]
        return {"source": "--model-img-s", "consumers": {f"given_{i}": v for i, v in enumerate(vals)}}
    if args.model_json:
        data = json.loads(args.model_json.read_text())
        cons = {r["name"]: r["model_only"]["img_s"] for r in data.get("results", [])
                if r.get("model_only") and r.get("config", {}).get("image_size") == args.image_size}
        return {"source": str(args.model_json), "device": data.get("device", {}).get("name"), "consumers": cons}
    from train_throughput import TrainStep  # measure quickly: hiera_t, synthetic batch

    precision = "bf16" if device.type == "cuda" else "fp32"
    model = bench.build_model(bench.model_cfg("hiera_t", args.image_size), device, args.seed).train()
    step = TrainStep(model, device, precision)
    batch = bench.synthetic_batch(args.batch, args.image_size, device, args.seed)
    steps = 2 if args.quick else 10
    secs = bench.time_steps(lambda: step(batch), 1 if args.quick else 3, steps, device)
    model = step = None  # free before the loader runs
    bench.free_memory(device)
    name = f"hiera_t/full/{precision}/eager (measured here)"
    return {"source": "measured", "consumers": {name: round(args.batch * steps / secs, 2)}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = bench.pick_device(args.device)
    with bench.stdout_to_stderr() as stdout:
        report = bench.Report("loader_throughput", args, device)
        tmp = None
        workdir = args.workdir
        if workdir is None:
            src = bench.default_kvasir_source()
            if src is None:
                raise SystemExit("no --workdir and no Kvasir-SEG sample data (set MEDSAM2_SAMPLE_DATA)")
            tmp = tempfile.TemporaryDirectory(prefix="medsam2-loader-")
            bench.log(f"ingesting {args.n_images} pairs of {src} into {tmp.name}")
            workdir = bench.ingest_subset(src, Path(tmp.name), args.n_images)
        rows = bench.read_labelled_rows(workdir)
        cfg = bench.model_cfg("hiera_t", args.image_size)
        pin = device.type == "cuda"
        report["data"] = {"source": "real", "workdir": str(workdir), "images": len(rows),
                          "datasets": sorted(set(rows["dataset"])), "pin_memory": pin,
                          "image_size": args.image_size, "cpu_count": os.cpu_count()}
        consumption = model_consumption(args, device)
        model_img_s = max(consumption["consumers"].values(), default=None)
        report["model"] = {**consumption, "model_img_s": model_img_s,
                           "note": "model_img_s = the fastest consumer (it needs the most images per second)"}
        report["per_sample_ms"] = {a: per_sample_breakdown(rows, workdir, cfg, a) for a in bench.csv(args.augments)}
        for augment in bench.csv(args.augments):
            for workers in (int(w) for w in bench.csv(args.workers)):
                if args.budget_s is not None and report.elapsed() > args.budget_s:
                    report.add({"num_workers": workers, "augment": augment, "skipped": "time budget"})
                    continue
                steps = args.steps or (bench.QUICK_STEPS if args.quick else max(24, 4 * workers))
                bench.log(f"workers {workers} augment {augment}: {steps} batches of {args.batch}")
                try:
                    res = measure(rows, workdir, cfg, batch=args.batch, workers=workers, augment=augment,
                                  steps=steps, seed=args.seed, pin=pin)
                except Exception as exc:  # noqa: BLE001 - keep the other configurations
                    res = {"num_workers": workers, "augment": augment, "error": bench.short_error(exc)}
                if model_img_s and res.get("img_s"):
                    res["ratio_to_model"] = round(res["img_s"] / model_img_s, 3)
                    res["meets_1_5x"] = res["ratio_to_model"] >= TARGET_RATIO
                    res["covers"] = sorted(k for k, v in consumption["consumers"].items()
                                           if res["img_s"] >= TARGET_RATIO * v)
                bench.log(f"  -> {res.get('img_s')} img/s {res.get('error') or ''}")
                report.add(res)
        ok = [r for r in report["results"] if r.get("img_s")]
        best = {}
        for augment in bench.csv(args.augments):
            cands = [r for r in ok if r["augment"] == augment]
            if cands:
                top = max(cands, key=lambda r: r["img_s"])
                enough = [r["num_workers"] for r in cands if r.get("meets_1_5x")]
                best[augment] = {"img_s": top["img_s"], "num_workers": top["num_workers"],
                                 "fewest_workers_meeting_1_5x": min(enough) if enough else None}
        report["best"] = best
        report["targets"] = [{
            "target": f"loader >= {TARGET_RATIO}x model img/s", "model_img_s": model_img_s,
            "met": {a: bool(b["fewest_workers_meeting_1_5x"] is not None) for a, b in best.items()},
            "comparable": device.type == "cuda" and args.image_size == 1024 and not args.quick,
        }]
        result = report.finish(stdout)
        if tmp is not None:
            tmp.cleanup()
        return result


if __name__ == "__main__":
    main(sys.argv[1:])

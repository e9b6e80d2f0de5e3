"""Inference throughput (img/s, peak memory, MFU): eager bf16 baseline vs ``torch.compile`` of the image encoder.

    python benchmarks/infer_throughput.py --quick                 # CPU smoke run (fp32 baseline)
    python benchmarks/infer_throughput.py --out infer.json        # GPU: batch 16 @1024, bf16

One step = ``model.eval()`` forward with the box prompt under ``torch.inference_mode()`` and bf16 autocast (fp32
on CPU), as ``engine.predict`` runs it; the input is a synthetic normalised batch kept on the device, or real
batches from SegDataset + DataLoader with ``--workdir`` (augment none, deterministic prompts). Compiled variants
(``--compile-backbones``) run last so ``--budget-s`` drops them first; a failed compile falls back to eager with
the error in the JSON.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import common as bench
import torch

from medsam2.engine.runtime import autocast

REFERENCE_H100 = {"hiera_t": 271.0, "hiera_b+": 150.0}  # BENCHMARKS.md: bf16, batch 16, @1024, img/s
TARGET_IMG_S = 300.0  # BENCHMARKS.md: inference >= 300 img/s on one H100


def parse_args(argv: list[str] | None):
    ap = bench.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--backbones", default=None, help="comma list (default hiera_t,hiera_b+; quick: hiera_t)")
    bench.add_model_args(ap, batch=16, warmup=3, steps=20, reserve_s=120)
    args = ap.parse_args(argv)
    bench.resolve_model_args(args, batch=16, warmup=3, steps=20)
    args.backbones = args.backbones or ("hiera_t" if args.quick else "hiera_t,hiera_b+")
    return args


def run_variant(backbone: str, compiled: bool, args, device, real, precision: str, flops_cache: dict,
                peak: float | None) -> dict[str, Any]:
    cfg = bench.model_cfg(backbone, args.image_size, "full", args.decoder, args.prompt)
    name = f"{backbone}/{precision}/{'compile' if compiled else 'eager'}"
    res: dict[str, Any] = {
        "name": name, "baseline": not compiled, "config": bench.config_fields(cfg), "precision": precision,
        "compile": compiled, "batch": args.batch, "warmup_steps": args.warmup, "timed_steps": args.steps,
    }
    bench.reset_peak_memory(device)
    model = bench.build_model(cfg, device, args.seed).eval()
    res["total_params"] = model.param_count().total
    synth = bench.synthetic_batch(args.batch, args.image_size, device, args.seed)

    def forward(batch: dict) -> dict:
        with torch.inference_mode(), autocast(device, precision):
            return model(batch["image"], boxes=batch["box"], points=batch["points"],
                         point_labels=batch["point_labels"])

    key = (backbone, args.image_size, args.decoder, args.prompt, args.batch)
    if key not in flops_cache:
        flops_cache[key] = bench.count_flops(lambda: forward(synth))
    flops = flops_cache[key]
    res.update(flops_per_step=flops, gflop_per_image=round(flops / args.batch / 1e9, 2))

    warmup = args.warmup
    if compiled:
        t0 = time.perf_counter()
        err = bench.compile_image_encoder(model, args.image_size, device, args.compile_backend, args.compile_mode)
        if err is None:
            try:
                forward(synth)
                bench.sync(device)
            except Exception as exc:  # noqa: BLE001 - report and fall back to eager
                err = bench.short_error(exc)
        if err is not None:
            del model
            bench.reset_compiler()
            bench.free_memory(device)
            bench.log(f"{name}: compile failed, measuring eager instead: {err}")
            res = run_variant(backbone, False, args, device, real, precision, flops_cache, peak)
            res.update(name=name, baseline=False, compile=True, compiled=False, compile_error=err,
                       fell_back_to="eager")
            return res
        res.update(compiled=True, compile_s=round(time.perf_counter() - t0, 2), compile_error=None,
                   compile_backend=args.compile_backend or "inductor", compile_mode=args.compile_mode)
        warmup = max(1, warmup - 1)

    bench.measure(res, forward, synth, real, cfg, args.batch, args, device, flops, peak, warmup)
    if (device.type == "cuda" and "H100" in torch.cuda.get_device_name(device) and args.image_size == 1024
            and args.batch == 16 and precision == "bf16" and not compiled and backbone in REFERENCE_H100):
        res["reference_img_s_model_only"] = REFERENCE_H100[backbone]
    return res


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = bench.pick_device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    with bench.stdout_to_stderr() as stdout:
        report = bench.Report("infer_throughput", args, device)
        peak, peak_note = bench.peak_flops(device, args.peak_flops)
        report["mfu_peak_flops"], report["mfu_peak_note"] = peak, peak_note
        report["baseline_precision"] = precision
        real = None
        if args.workdir is not None:
            real = bench.RealBatches(args.workdir, args.num_workers, "none", device, args.seed)
            report["data"] = real.info()
        else:
            report["data"] = {"source": "synthetic", "note": "one random batch kept on the device"}
        backbones = bench.csv(args.backbones)
        plan = [(bb, False) for bb in backbones]
        plan += [(bb, True) for bb in backbones if bb in bench.csv(args.compile_backbones)]
        reserve = args.compile_reserve_s if args.compile_reserve_s is not None else (
            120.0 if device.type == "cuda" else 0.0)
        flops_cache: dict = {}
        for bb, compiled in plan:
            name = f"{bb}/{precision}/{'compile' if compiled else 'eager'}"
            need = reserve if compiled else 0.0
            if args.budget_s is not None and report.elapsed() + need > args.budget_s:
                report.add({"name": name, "baseline": not compiled, "skipped":
                            f"time budget: {report.elapsed():.0f} s used of {args.budget_s:.0f} s"})
                continue
            bench.log(f"{name} batch {args.batch} @{args.image_size}")
            try:
                res = run_variant(bb, compiled, args, device, real, precision, flops_cache, peak)
            except Exception as exc:  # noqa: BLE001 - one failed variant (e.g. OOM) must not lose the others
                res = {"name": name, "baseline": not compiled, "batch": args.batch,
                       "config": bench.config_fields(bench.model_cfg(bb, args.image_size, "full", args.decoder,
                                                                     args.prompt)),
                       "error": bench.short_error(exc), "oom": bench.is_oom(exc)}
            if compiled:
                bench.reset_compiler()
            bench.free_memory(device)
            bench.log(f"  -> img/s {res.get('img_s')} {res.get('error') or ''}")
            report.add(res)
        if real is not None:
            real.close()
        measured = [r for r in report["results"] if r.get("img_s")]
        base = {r["config"]["backbone"]: r for r in measured if r.get("baseline")}
        for r in measured:
            b = base.get(r["config"]["backbone"])
            if b:
                r["baseline_name"] = b["name"]
                r["speedup_vs_baseline"] = round(r["img_s"] / b["img_s"], 3)
        best = max(measured, key=lambda r: r["img_s"], default=None)
        report["targets"] = [{
            "target": "inference img/s", "target_img_s": TARGET_IMG_S,
            "best_variant": best["name"] if best else None, "img_s": best["img_s"] if best else None,
            "met": bool(best and best["img_s"] >= TARGET_IMG_S),
            "comparable": device.type == "cuda" and args.image_size == 1024 and not args.quick,
        }]
        report["summary"] = {r["name"]: r["img_s"] for r in measured}
        return report.finish(stdout)


if __name__ == "__main__":
    main(sys.argv[1:])

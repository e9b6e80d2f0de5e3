"""Training-step throughput of SAM2 variants (img/s, peak memory, MFU), eager bf16 baseline in the same run.

    python benchmarks/train_throughput.py --quick                      # CPU smoke run, < 1 min on 2 cores
    python benchmarks/train_throughput.py --workdir WORK --out t.json  # GPU: synthetic + real-data timings

A step is what ``engine.train`` does per batch: forward with the box prompt under autocast, Dice+BCE + 0.1 × IoU
head loss, backward, grad clipping at 1.0, AdamW (fused on CUDA), ``zero_grad(set_to_none=True)``. Each variant
is timed on a synthetic batch kept on the device ("model_only", as BENCHMARKS.md's table), and, with
``--workdir``, again on real batches from SegDataset + DataLoader (workers, pinned memory) including the host
to device copy ("with_loader"; that is the headline ``img_s`` then).

Variants per backbone (``--variants``): ``bf16`` eager is the baseline on CUDA (``fp32`` on CPU); ``fp32``;
``compile`` (bf16 + ``torch.compile`` of the image encoder in place; only for ``--compile-backbones``; compile
time reported; on failure the variant falls back to eager and the error is in the JSON); ``decoder_only`` (frozen
encoder); ``bottleneck`` and ``lora`` adapters; ``ckpt`` (activation checkpointing, only for
``--ckpt-backbones``, default hiera_l, which gets only the baseline and ``ckpt``). They run in priority order
(see ``plan``) so ``--budget-s`` drops the least informative ones; results are rewritten to ``--out`` after every
variant, so a run cut short by a timeout keeps what it measured.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import common as bench
import torch

from medsam2.engine import runtime
from medsam2.engine.runtime import autocast
from medsam2.losses import create_loss, iou_prediction_loss

# BENCHMARKS.md, one H100 80GB, PyTorch 2.11, synthetic batch, @1024: (variant name, batch) -> img/s.
REFERENCE_H100 = {
    ("hiera_t/full/fp32/eager", 8): 38.5,
    ("hiera_t/full/bf16/eager", 8): 73.0,
    ("hiera_t/full/bf16/compile", 8): 148.4,
    ("hiera_t/decoder_only/bf16/eager", 8): 145.5,
    ("hiera_b+/full/fp32/eager", 8): 24.3,
    ("hiera_b+/full/bf16/eager", 8): 47.3,
    ("hiera_b+/decoder_only/bf16/eager", 8): 103.0,
    ("hiera_l/full/bf16/eager", 4): 21.3,
}
# BENCHMARKS.md targets for the project's training path on real data at 1024 px, one H100.
TARGETS = [
    ("hiera_b+ full fine-tune, real data", "hiera_b+", ("full",), 120.0),
    ("hiera_b+ adapters with frozen trunk, real data", "hiera_b+", ("decoder_only", "bottleneck", "lora"), 180.0),
]
ALL_VARIANTS = ("fp32", "bf16", "compile", "decoder_only", "bottleneck", "lora", "ckpt")


@dataclass(frozen=True)
class Variant:
    backbone: str
    batch: int
    adapter: str = "full"
    precision: str = "bf16"
    compile: bool = False
    ckpt: bool = False
    baseline: bool = False

    @property
    def name(self) -> str:
        return f"{self.backbone}/{self.adapter}/{self.precision}/{'compile' if self.compile else 'eager'}" + (
            "+ckpt" if self.ckpt else ""
        )


def parse_args(argv: list[str] | None):
    ap = bench.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--backbones", default=None, help="comma list (default hiera_t,hiera_b+,hiera_l; quick: hiera_t)")
    ap.add_argument("--variants", default=None,
                    help=f"comma list of {ALL_VARIANTS} (default all; quick: all but bf16, slow on CPU)")
    ap.add_argument("--ckpt-backbones", default=None, help="backbones that get activation checkpointing "
                    "(default hiera_l; quick: hiera_t)")
    ap.add_argument("--batch-large", type=int, default=4, help="batch of hiera_l")
    bench.add_model_args(ap, batch=8, warmup=5, steps=20, reserve_s=150)
    args = ap.parse_args(argv)
    bench.resolve_model_args(args, batch=8, warmup=5, steps=20)
    q = args.quick
    args.backbones = args.backbones or ("hiera_t" if q else "hiera_t,hiera_b+,hiera_l")
    args.ckpt_backbones = args.ckpt_backbones or ("hiera_t" if q else "hiera_l")
    if q:
        args.batch_large = min(args.batch_large, args.batch)
    args.variants = args.variants or ",".join(v for v in ALL_VARIANTS if not (q and v == "bf16"))
    unknown = set(bench.csv(args.variants)) - set(ALL_VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {ALL_VARIANTS}")
    return args


def plan(args, device: torch.device) -> tuple[list[Variant], list[str]]:
    """Variants in priority order, so that ``--budget-s`` drops the least informative last: baselines of every
    backbone but hiera_l, then frozen encoder / adapters, then compile, then hiera_l (+ checkpointing), then the
    other precision. Returns the plan and notes on what was left out and why."""
    base_prec = "bf16" if device.type == "cuda" else "fp32"
    wanted = set(bench.csv(args.variants))
    notes: list[str] = []
    tiers: list[list[Variant]] = [[], [], [], [], []]
    has_ckpt = getattr(runtime, "enable_activation_checkpointing", None) is not None
    for bb in bench.csv(args.backbones):
        large = bb == "hiera_l"
        base = Variant(bb, args.batch_large if large else args.batch, precision=base_prec, baseline=True)
        tiers[3 if large else 0].append(base)
        if not large:
            for adapter in ("decoder_only", "bottleneck", "lora"):
                if adapter in wanted:
                    tiers[1].append(replace(base, adapter=adapter, baseline=False))
            for prec in ("fp32", "bf16"):
                if prec in wanted and prec != base_prec:
                    tiers[4].append(replace(base, precision=prec, baseline=False))
        if "compile" in wanted and bb in bench.csv(args.compile_backbones):
            tiers[2].append(replace(base, compile=True, baseline=False))
        if "ckpt" in wanted and bb in bench.csv(args.ckpt_backbones):
            if has_ckpt:
                tiers[3].append(replace(base, ckpt=True, baseline=False))
            else:
                notes.append(f"{bb}: activation checkpointing skipped: medsam2.engine.runtime has no "
                             "enable_activation_checkpointing(model)")
    return [v for tier in tiers for v in tier], notes


class TrainStep:
    """One optimiser step of ``model`` on a batch dict (as ``runtime.to_device`` returns it)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str) -> None:
        self.model, self.device, self.precision = model, device, precision
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
        self.loss_fn = create_loss("dice_bce")

    def forward_backward(self, batch: dict) -> torch.Tensor:
        with autocast(self.device, self.precision):
            out = self.model(batch["image"], boxes=batch["box"], points=batch["points"],
                             point_labels=batch["point_labels"])
            loss = self.loss_fn(out["logits"], batch["mask"], batch["valid"])
            loss = loss + 0.1 * iou_prediction_loss(out["iou_pred"], out["logits"], batch["mask"], batch["valid"])
        loss.backward()
        return loss

    def __call__(self, batch: dict) -> torch.Tensor:
        loss = self.forward_backward(batch)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)  # returns a tensor: no host sync
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


def run_variant(v: Variant, args, device, real, flops_cache: dict, peak: float | None) -> dict[str, Any]:
    cfg = bench.model_cfg(v.backbone, args.image_size, v.adapter, args.decoder, args.prompt)
    res: dict[str, Any] = {
        "name": v.name, "baseline": v.baseline, "config": bench.config_fields(cfg), "precision": v.precision,
        "compile": v.compile, "activation_checkpointing": v.ckpt, "batch": v.batch,
        "warmup_steps": args.warmup, "timed_steps": args.steps,
    }
    bench.reset_peak_memory(device)
    model = bench.build_model(cfg, device, args.seed).train()
    counts = model.param_count()
    res["trainable_params"], res["total_params"] = counts.trainable, counts.total
    if v.ckpt:
        res["checkpointed_blocks"] = runtime.enable_activation_checkpointing(model)
    step = TrainStep(model, device, v.precision)
    synth = bench.synthetic_batch(v.batch, args.image_size, device, args.seed)

    key = (v.backbone, args.image_size, v.adapter, args.decoder, args.prompt, v.batch)
    if key not in flops_cache:  # one eager forward+backward; also fills SAM2's position-encoding cache
        flops_cache[key] = bench.count_flops(lambda: step.forward_backward(synth))
        step.opt.zero_grad(set_to_none=True)
        if v.ckpt:
            res["flops_note"] = "counted with activation checkpointing: includes the recomputed forward"
    flops = flops_cache[key]
    res["flops_per_step"] = flops
    res["gflop_per_image"] = round(flops / v.batch / 1e9, 2)

    warmup = args.warmup
    if v.compile:
        t0 = time.perf_counter()
        err = bench.compile_image_encoder(model, args.image_size, device, args.compile_backend, args.compile_mode)
        if err is None:
            try:
                step(synth)  # the first call compiles forward and backward
                bench.sync(device)
            except Exception as exc:  # noqa: BLE001 - report and fall back to eager
                err = bench.short_error(exc)
        if err is not None:
            del model, step
            bench.reset_compiler()
            bench.free_memory(device)
            bench.log(f"{v.name}: compile failed, measuring eager instead: {err}")
            res = run_variant(replace(v, compile=False), args, device, real, flops_cache, peak)
            res.update(name=v.name, compile=True, compiled=False, compile_error=err, fell_back_to="eager")
            return res
        res.update(compiled=True, compile_s=round(time.perf_counter() - t0, 2), compile_error=None,
                   compile_backend=args.compile_backend or "inductor", compile_mode=args.compile_mode)
        warmup = max(1, warmup - 1)

    bench.measure(res, step, synth, real, cfg, v.batch, args, device, flops, peak, warmup)
    ref = REFERENCE_H100.get((v.name, v.batch))
    if ref and device.type == "cuda" and "H100" in torch.cuda.get_device_name(device) and args.image_size == 1024:
        res["reference_img_s_model_only"] = ref
    return res


def add_speedups(results: list[dict]) -> None:
    base = {(r["config"]["backbone"], r["config"]["image_size"]): r for r in results if r.get("baseline")}
    for r in results:
        b = base.get((r["config"]["backbone"], r["config"]["image_size"]))
        if not b or not r.get("img_s") or not b.get("img_s"):
            continue
        r["baseline_name"] = b["name"]
        r["speedup_vs_baseline"] = round(r["img_s"] / b["img_s"], 3)
        r["speedup_vs_baseline_model_only"] = round(r["model_only"]["img_s"] / b["model_only"]["img_s"], 3)


def target_checks(results: list[dict], args, real: bool) -> list[dict]:
    out = []
    for label, backbone, adapters, target in TARGETS:
        cands = [r for r in results if r.get("img_s") and r["config"]["backbone"] == backbone
                 and r["config"]["adapter"] in adapters]
        best = max(cands, key=lambda r: r["img_s"], default=None)
        out.append({
            "target": label, "target_img_s": target,
            "best_variant": best["name"] if best else None, "img_s": best["img_s"] if best else None,
            "met": bool(best and best["img_s"] >= target),
            "comparable": real and args.image_size == 1024 and not args.quick,
        })
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = bench.pick_device(args.device)
    with bench.stdout_to_stderr() as stdout:
        report = bench.Report("train_throughput", args, device)
        peak, peak_note = bench.peak_flops(device, args.peak_flops)
        report["mfu_peak_flops"], report["mfu_peak_note"] = peak, peak_note
        report["baseline_precision"] = "bf16" if device.type == "cuda" else "fp32"
        real = None
        if args.workdir is not None:
            real = bench.RealBatches(args.workdir, args.num_workers, args.augment, device, args.seed)
            report["data"] = real.info()
        else:
            report["data"] = {"source": "synthetic", "note": "one random batch kept on the device"}
        variants, notes = plan(args, device)
        for n in notes:
            report.note(n)
        reserve = args.compile_reserve_s if args.compile_reserve_s is not None else (
            150.0 if device.type == "cuda" else 0.0)
        flops_cache: dict = {}
        for v in variants:
            need = reserve if v.compile else 0.0
            if args.budget_s is not None and report.elapsed() + need > args.budget_s:
                report.add({"name": v.name, "baseline": v.baseline, "skipped":
                            f"time budget: {report.elapsed():.0f} s used of {args.budget_s:.0f} s"
                            + (f" (compile needs ~{need:.0f} s)" if need else "")})
                continue
            bench.log(f"{v.name} batch {v.batch} @{args.image_size}")
            try:
                res = run_variant(v, args, device, real, flops_cache, peak)
            except Exception as exc:  # noqa: BLE001 - one failed variant (e.g. OOM) must not lose the others
                res = {"name": v.name, "baseline": v.baseline, "batch": v.batch,
                       "config": bench.config_fields(bench.model_cfg(v.backbone, args.image_size, v.adapter,
                                                                     args.decoder, args.prompt)),
                       "error": bench.short_error(exc), "oom": bench.is_oom(exc)}
            if v.compile:
                bench.reset_compiler()
            bench.free_memory(device)
            bench.log(f"  -> img/s {res.get('img_s')} (model only "
                      f"{(res.get('model_only') or {}).get('img_s')}) {res.get('error') or ''}")
            report.add(res)
        if real is not None:
            real.close()
        measured = [r for r in report["results"] if r.get("img_s")]
        add_speedups(measured)
        report["targets"] = target_checks(measured, args, real is not None)
        report["summary"] = {r["name"]: r["img_s"] for r in measured}
        if device.type == "cuda":
            report.note("img/s 'model_only' reuses one synthetic batch on the device (BENCHMARKS.md's method); "
                        "'with_loader' includes SegDataset + DataLoader + host-to-device copy.")
        return report.finish(stdout)


if __name__ == "__main__":
    main(sys.argv[1:])

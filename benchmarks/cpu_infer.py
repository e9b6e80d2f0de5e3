"""CPU inference: our engines against ``sam2``'s ``SAM2ImagePredictor``, same weights, images and boxes.

For each config (default hiera-t @1024, hiera-t @512, hiera-b+ @1024; random init, seed 0, SAM2's own decoder
and a box prompt, i.e. the plain SAM2 image path that ``SAM2ImagePredictor`` also runs) and each engine:

- ``torch-fp32`` / ``torch-fp32-b6`` (batch 6) / ``torch-bf16`` (the encoder's bf16 twin with chunked
  attention, :class:`medsam2.engine.predict.TorchEngine`) / ``torch-compile`` and ``torch-bf16-compile`` (the
  encoder under inductor with freezing, compile time in ``compile_s``) / ``torch-int8`` (``precision="int8"``:
  the bf16 encoder twin with its Linears in oneDNN int8 where timing shows int8 faster,
  :func:`medsam2.engine.runtime.int8_twin`):
  :func:`medsam2.engine.predict.predict`;
- ``onnx-fp32`` / ``onnx-int8``: the ``medsam2 export`` graphs under ONNX Runtime;
- ``sam2-predictor``: ``SAM2ImagePredictor.set_image`` + ``predict(box=…, multimask_output=False)``;

it measures end-to-end latency per image (file decode → mask at the original size), img/s, achieved GFLOP/s
(forward FLOPs from ``torch.utils.flop_counter``, CPU attention included
(:func:`benchmarks.common.count_flops`; JSONs before 2026-12-07 left it out, so their GFLOP/s are about 28 % low
at 1024 px) × img/s) against the cores' nominal peak and against a
measured fp32 / bf16 GEMM peak (``peak_gflop_s.measured_gemm``), the process's peak RSS, and
Dice/IoU of the masks against ``torch-fp32``'s on the first Kvasir PraNet test images with their ground-truth
boxes. Each engine runs in its own process (clean peak RSS, no shared caches); the first image is a warm-up.
``encoder_once``: one image with 1 and with 6 boxes (the features are reused), the cost of each extra prompt.

    python benchmarks/cpu_infer.py --out benchmarks/results/cpu-infer-$(date +%Y%m%d).json
    python benchmarks/cpu_infer.py --quick        # 64 px, 2 images, a smoke of every engine

Random-init weights give masks near the decision threshold, so the Dice parity of bf16 and int8 here is a
pessimistic figure; ``--checkpoint`` adds the same engines on a trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bench  # noqa: E402

ENGINES = ("torch-fp32", "torch-fp32-b6", "torch-bf16", "torch-compile", "torch-bf16-compile", "torch-int8",
           "onnx-fp32", "onnx-int8", "sam2-predictor")
CONFIGS = ("hiera_t@1024", "hiera_t@512", "hiera_b+@1024")
CHECKPOINT_NOTE = ("a trained checkpoint runs its own recipe (box crop, prior, flip TTA, its decoder) in our engines; "
                   "SAM2ImagePredictor runs the plain SAM2 path on its SAM2 weights, so its speed and masks are "
                   "not the same model's: compare the torch and onnx rows with each other. With model.box_crop "
                   "each box has its own crop, so an extra prompt is a full prediction (encoder_once ~1)")
HEAVY = {"torch-fp32-b6", "torch-compile", "torch-bf16-compile"}  # run on the first config only (time)


def kvasir_items(data: Path, n: int) -> list[tuple[Path, list[float]]]:
    """The first ``n`` PraNet test images and their ground-truth tight boxes (x0,y0,x1,y1 in pixels)."""
    from PIL import Image

    root = data / "kvasir-seg"
    stems = [s.strip() for s in (root / "split_pranet_test.txt").read_text().split() if s.strip()][:n]
    items = []
    for stem in stems:
        m = np.asarray(Image.open(root / "masks" / f"{stem}.jpg").convert("L")) > 127
        ys, xs = np.nonzero(m)
        items.append((root / "images" / f"{stem}.jpg", [float(xs.min()), float(ys.min()), float(xs.max() + 1),
                                                         float(ys.max() + 1)]))
    return items


def peak_gflops(threads: int) -> dict[str, Any]:
    """The cores' peak: threads × clock × 32 fp32 FLOP/cycle (one 512-bit FMA, or two 256-bit), ×2 for bf16 on
    AVX-512 BF16 (VDPBF16PS). An estimate from /proc/cpuinfo, stated as such."""
    from medsam2.engine.runtime import cpu_has_native_bf16

    flags = Path("/proc/cpuinfo").read_text()
    mhz = next((float(line.split(":")[1]) for line in flags.splitlines() if line.startswith("cpu MHz")), 0.0)
    vnni = " avx512_vnni" in flags or " avx_vnni" in flags
    fp32 = threads * mhz / 1000 * 32
    return {"fp32": round(fp32, 1), "bf16": round(fp32 * (2 if cpu_has_native_bf16() else 1), 1),
            "int8": round(fp32 * (4 if vnni else 1), 1),
            "basis": f"{threads} threads x {mhz:.0f} MHz (the nominal clock /proc/cpuinfo reports; boost clocks "
                     "are higher, so a share above 1 is possible) x 32 FP32 FLOP/cycle; bf16 x2 where avx512_bf16, "
                     "int8 x4 where VNNI (int8 ops counted as the model's fp32 FLOPs)"}


def gemm_peak(threads: int, n: int = 2048, seconds: float = 1.0) -> dict[str, float]:
    """Measured peak: GFLOP/s of an (n, n) @ (n, n) matmul in fp32 and bf16 on ``threads`` threads, the best of
    ~``seconds`` of repeats each. What the cores reach at their real (boost) clock, which the nominal
    :func:`peak_gflops` understates (``benchmarks/results/gemm-peak-20261205-amx.json``)."""
    import torch

    old, out = torch.get_num_threads(), {}
    torch.set_num_threads(threads)
    try:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b  # warm-up
            best, t_end = 0.0, time.perf_counter() + seconds
            while time.perf_counter() < t_end:
                t = time.perf_counter()
                a @ b
                best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
            out[name] = round(best, 1)
    finally:
        torch.set_num_threads(old)
    return out


# ---------------------------------------------------------------------------------------------- worker


def _model(backbone: str, size: int, checkpoint: str | None):
    from medsam2.config import ModelCfg
    from medsam2.engine.checkpoint import build_model, load_model

    if checkpoint:
        return load_model(checkpoint)[0]
    model, _ = build_model(ModelCfg(backbone=backbone, image_size=size, adapter="decoder_only", decoder="sam2",
                                    prompt="box"), seed=0)
    return model.eval()


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One engine on one config: timings, peak RSS and the masks (saved to ``spec['masks']``); with
    ``spec['paired']``, then :func:`paired` (after the peak RSS is read)."""
    from medsam2.data.images import read_image_any
    from medsam2.engine.predict import predict
    from medsam2.engine.runtime import pick_device

    pick_device("cpu")  # flush denormals, as predict's callers do
    engine, items = spec["engine"], [(Path(p), b) for p, b in spec["items"]]
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if engine.startswith("onnx"):
        from medsam2.engine.export import OnnxEngine

        net = OnnxEngine(spec["export_dir"], "int8" if engine == "onnx-int8" else "fp32")
    else:
        net = _model(spec["backbone"], spec["size"], spec.get("checkpoint"))
        if engine.endswith("compile"):
            from medsam2.engine.predict import TorchEngine

            net = TorchEngine(net, compile=True)
    if engine == "sam2-predictor":
        sam_pred = _sam2_predictor(net)
    precision = "bf16" if engine.startswith("torch-bf16") else "int8" if engine == "torch-int8" else "fp32"
    extra["load_s"] = round(time.perf_counter() - t0, 2)

    def run(batch: list[tuple[Path, list[float]]]) -> list[np.ndarray]:
        images = [read_image_any(p) for p, _ in batch]
        if engine == "sam2-predictor":
            return [_sam2_predict(sam_pred, img, box) for img, (_, box) in zip(images, batch, strict=True)]
        preds = predict(net, images, boxes=[np.asarray(b, np.float32) for _, b in batch], precision=precision,
                        batch_size=len(batch))
        return [p.mask for p in preds]

    t = time.perf_counter()
    run(items[:1])  # warm-up (and, compiled, the compilation)
    extra["first_call_s"] = round(time.perf_counter() - t, 2)
    for c in getattr(net, "compiled", {}).values():
        extra["compile_s"], extra["compile_error"] = round(c.compile_s or 0, 1), c.error
    bs = 6 if engine == "torch-fp32-b6" else 1
    passes = []  # the best of ``repeats`` timed passes over the images: runs on a shared host vary by ~15 %
    for _ in range(spec.get("repeats", 2)):
        lat, masks = [], []
        t_all = time.perf_counter()
        for i in range(0, len(items), bs):
            t = time.perf_counter()
            masks += run(items[i:i + bs])
            lat.append((time.perf_counter() - t) / len(items[i:i + bs]))
        passes.append((time.perf_counter() - t_all, lat))
    wall, lat = min(passes, key=lambda p: p[0])
    np.savez_compressed(spec["masks"], *masks)
    res = {"engine": engine, "batch": bs, "n_images": len(items), "latency_s_mean": float(np.mean(lat)),
           "latency_s_per_image": [round(v, 3) for v in lat], "img_s": len(items) / wall,
           "passes_s": [round(p[0], 2) for p in passes],
           "peak_rss_mb": bench._rss_hwm_bytes() / 2**20, **extra}
    if spec.get("encoder_once") and engine == "torch-fp32":
        res["encoder_once"] = encoder_once(net, read_image_any(items[0][0]), items[0][1])
    if spec.get("paired") and engine != "sam2-predictor" and bs == 1:
        if engine.startswith("onnx"):  # the same weights in PyTorch, for the predictor
            model = _model(spec["backbone"], spec["size"], spec.get("checkpoint"))
        else:
            model = getattr(net, "model", None) or net  # TorchEngine (compiled) or the Segmenter
        res["paired"] = paired(lambda item: run([item]), _sam2_predictor(model), items)
    return res


def _sam2_predictor(net):
    """``SAM2ImagePredictor`` on ``net``'s SAM2 (the same weights)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    sam_pred = SAM2ImagePredictor(net.sam)
    s = net.image_size  # its feature sizes are written for 1024 px; other sizes need theirs
    sam_pred._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return sam_pred


def _sam2_predict(sam_pred, img: np.ndarray, box: list[float]) -> np.ndarray:
    """``set_image`` + one box → (H,W) bool mask."""
    import torch

    with torch.inference_mode():
        sam_pred.set_image(img)
        m, _, _ = sam_pred.predict(box=np.asarray(box), multimask_output=False)
    return m[0] > 0


def paired(run_one, sam_pred, items: list[tuple[Path, list[float]]]) -> dict[str, Any]:
    """The engine and ``SAM2ImagePredictor`` timed alternately on each image, in one process (A B on even
    images, B A on odd ones), so that both see the same moments of a shared host: the separate processes of the
    main rows ran minutes apart, and on this kind of host the same engine's latency moved by up to 40 % between
    them. ``speedup``: the predictor's median latency over the engine's (both end to end, decode included)."""
    from medsam2.data.images import read_image_any

    _sam2_predict(sam_pred, read_image_any(items[0][0]), items[0][1])  # warm-up
    ours, theirs = [], []
    for i, item in enumerate(items):
        steps = [(ours, lambda it=item: run_one(it)),
                 (theirs, lambda it=item: _sam2_predict(sam_pred, read_image_any(it[0]), it[1]))]
        for times, fn in steps if i % 2 == 0 else steps[::-1]:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    a, b = float(np.median(ours)), float(np.median(theirs))
    return {"engine_s": a, "sam2_predictor_s": b, "speedup": b / a, "n_images": len(items),
            "engine_s_per_image": [round(v, 3) for v in ours],
            "sam2_predictor_s_per_image": [round(v, 3) for v in theirs]}


def encoder_once(net, img: np.ndarray, box: list[float], n: int = 5) -> dict[str, Any]:
    """The end-to-end cost of one more prompt on an already-encoded image (a ``predict`` call whose features
    come from the cache) against a full prediction (median of ``n`` calls each)."""
    from medsam2.engine.predict import FeatureCache, predict

    rng = np.random.default_rng(0)
    b = np.asarray(box, np.float32)
    boxes = [b + rng.uniform(-10, 10, 4).astype(np.float32) for _ in range(n)]
    full, extra = [], []
    for bb in boxes:
        t = time.perf_counter()
        predict(net, [img], boxes=[bb], precision="fp32")
        full.append(time.perf_counter() - t)
    cache = FeatureCache(size=2)
    predict(net, [img], boxes=[b], cache=cache, precision="fp32")
    for bb in boxes:
        t = time.perf_counter()
        predict(net, [img], boxes=[bb], cache=cache, precision="fp32")
        extra.append(time.perf_counter() - t)
    f, e = float(np.median(full)), float(np.median(extra))
    return {"prompts": n, "full_prediction_s": f, "extra_prompt_s": e, "extra_prompt_share": e / f,
            "cache_hits": cache.hits, "target_share": 0.05}


# ---------------------------------------------------------------------------------------------- parent


def _flops(backbone: str, size: int, checkpoint: str | None) -> float:
    import torch

    model = _model(backbone, size, checkpoint)
    x = torch.randn(1, 3, model.image_size, model.image_size)
    box = torch.tensor([[size * 0.2, size * 0.2, size * 0.7, size * 0.7]])
    return bench.count_flops(lambda: model(x, boxes=box)) / 1e9  # (FlopCounterMode fails under no_grad)


def _export(backbone: str, size: int, checkpoint: str | None, d: Path) -> dict[str, Any]:
    from medsam2.config import ExperimentCfg, ModelCfg
    from medsam2.engine.export import export_onnx

    model = _model(backbone, size, checkpoint)
    if checkpoint:
        from medsam2.engine.checkpoint import load_model

        cfg = load_model(checkpoint)[1]
    else:
        cfg = ExperimentCfg(model=ModelCfg(**model.cfg.model_dump()))
    t = time.perf_counter()
    man = export_onnx(model, cfg, d, source=checkpoint or f"random-init {backbone}@{size}", quantize="int8")
    return {"export_s": round(time.perf_counter() - t, 1), "parity_fp32": man["parity_fp32"]}


def _spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                             timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"engine": spec["engine"], "error": f"timed out after {timeout:.0f} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"engine": spec["engine"], "error": bench.short_error(RuntimeError(out.stderr[-1500:]))}
    return json.loads(lines[-1])


def run_config(name: str, args, items, scratch: Path, peak: dict, deadline: float) -> dict[str, Any]:
    ckpt = args.checkpoint if name == "checkpoint" else None
    if ckpt:
        from medsam2.engine.checkpoint import checkpoint_meta

        m = checkpoint_meta(ckpt)["config"]["model"]
        backbone, size = m["backbone"], m["image_size"]
    else:
        backbone, size = name.split("@")
        size = int(args.size or size)
    res: dict[str, Any] = {"config": name, "backbone": backbone, "image_size": size}
    res["gflop_per_image"] = _flops(backbone, size, ckpt)
    engines = [e for e in args.engines if not (e in HEAVY and name != args.configs[0])]
    if any(e.startswith("onnx") for e in engines):
        try:
            res["export"] = _export(backbone, size, ckpt, scratch / f"{name}-onnx")
        except Exception as exc:  # noqa: BLE001 - recorded; the ONNX engines are then skipped
            res["export"] = {"error": bench.short_error(exc)}
            engines = [e for e in engines if not e.startswith("onnx")]
    rows = []
    for engine in engines:
        left = deadline - time.time()
        if left < 30:
            rows.append({"engine": engine, "skipped": "budget"})
            continue
        spec = {"engine": engine, "backbone": backbone, "size": size, "checkpoint": ckpt,
                "items": [(str(p), b) for p, b in items], "export_dir": str(scratch / f"{name}-onnx"),
                "masks": str(scratch / f"{name}-{engine}.npz"), "encoder_once": True, "paired": True}
        bench.log(f"cpu_infer: {name} {engine}")
        row = _spawn(spec, left)
        if "error" not in row:
            prec = "bf16" if engine.startswith("torch-bf16") else "int8" if engine.endswith("int8") else "fp32"
            row["achieved_gflop_s"] = res["gflop_per_image"] * row["img_s"]
            row["share_of_peak"] = row["achieved_gflop_s"] / peak[prec]
            if prec in peak["measured_gemm"]:  # fp32 and bf16 (no int8 GEMM is timed)
                row["share_of_gemm_peak"] = row["achieved_gflop_s"] / peak["measured_gemm"][prec]
            row["peak_basis"] = prec
        rows.append(row)
    ref = scratch / f"{name}-torch-fp32.npz"
    from medsam2.metrics import segmentation_metrics

    base = next((r for r in rows if r["engine"] == "sam2-predictor" and "img_s" in r), None)
    for row in rows:
        f = scratch / f"{name}-{row['engine']}.npz"
        if ref.is_file() and f.is_file():
            a, b = np.load(ref), np.load(f)
            scores = [segmentation_metrics(b[k], a[k]) for k in a.files]
            row["dice_vs_fp32"] = float(np.mean([s["dice"] for s in scores]))
            row["iou_vs_fp32"] = float(np.mean([s["iou"] for s in scores]))
        if base and "img_s" in row:
            row["speedup_vs_sam2_predictor"] = row["img_s"] / base["img_s"]
    res["engines"] = rows
    if ckpt:
        res["note"] = CHECKPOINT_NOTE
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="64 px, 2 images, hiera_t only")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--size", type=int, help="override every config's image size (the smoke uses 64)")
    ap.add_argument("--checkpoint", help="also run the engines on this trained checkpoint (config 'checkpoint')")
    ap.add_argument("--data", help="folder holding kvasir-seg/ (default $MEDSAM2_SAMPLE_DATA)")
    ap.add_argument("--budget-minutes", type=float, default=40.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(bench.finite(worker(json.loads(args.worker)))))
        return {}
    if args.quick:
        args.configs, args.images, args.size = "hiera_t@64", 2, 64
    args.configs = bench.csv(args.configs) + (["checkpoint"] if args.checkpoint else [])
    args.engines = bench.csv(args.engines)
    data = Path(args.data or os.environ.get("MEDSAM2_SAMPLE_DATA") or bench.REPO.parent / "shared" / "data")
    items = kvasir_items(data, args.images)
    import torch

    threads = torch.get_num_threads()
    peak = {**peak_gflops(threads), "measured_gemm": gemm_peak(threads, n=256 if args.quick else 2048)}
    deadline = time.time() + args.budget_minutes * 60
    t0 = time.time()
    result: dict[str, Any] = {"benchmark": "cpu_infer", **bench.cpu_environment(), "cpu": bench.cpu_model(),
                              "peak_gflop_s": peak, "images": [p.name for p, _ in items],
                              "boxes": "ground-truth tight box of each mask", "weights": "random init, seed 0",
                              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "configs": []}
    with tempfile.TemporaryDirectory(prefix="cpu_infer_") as tmp:
        for name in args.configs:
            result["configs"].append(run_config(name, args, items, Path(tmp), peak, deadline))
            bench.write_json(args.out, result)
    result["wall_s"] = round(time.time() - t0, 1)
    result["targets"] = targets(result)
    bench.write_json(args.out, result)
    print(json.dumps(bench.finite(result)))
    return result


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 20's targets on the first config (hiera-t @1024 by default), each with our figure."""
    if not result["configs"]:
        return []
    rows = {r["engine"]: r for r in result["configs"][0]["engines"]}

    def ratio(engine: str) -> float | None:  # the paired, same-process figure where there is one
        row = rows.get(engine, {})
        return (row.get("paired") or {}).get("speedup", row.get("speedup_vs_sam2_predictor"))

    def dice(engine: str) -> float | None:
        return rows.get(engine, {}).get("dice_vs_fp32")

    int8 = max((e for e in ("onnx-int8", "torch-int8") if ratio(e)), key=lambda e: ratio(e) or 0, default=None)
    once = rows.get("torch-fp32", {}).get("encoder_once") or {}
    fp32 = max(("torch-fp32", "onnx-fp32"), key=lambda e: ratio(e) or 0)
    out = [
        {"target": "fp32 >= 1.3x SAM2ImagePredictor", "engine": fp32, "value": ratio(fp32),
         "torch_fp32": ratio("torch-fp32"), "met": (ratio(fp32) or 0) >= 1.3},
        {"target": "bf16 >= 2x, Dice within 0.005 of fp32", "engine": "torch-bf16", "value": ratio("torch-bf16"),
         "dice_vs_fp32": dice("torch-bf16"),
         "met": (ratio("torch-bf16") or 0) >= 2 and (dice("torch-bf16") or 0) >= 0.995},
        {"target": "int8 >= 3x, Dice within 0.01", "engine": int8, "value": ratio(int8) if int8 else None,
         "dice_vs_fp32": dice(int8) if int8 else None,
         "met": bool(int8) and (ratio(int8) or 0) >= 3 and (dice(int8) or 0) >= 0.99},
        {"target": "each extra prompt <= 5 % of a full prediction", "engine": "torch-fp32",
         "value": once.get("extra_prompt_share"), "met": (once.get("extra_prompt_share") or 1) <= 0.05},
    ]
    return out


if __name__ == "__main__":
    main()

"""Shared plumbing of the throughput benchmarks (train, inference, data loader).

Import discipline: this module and the scripts beside it import only ``medsam2.config``, ``medsam2.model``,
``medsam2.engine.runtime``, ``medsam2.data.dataset`` / ``manifest`` and ``medsam2.losses`` at import time, so they run
on a GPU machine that has torch + numpy + the wheels that ``benchmarks/make_device_bundle.sh`` carries (no mlflow,
prefect, ray, great-expectations or pydicom). ``medsam2.data.ingest`` is imported lazily, only to build a work dir.

Conventions every script follows:

* one JSON object on stdout (the last line), also written to ``--out FILE`` after every measured variant
  (``"complete": false`` until the end), so a run killed by a timeout still leaves its partial results;
* progress and library chatter go to stderr;
* timed regions are bracketed by ``torch.cuda.synchronize()``; warm-up steps are excluded; nothing in a timed
  loop reads a value back to the host;
* MFU = FLOPs per step (``torch.utils.flop_counter.FlopCounterMode`` on one eager step of the same model and
  batch) / step time / peak; the peak is the dense bf16 figure of the card (989e12 for H100 SXM, NVIDIA's
  datasheet; ``--peak-flops`` overrides), used as the one yardstick for fp32 variants too. On CPU it is None.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SCHEMA_VERSION = 1
H100_SXM_BF16_DENSE = 989e12
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA datasheets, matched against the device name in order.
PEAK_BF16_DENSE: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", H100_SXM_BF16_DENSE),
    ("H800", H100_SXM_BF16_DENSE),
    ("A100", 312e12),
]
QUICK_IMAGE_SIZE = 64
QUICK_BATCH = 2
QUICK_STEPS = 2


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_info(device: torch.device) -> dict[str, Any]:
    """Who measured: device name, torch/CUDA versions, CPU model and count, Python."""
    info: dict[str, Any] = {
        "type": device.type,
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["sm_count"] = props.multi_processor_count
    else:
        info["torch_threads"] = torch.get_num_threads()
    return info


def peak_flops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s used for MFU, where the figure comes from)."""
    if override:
        return override, "--peak-flops"
    if device.type != "cuda":
        return None, "no peak for CPU: MFU not computed (pass --peak-flops to set one)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_DENSE:
        if key in name:
            return value, f"dense bf16 peak of {key} (NVIDIA datasheet), matched from {name!r}"
    return None, f"unknown GPU {name!r}: pass --peak-flops"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------- measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _rss_hwm_bytes() -> int:
    """Peak resident set size of this process (VmHWM), resettable through /proc/self/clear_refs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)


def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        b = torch.cuda.max_memory_allocated(device)
        return {"peak_mem_bytes": b, "peak_mem_gib": round(b / 2**30, 2), "peak_mem_kind": "cuda_max_allocated"}
    b = _rss_hwm_bytes()
    return {"peak_mem_bytes": b, "peak_mem_gib": round(b / 2**30, 2), "peak_mem_kind": "process_rss_peak"}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as torch's FlopCounterMode sees them (matmuls, convs and attention;
    elementwise ops free), with CPU attention counted: torch has formulas for the CUDA attention kernels but none
    for ``_scaled_dot_product_flash_attention_for_cpu`` (and its backward), so without :func:`_cpu_sdpa_flops`
    every CPU count leaves attention out (83 of hiera-t's 293 GFLOP at 1024 px)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_flops()) as counter:
        fn()
    return int(counter.get_total_flops())


def _cpu_sdpa_flops() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode formulas for PyTorch's CPU flash attention, forward and backward: torch's own SDPA
    formulas (4·B·H·L·S·D forward for q (B,H,L,D), k (B,H,S,D), v (B,H,S,Dv) with Dv = D; 2.5× that backward)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, q, k, v)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def time_steps(step: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step`` after ``warmup`` untimed ones, synchronised on both ends."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0


def throughput_fields(
    images: int, seconds: float, flops_per_step: int | None, steps: int, peak: float | None
) -> dict[str, Any]:
    step_s = seconds / max(1, steps)
    out: dict[str, Any] = {
        "seconds": round(seconds, 4),
        "step_ms": round(1000 * step_s, 3),
        "img_s": round(images / seconds, 3) if seconds > 0 else None,
    }
    if flops_per_step:
        achieved = flops_per_step / step_s if step_s > 0 else None
        out["tflops_achieved"] = round(achieved / 1e12, 3) if achieved else None
        out["mfu"] = round(achieved / peak, 4) if (achieved and peak) else None
    else:
        out["tflops_achieved"] = None
        out["mfu"] = None
    return out


# ---------------------------------------------------------------------------------------------- model


def model_cfg(backbone: str, image_size: int, adapter: str = "full", decoder: str = "sam2", prompt: str = "box"):
    from medsam2.config import ModelCfg

    return ModelCfg(backbone=backbone, image_size=image_size, adapter=adapter, decoder=decoder, prompt=prompt)


def config_fields(cfg) -> dict[str, Any]:
    return {
        "backbone": cfg.backbone,
        "image_size": cfg.image_size,
        "adapter": cfg.adapter,
        "decoder": cfg.decoder,
        "prompt": cfg.prompt,
        "sam2_version": cfg.sam2_version,
        "checkpoint": cfg.checkpoint,
    }


def build_model(cfg, device: torch.device, seed: int = 0) -> torch.nn.Module:
    from medsam2.engine.checkpoint import build_model

    model, _ = build_model(cfg, seed=seed)
    return model.to(device)


def compile_image_encoder(
    model: torch.nn.Module, image_size: int, device: torch.device, backend: str | None, mode: str | None
) -> str | None:
    """``model.sam.image_encoder.compile()`` in place (state-dict keys unchanged); None or the error text.

    SAM2's position encoding fills a per-resolution cache on its first call, which fails a dynamo guard and
    recompiles the whole encoder on the second call (seen here on CPU: one extra full trace). One eager,
    gradient-free forward on a single image beforehand fills the cache so the first compile is the only one.
    Compilation itself is lazy: errors of the backend surface at the first step (the caller catches those).
    """
    try:
        with torch.no_grad():
            model.sam.image_encoder(torch.zeros(1, 3, image_size, image_size, device=device))
        kwargs: dict[str, Any] = {}
        if backend:
            kwargs["backend"] = backend
        if mode:
            kwargs["mode"] = mode
        model.sam.image_encoder.compile(**kwargs)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means: fall back to eager and report it
        return f"{type(exc).__name__}: {exc}"


def reset_compiler() -> None:
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- data


def synthetic_batch(batch: int, size: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A collated batch as ``runtime.to_device`` returns it: normalised image, box-shaped masks, box and one
    positive point per image (inside the box), all on ``device``."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, size, size, generator=g)
    lo = torch.randint(0, size // 4, (batch, 2), generator=g).float()
    hi = lo + torch.randint(size // 4, size // 2, (batch, 2), generator=g).float()
    box = torch.cat([lo, hi], 1)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = (xx[None] >= lo[:, 0, None, None]) & (xx[None] < hi[:, 0, None, None])
    inside &= (yy[None] >= lo[:, 1, None, None]) & (yy[None] < hi[:, 1, None, None])
    out = {
        "image": image,
        "mask": inside[:, None].float(),
        "valid": torch.ones(batch, 1, size, size, dtype=torch.bool),
        "box": box,
        "points": ((lo + hi) / 2)[:, None],
        "point_labels": torch.ones(batch, 1, dtype=torch.int32),
    }
    return {k: v.to(device) for k, v in out.items()}


def read_labelled_rows(workdir: str | Path):
    """Manifest rows with a mask (every split: throughput does not care which), as SegDataset expects."""
    from medsam2.data.manifest import read_manifest

    df = read_manifest(workdir)
    rows = df[df["label_kind"] == "mask"].sort_values("image_id")
    if rows.empty:
        raise SystemExit(f"{workdir}: no labelled (mask) rows in the manifest; ingest Kvasir-SEG there first")
    return rows


def make_loader(
    rows, workdir, cfg, *, batch: int, num_workers: int, augment: str, steps: int, seed: int, pin: bool
):
    """The training path's DataLoader: SegDataset + StepSampler (seeded samples), ``runtime.collate``."""
    from torch.utils.data import DataLoader

    from medsam2.data.dataset import SegDataset, StepSampler
    from medsam2.engine.runtime import collate

    ds = SegDataset(rows, workdir, cfg, augment)
    sampler = StepSampler(len(ds), batch, steps, seed)
    return DataLoader(
        ds,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )


class RealBatches:
    """Endless real batches from an ingested work dir through the real DataLoader (workers, pinned memory).

    One loader per (batch size, image size); its workers start when first asked and live until ``close``, so
    worker start-up is paid once, inside a warm-up, not per variant.
    """

    def __init__(self, workdir: str | Path, num_workers: int, augment: str, device: torch.device, seed: int = 0):
        self.workdir = Path(workdir)
        self.rows = read_labelled_rows(workdir)
        self.num_workers, self.augment, self.device, self.seed = num_workers, augment, device, seed
        self._iters: dict[tuple[int, int], Iterator] = {}

    def info(self) -> dict[str, Any]:
        return {
            "source": "real",
            "workdir": str(self.workdir),
            "images": len(self.rows),
            "datasets": sorted(set(self.rows["dataset"])),
            "num_workers": self.num_workers,
            "augment": self.augment,
            "pin_memory": self.device.type == "cuda",
        }

    def next_fn(self, batch: int, cfg) -> Callable[[], dict[str, torch.Tensor]]:
        from medsam2.engine.runtime import to_device

        key = (batch, cfg.image_size)
        if key not in self._iters:
            loader = make_loader(
                self.rows, self.workdir, cfg, batch=batch, num_workers=self.num_workers, augment=self.augment,
                steps=10**9, seed=self.seed, pin=self.device.type == "cuda",
            )
            self._iters[key] = iter(loader)
        it = self._iters[key]
        return lambda: to_device(next(it), self.device)

    def close(self) -> None:
        self._iters.clear()
        gc.collect()


def default_kvasir_source() -> Path | None:
    for base in (os.environ.get("MEDSAM2_SAMPLE_DATA"), REPO / ".device" / "data", REPO.parent / "shared" / "data",
                 "/work/shared/data"):
        if base and (Path(base) / "kvasir-seg" / "images").is_dir():
            return Path(base) / "kvasir-seg"
    return None


def ingest_subset(source: Path, dest: Path, n: int) -> Path:
    """Copy ``n`` image/mask pairs of a Kvasir-style folder to ``dest/kvasir-seg`` and ingest them into
    ``dest/work`` (lazy import of ``medsam2.data.ingest``); returns the work dir."""
    import shutil

    from medsam2.data.ingest import ingest

    src = dest / "kvasir-seg"
    (src / "images").mkdir(parents=True, exist_ok=True)
    (src / "masks").mkdir(exist_ok=True)
    for p in sorted((source / "images").iterdir())[:n]:
        if (source / "masks" / p.name).exists():
            shutil.copy(p, src / "images" / p.name)
            shutil.copy(source / "masks" / p.name, src / "masks" / p.name)
    ingest(str(src), dest / "work", salt="bench")
    return dest / "work"


# ---------------------------------------------------------------------------------------------- CLI + report


def base_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help=f"CPU smoke run: hiera_t at {QUICK_IMAGE_SIZE} px, "
                    f"batch {QUICK_BATCH}, {QUICK_STEPS} timed steps")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here (rewritten after each variant)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu (--quick forces cpu)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="ingested work dir (Kvasir): feed real batches through the real DataLoader")
    ap.add_argument("--num-workers", type=int, default=None, help="DataLoader workers for --workdir")
    ap.add_argument("--augment", default="light", choices=["none", "light", "strong"])
    ap.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s for MFU (default: by GPU name)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new variant after this many seconds (skipped ones are listed as such)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def add_model_args(ap: argparse.ArgumentParser, *, batch: int, warmup: int, steps: int, reserve_s: int) -> None:
    """The model, compile and timing options shared by the throughput scripts (defaults differ per script)."""
    ap.add_argument("--compile-backbones", default="hiera_t", help="backbones that also run compiled ('' = none)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; quick: eager)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    ap.add_argument("--compile-reserve-s", type=float, default=None, help="with --budget-s: skip a compile "
                    f"variant unless this much budget is left (default {reserve_s} s)")
    ap.add_argument("--image-size", type=int, default=None, help=f"default 1024 (quick: {QUICK_IMAGE_SIZE})")
    ap.add_argument("--batch", type=int, default=None, help=f"default {batch} (quick: {QUICK_BATCH})")
    ap.add_argument("--warmup", type=int, default=None, help=f"untimed steps per variant (default {warmup}; quick: 1)")
    ap.add_argument("--steps", type=int, default=None, help=f"timed steps per variant (default {steps}; "
                    f"quick: {QUICK_STEPS})")
    ap.add_argument("--decoder", default="sam2")
    ap.add_argument("--prompt", default="box")


def resolve_model_args(args: argparse.Namespace, *, batch: int, warmup: int, steps: int) -> None:
    """Fill the defaults of :func:`add_model_args` (and the loader workers) for quick or full mode, in place."""
    q = args.quick
    if q:
        args.device = "cpu"
    args.image_size = args.image_size or (QUICK_IMAGE_SIZE if q else 1024)
    args.batch = args.batch or (QUICK_BATCH if q else batch)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else warmup)
    args.steps = args.steps or (QUICK_STEPS if q else steps)
    args.compile_backend = args.compile_backend or ("eager" if q else None)
    if args.num_workers is None:
        args.num_workers = 0 if q else max(0, min(12, (os.cpu_count() or 2) - 2))


def csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


class Report:
    """The one JSON object a script prints; rewritten to ``--out`` after every variant (partial results)."""

    def __init__(self, benchmark: str, args: argparse.Namespace, device: torch.device) -> None:
        self.t0 = time.perf_counter()
        self.out: Path | None = args.out
        self.data: dict[str, Any] = {
            "benchmark": benchmark,
            "schema_version": SCHEMA_VERSION,
            "complete": False,
            "mode": "quick" if args.quick else "full",
            "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "device": device_info(device),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": [],
            "notes": [],
        }

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def note(self, text: str) -> None:
        self.data["notes"].append(text)

    def add(self, result: dict[str, Any]) -> None:
        self.data["results"].append(result)
        self.save()

    def save(self) -> None:
        self.data["wall_s"] = round(self.elapsed(), 2)
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_json_default))
        os.replace(tmp, self.out)

    def finish(self, stdout) -> dict[str, Any]:
        self.data["complete"] = True
        self.save()
        print(json.dumps(self.data, default=_json_default), file=stdout, flush=True)
        return self.data


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


@contextlib.contextmanager
def stdout_to_stderr():
    """Keep stdout for the one JSON line: anything libraries print goes to stderr meanwhile."""
    real = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        yield real


def short_error(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}"
    text = re.sub(r"\s+", " ", text)
    return text[:limit]


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(res: dict[str, Any], run: Callable[[dict], Any], synth: dict, real, cfg, batch: int, args,
            device: torch.device, flops: int, peak: float | None, warmup: int) -> None:
    """Time ``run(batch)`` on the synthetic batch ("model only") and, when ``real`` is given, on real batches
    through the DataLoader ("with loader", the headline figure); fill ``res`` with throughput and memory."""
    secs = time_steps(lambda: run(synth), warmup, args.steps, device)
    res["model_only"] = throughput_fields(batch * args.steps, secs, flops, args.steps, peak)
    res["with_loader"] = None
    if real is not None:
        nxt = real.next_fn(batch, cfg)
        secs = time_steps(lambda: run(nxt()), max(2, args.warmup), args.steps, device)
        res["with_loader"] = throughput_fields(batch * args.steps, secs, flops, args.steps, peak)
    head = res["with_loader"] or res["model_only"]
    res.update(img_s=head["img_s"], mfu=head["mfu"], data="real" if real is not None else "synthetic")
    res.update(peak_memory(device))


# ---------------------------------------------------------------------------------------------- recipes (CPU profiles)
# Used by the CPU profiles of quality.py and label_efficiency.py only; the throughput scripts do not touch these.

DEMO_CONFIG = REPO / "configs" / "demo.yaml"
#: Dotted keys a prompt-free model must not inherit from a box-prompted recipe, listed in one place. Beyond these,
#: ``recipe_config(..., prompt_free=True)`` also drops every model key of the recipe whose name contains "box"
#: (box_mask, box_jitter, box_prior, box_crop, … as the demo recipe grows) and, should validation still object,
#: the recipe keys that the validation error names.
BOX_ONLY_KEYS: tuple[str, ...] = ("model.box_mask", "model.box_prior", "model.box_crop", "model.box_jitter")
PROMPT_FREE_OVERRIDES: dict[str, Any] = {"model.prompt": "none", "model.decoder": "prompt_free"}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _pop_dotted(tree: dict[str, Any], key: str) -> Any:
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
        node = node.get(p)
        if not isinstance(node, dict):
            return None
    return node.pop(leaf, None)


def _put_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def recipe_config(overrides: dict[str, Any], *, path: str | Path = DEMO_CONFIG, prompt_free: bool = False):
    """The recipe file (default ``configs/demo.yaml``) with explicit dotted ``overrides`` → (validated
    ``ExperimentCfg``, a JSON-ready record of exactly what was changed).

    The recipe's own values (image_size, decoder, adapter, box prompt fields, lr, batch, warmup, augment, loss,
    ema, …) are kept unless ``overrides`` names them. With ``prompt_free`` the model becomes prompt-free
    (:data:`PROMPT_FREE_OVERRIDES`) and the recipe's box-only keys are dropped (library defaults apply); each drop
    is recorded with the recipe's value and the reason.
    """
    import copy

    import yaml
    from pydantic import ValidationError

    from medsam2.config import ExperimentCfg

    path = Path(path)
    text = path.read_text()
    recipe = yaml.safe_load(text) or {}
    tree = copy.deepcopy(recipe)
    overrides = {**(PROMPT_FREE_OVERRIDES if prompt_free else {}), **overrides}
    dropped: dict[str, dict[str, Any]] = {}
    if prompt_free:
        flat = _flatten(recipe)
        named = [k for k in flat if k.startswith("model.") and "box" in k.split(".")[-1]]
        for key in dict.fromkeys([*BOX_ONLY_KEYS, *named]):
            if key in flat and key not in overrides:
                dropped[key] = {"recipe_value": _pop_dotted(tree, key), "reason": "box-only: prompt-free model"}
    for key, value in overrides.items():
        _put_dotted(tree, key, value)
    for _ in range(8):
        try:
            cfg = ExperimentCfg.model_validate(tree)
            break
        except ValidationError as exc:
            # e.g. "model.box_foo needs model.prompt=box": drop recipe keys the error names (never our overrides)
            flat = _flatten(tree)
            culprits = [k for k in flat if k not in overrides and re.search(rf"\b{re.escape(k)}\b", str(exc))]
            if not prompt_free or not culprits:
                raise
            for key in culprits:
                dropped[key] = {"recipe_value": _pop_dotted(tree, key), "reason": f"validation: {short_error(exc)}"}
    else:
        raise ValueError(f"{path}: could not make a valid config from the recipe and {overrides}")
    import hashlib

    return cfg, {
        "recipe": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path),
        "recipe_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "recipe_values": recipe,
        "overrides": {k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()},
        "dropped": dropped,
        "resolved": cfg.model_dump(mode="json"),
    }


@contextlib.contextmanager
def robustness_subset(severities: tuple[int, ...], corruptions: tuple[str, ...] | None = None):
    """Let ``medsam2.engine.evaluate`` run its own corruption suite at only these severities and, if given, only
    these corruptions (module constants of ``evaluate`` set for the duration, restored after): the CPU profiles
    evaluate severity 3 only to keep evaluation cheap. Unknown corruption names are an error."""
    from medsam2.engine import evaluate as ev

    old = ev.ROBUSTNESS_SEVERITIES, ev.IMAGE_CORRUPTIONS, ev.PROMPT_CORRUPTIONS
    if corruptions is not None:
        unknown = sorted(set(corruptions) - set(old[1]) - set(old[2]))
        if unknown:
            raise ValueError(f"unknown corruptions {unknown}; known: {', '.join(old[1] + old[2])}")
        ev.IMAGE_CORRUPTIONS = tuple(c for c in old[1] if c in corruptions)
        ev.PROMPT_CORRUPTIONS = tuple(c for c in old[2] if c in corruptions)
    ev.ROBUSTNESS_SEVERITIES = tuple(severities)
    try:
        yield
    finally:
        ev.ROBUSTNESS_SEVERITIES, ev.IMAGE_CORRUPTIONS, ev.PROMPT_CORRUPTIONS = old


def finite(x: Any) -> Any:
    """NaN/inf → None and numpy scalars → Python, recursively, so the JSON is standard."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    """Atomic write of ``data`` (finite-cleaned) to ``path`` (no-op for None)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(finite(data), indent=1, default=_json_default))
    os.replace(tmp, path)


def cpu_environment() -> dict[str, Any]:
    """The measuring machine of a CPU profile: device "cpu", CPU model, cores, torch threads and version."""
    return {"device": "cpu", "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "git_commit": git_commit()}

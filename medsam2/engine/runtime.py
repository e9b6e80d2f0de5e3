"""Device, precision and batch plumbing shared by training, evaluation and prediction."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import re
import time
import weakref
from pathlib import Path

import torch

from medsam2.engine import cpu_linear
from medsam2.model import cpu_layout
from medsam2.model.segmenter import for_encoding, normalize

log = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU. On CPU, denormal floats are flushed to zero: a randomly
    initialised SAM2 has tiny gradients whose squares (AdamW's second moment) are denormal, and x86 arithmetic on
    denormals is ~100× slower — measured on 2 cores at 128 px, batch 8: the AdamW step took ~5 s of a ~11 s step,
    and nothing after the flush. Values below 1.2e-38 become 0; no result of ours depends on them."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
        keep_freed_memory()
    return device


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory of freed large tensors for the next ones instead of returning it to
    the system (``mallopt``: no mmap for large blocks, trim above 1 GiB only). PyTorch's CPU allocator is malloc;
    by default every tensor above 32 MB is a fresh ``mmap`` whose pages fault in on first touch, and a 1024 px
    Hiera forward allocates dozens of them. On 2 cores (2026-12-03, bf16 hiera-t encoder @1024, two processes
    each way) it took 0.654 / 0.685 s per image by default and 0.582 / 0.565 s with this, peak RSS unchanged
    (1.4-1.6 GB). Returns whether it applied: not where the C library is not glibc, nor with
    ``MEDSAM2_MALLOC=system``."""
    import ctypes
    import os

    if os.environ.get("MEDSAM2_MALLOC", "") == "system":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


@functools.cache
def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has AMX tiles for bf16 (``amx_bf16``; False where unknown): oneDNN's matmuls and
    PyTorch's CPU flash attention run on them (:func:`~medsam2.engine.cpu_attention.chunked_attention_pays`)."""
    return _cpu_flag(r"amx_bf16", cpuinfo)


def _cpu_flag(pattern: str, cpuinfo: str) -> bool:
    """Whether a whole word of ``cpuinfo`` matches ``pattern`` (False where the file cannot be read)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    return re.search(rf"\b({pattern})\b", text) is not None


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX-BF16 flags; False where unknown).

    Without them PyTorch emulates bf16 matmuls and convolutions: on 2 AVX2-only EPYC cores the demo recipe took
    12.1 s per training step under bf16 autocast against 1.2 s in fp32 (it was 0.34 s with bf16 on a host with
    AVX-512 BF16)."""
    return _cpu_flag(r"avx512_bf16|amx_bf16", cpuinfo)


def effective_precision(device: torch.device, precision: str = "auto") -> str:
    """``bf16`` or ``fp32``: bf16 on CUDA unless ``fp32``; on CPU fp32 unless ``bf16`` is asked for and the CPU
    has native bf16 (:func:`cpu_has_native_bf16`): emulated bf16 is ~10x slower, so it falls back to fp32, with
    a warning."""
    if precision == "fp32":
        return "fp32"
    if device.type != "cpu":
        return "bf16"
    if precision != "bf16":  # auto on CPU
        return "fp32"
    if not cpu_has_native_bf16():
        _warn_emulated_bf16()
        return "fp32"
    return "bf16"


def inference_precision(device: torch.device, precision: str = "auto") -> str:
    """What prediction runs: as :func:`effective_precision`, except that ``auto`` on a CPU with native bf16 is
    bf16. Measured on 2 AVX-512 BF16 cores (benchmarks/results/cpu-infer-20261203.json, the bf16 twin with
    chunked attention): 2.2-2.8x fp32's img/s (hiera-t @1024 2.25x, @512 2.83x, hiera-b+ @1024 2.30x), masks of
    6 Kvasir test images at Dice 0.996-0.997 against fp32's with random weights; on the demo champion the
    autocast path before it gave Dice 0.9997 (cpu-infer-20261202.json). On 2 AMX cores
    (cpu-infer-20261204-amx-t1024.json, hiera-t @1024, 6 Kvasir test images): bf16 0.434 s per image, 3.37x
    ``SAM2ImagePredictor``'s 1.46 s, against fp32's 1.27 s (1.15x), masks at Dice 0.996 against fp32's.
    ``fp32`` stays available (``--precision fp32``). ``int8`` (on CPU; bf16 elsewhere): the bf16 encoder twin
    with its Linears in int8 where timing shows int8 faster (:func:`int8_twin`), opt-in: on 2 AMX cores it is no
    faster than bf16 (0.48 against 0.43 s per image, 3.20x against 3.53x the predictor, Dice 0.998 against
    fp32's, cpu-infer-20261204-amx-int8-autotuned.json); CPUs without AMX are not measured yet."""
    if precision == "auto" and device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "int8":
        if device.type == "cpu":
            return "int8"
        log.warning("precision int8 is for CPUs (oneDNN int8 Linears); running bf16 on %s", device.type)
        return "bf16"
    return effective_precision(device, precision)


@functools.cache
def _warn_emulated_bf16() -> None:
    log.warning("precision bf16 asked for, but this CPU has no native bf16 (avx512_bf16 / amx_bf16): running "
                "fp32 instead (emulated bf16 is ~10x slower)")


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast where :func:`effective_precision` says bf16; else fp32 (no autocast)."""
    if effective_precision(device, precision) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model → {dtype: (weights state, twin)}"""


def _weights_state(model: torch.nn.Module) -> tuple:
    """Where each parameter and buffer lives and its in-place version: any ``load_state_dict``, optimiser step or
    ``.to()`` changes it."""
    return tuple((t.data_ptr(), t._version, t.dtype) for t in (*model.parameters(), *model.buffers()))


def cpu_bf16_active(x: torch.Tensor) -> bool:
    """Whether ``x`` is on CPU inside a bf16 autocast region (what :func:`autocast` opens for ``bf16``)."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def encoder_twin(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An encode-only copy of ``model`` for CPU inference (eval mode,
    :func:`~medsam2.model.segmenter.for_encoding`: the neck's unread position encoding skipped, Hiera's position
    embedding kept per size; convolution weights channels-last), cached per model and ``dtype`` until the
    model's weights change (:func:`_weights_state`).

    ``float32``: the twin shares the model's parameters and buffers (no second copy of the weights) except its
    convolution weights, copied channels-last. On 2 AMX cores (hiera-t @1024, same process, 2026-12-04) the fp32
    encoder went 1.21-1.33 → 1.06-1.09 s, features equal to 1e-6. ``bfloat16``: :func:`bf16_twin`;
    ``qint8``: :func:`int8_twin`.

    Channels-last is the layout of Hiera's (B,H,W,C) features that the neck's convolutions receive: without it
    oneDNN copied the 256-channel 256×256 map into NCHW for the next convolution.

    The fp32 and bf16 twins' image-encoder Linears are :class:`~medsam2.engine.cpu_linear.OnednnLinear` (bias
    and the MLPs' GELU fused into oneDNN's GEMM; the same weights): on 2 AMX cores (2026-12-05, hiera-t @1024,
    same host, one process each) the fp32 prediction went 1.45 → 1.24 s per image, features equal to 1e-5.
    All twins pool with :class:`~medsam2.model.cpu_layout.StridedMaxPool` (Hiera's q-pooling without a copy)."""
    state = _weights_state(model)
    twins = _TWINS.setdefault(model, {})
    cached = twins.get(dtype)
    if cached is not None and cached[0] == state:
        return cached[1]
    if dtype == torch.float32:
        convs = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
        memo = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in convs}
        twin = _channels_last_convs(for_encoding(copy.deepcopy(model, memo)).eval())
        cpu_linear.onednn_linears(_image_encoder(twin))
    elif dtype == torch.qint8:  # its own copy of the weights: the quantised Linears replace theirs
        twin = _int8_twin(model)
    else:
        twin = for_encoding(copy.deepcopy(model)).to(dtype, memory_format=torch.channels_last).eval()
        for p in twin.parameters():
            p.requires_grad_(False)
        cpu_linear.onednn_linears(_image_encoder(twin))
    cpu_layout.strided_max_pools(_image_encoder(twin))  # every twin, the int8 fallback's too
    twins[dtype] = (state, twin)
    return twin


def _image_encoder(twin: torch.nn.Module) -> torch.nn.Module:
    """The SAM2 image encoder of a twin (the twin itself where it is one)."""
    return twin.sam.image_encoder if hasattr(twin, "sam") else twin


def _channels_last_convs(twin: torch.nn.Module) -> torch.nn.Module:
    """In place: every ``Conv2d`` weight of ``twin`` channels-last (and frozen)."""
    for m in twin.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.requires_grad_(False)
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return twin


def int8_twin(model: torch.nn.Module) -> torch.nn.Module:
    """An int8 :func:`encoder_twin` of ``model``: every ``nn.Linear`` of its image encoder (Hiera's attention
    and MLP projections: with attention, where the encoder's FLOPs are) in int8.

    Where PyTorch has oneDNN's int8 Linear (:func:`~medsam2.engine.cpu_int8.available`): the bf16 twin (fp32 on
    CPUs without native bf16) with :class:`~medsam2.engine.cpu_int8.Int8Linear` in place of those Linears
    (activations quantised per call, GELU fused; see :mod:`~medsam2.engine.cpu_int8`). Elsewhere the fp32 twin
    with ``torch.ao``'s dynamic int8 Linears (:func:`_int8_linears`). Feed it inputs in the dtype of its
    parameters."""
    return encoder_twin(model, torch.qint8)


def _int8_twin(model: torch.nn.Module) -> torch.nn.Module:
    from medsam2.engine import cpu_int8

    if not cpu_int8.available():
        return _int8_linears(_channels_last_convs(for_encoding(copy.deepcopy(model)).eval()))
    dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    twin = for_encoding(copy.deepcopy(model)).to(dtype, memory_format=torch.channels_last).eval()
    cpu_int8.int8_linears(_image_encoder(twin))
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def _int8_linears(twin: torch.nn.Module) -> torch.nn.Module:
    """In place, the fallback where PyTorch lacks oneDNN's int8 Linear (:func:`_int8_twin`): the image
    encoder's ``nn.Linear`` → ``torch.ao`` dynamic int8 (weights int8 per output channel, activations quantised
    per tensor at run time, fp32 in and out), packed for oneDNN where PyTorch has it, else for its default
    quantised engine. Chosen by measurement on 2 AMX cores (2026-12-04, the 20 Linear
    shapes of hiera-t @1024 weighted by their count, one image): fp32 570 ms, int8 x86/fbgemm 215 ms, int8
    oneDNN 122 ms. The packed weights keep their engine, so the global setting is restored afterwards."""
    import warnings

    encoder = _image_encoder(twin)
    engines = torch.backends.quantized.supported_engines
    before = torch.backends.quantized.engine
    try:
        if "onednn" in engines:
            torch.backends.quantized.engine = "onednn"
        with warnings.catch_warnings():  # torch.ao's deprecation notice is PyTorch's, not the user's concern
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(encoder, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    finally:
        torch.backends.quantized.engine = before
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin.eval()


def bf16_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A bf16 :func:`encoder_twin` of ``model`` (weights and buffers cast to bfloat16) for CPU inference.

    Run without autocast on bf16 inputs (what :class:`~medsam2.engine.predict.TorchEngine` does), it avoids
    autocast's per-call weight casts and fp32 layer norms: alone that was 2 % faster end to end (1.04 → 1.02 s per
    1024 px hiera-t image, 2 AVX-512 BF16 cores, same process, 2026-12-03); the larger gain is the chunked
    attention it makes possible (:mod:`~medsam2.engine.cpu_attention`: 1.48 → 1.17 s with both). Its features
    differ from fp32's by 1.1 % (relative L2) against autocast's 0.9 %. Costs one more copy of the weights at half
    their size. On 2 AMX cores (2026-12-03, same process, hiera-t @1024, features bit-identical) the encoder
    went 0.975 → 0.926 s with contiguous attention inputs, → 0.830 s with the position encoding skipped too,
    → 0.668 s with channels-last as well."""
    return encoder_twin(model, torch.bfloat16)


class InferenceCompiled:
    """``torch.compile`` (inductor with ``freezing``: weights folded in as constants and, on CPU, prepacked for
    oneDNN) of an inference-only module, compiled on its first call. Where that fails (no C++ compiler, an op
    inductor cannot lower) it runs the eager module from then on, with the reason in ``error`` (and a warning).
    ``compile_s``: the first call's seconds (compilation included). On hiera-t @1024, 2 cores, it does not pay:
    one A/B process gave 16 s to compile, then 1.075 against 1.098 s per image eager in bf16 (2 %); the
    benchmark (cpu-infer-20261203.json) 322 s to compile, then 1.20 against 1.06 s eager in bf16 and 2.56
    against 2.39 s in fp32. So it is opt-in (``TorchEngine(compile=True)``)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.compiled = torch.compile(module, options={"freezing": True})
        self.compile_s: float | None = None
        self.error: str | None = None

    def __call__(self, *args, **kwargs):
        if self.error is None:
            t = time.perf_counter()
            try:
                out = self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any backend failure means: run eager
                self.error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("torch.compile failed, predicting eager: %s", self.error)
            else:
                if self.compile_s is None:
                    self.compile_s = time.perf_counter() - t
                return out
        return self.module(*args, **kwargs)


def collate(samples: list[dict]) -> dict:
    """Stack sample dicts (see ``data.dataset``) into a batch; ``index`` becomes a (B,) long tensor."""
    out = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else torch.as_tensor(vals)
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a collated batch to ``device`` (non-blocking) and normalise ``image`` for SAM there."""
    out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out["image"] = normalize(out["image"])
    return out


def enable_activation_checkpointing(model) -> int:
    """Recompute each Hiera block's activations in the backward pass instead of storing them (large backbones
    at 1024 px: trades ~30 % more compute for a large memory cut). Patches ``block.forward`` in place so the
    state-dict keys do not change; returns the number of blocks wrapped."""
    import functools

    from torch.utils.checkpoint import checkpoint

    n = 0
    for block in model.sam.image_encoder.trunk.blocks:
        if getattr(block, "_medsam2_ckpt", False):
            continue
        plain = block.forward
        block.forward = functools.partial(checkpoint, plain, use_reentrant=False)
        block._medsam2_ckpt = True
        n += 1
    return n


def compile_encoder(model) -> str | None:
    """``torch.compile`` the image encoder in place (keys unchanged). Returns None, or the error that made it
    fall back to eager."""
    try:
        # SAM2's position encoding fills a cache on its first call; warming it eagerly first avoids a second,
        # full recompile of the encoder on the next call.
        p = next(model.parameters())
        with torch.no_grad():
            model.sam.image_encoder(torch.zeros(1, 3, model.image_size, model.image_size, device=p.device))
        model.sam.image_encoder.compile()
        return None
    except Exception as exc:  # noqa: BLE001 - any backend failure means: run eager
        return f"{type(exc).__name__}: {exc}"

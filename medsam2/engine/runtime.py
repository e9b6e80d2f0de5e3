"""Device, precision and batch plumbing shared by training, evaluation and prediction."""

from __future__ import annotations

import contextlib

import torch

from medsam2.model.segmenter import normalize


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU. On CPU, denormal floats are flushed to zero: a randomly
    initialised SAM2 has tiny gradients whose squares (AdamW's second moment) are denormal, and x86 arithmetic on
    denormals is ~100× slower — measured on 2 cores at 128 px, batch 8: the AdamW step took ~5 s of a ~11 s step,
    and nothing after the flush. Values below 1.2e-38 become 0; no result of ours depends on them."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    return device


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast on CUDA unless ``precision == "fp32"``; fp32 (no autocast) on CPU unless asked."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


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

"""bf16 attention for CPU inference: query-chunked matmul + softmax instead of PyTorch's CPU flash kernel.

On CPU, ``F.scaled_dot_product_attention`` runs a flash-attention kernel whose bf16 speed is its fp32 speed: on
2 AVX-512 BF16 cores (2026-12-03) a global Hiera-t block at 1024 px, q/k/v (1,4,4096,96), took 0.167 s in bf16
(155 GFLOP/s) — half of hiera-t's encoder time at 1024 px is there. Two bf16 matmuls with the softmax between them,
over 256 queries at a time (so a chunk's (B,H,256,N) scores stay in cache), took 0.091 s; the windowed blocks'
shapes ((1024,1,64,96), (25,4,196,96), (25,8,49,96)) went from 0.020 / 0.013 / 0.0036 s to 0.011 / 0.0054 /
0.0014 s. The cost is the softmax in bf16: relative error 0.0048 against fp32 attention, where the flash kernel's
bf16 has 0.0023.

:class:`ChunkedCpuAttention` is a ``TorchFunctionMode``: SAM2's modules stay as they are (no fork, no patched
forward), and inside the ``with`` block every call of ``scaled_dot_product_attention`` that this covers — CPU,
bf16, no mask, no dropout, not causal, no gradient — takes the chunked path; any other call runs PyTorch's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

QUERY_CHUNK = 256
"""Queries per chunk; of 64, 128, 256 and 512, 256 was as fast as the best on every Hiera-t shape (512 was 2.3×
slower on the global block: its scores no longer fit in cache)."""


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                      chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v for q (…,Nq,D), k (…,Nk,D), v (…,Nk,Dv), ``chunk`` queries at a time; (…,Nq,Dv)
    in q's dtype. ``scale`` defaults to 1/√D, as in ``scaled_dot_product_attention``."""
    # SAM2's q, k, v are transposed views: made contiguous once here, not by every chunk's matmul (each chunk
    # re-copied kᵀ: 98 ms of a 0.98 s bf16 encoder on 2 AMX cores, 2026-12-03)
    q = (q * (q.shape[-1] ** -0.5 if scale is None else scale)).contiguous()
    kt = k.transpose(-1, -2).contiguous()
    v = v.contiguous()
    # the softmax runs in place on the scores, and every full chunk reuses one scores buffer: hiera-t's bf16
    # prediction at 1024 px went 1.029-1.042 → 1.009-1.029 s (2 AVX-512 BF16 EPYC cores, same process, 2026-12-07)
    n = q.shape[-2]
    if n <= chunk:
        s = torch.matmul(q, kt)
        return torch.softmax(s, -1, out=s) @ v
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    scores: dict[int, torch.Tensor] = {}  # rows → buffer (the last chunk may be shorter)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        s = scores[m] = torch.matmul(q[..., i:i + m, :], kt, out=scores.get(m))
        torch.matmul(torch.softmax(s, -1, out=s), v, out=out[..., i:i + m, :])
    return out


def _covered(args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...] | None:
    """(q, k, v) of a ``scaled_dot_product_attention`` call that :func:`chunked_attention` computes, else None."""
    names = ("query", "key", "value")
    if len(args) > 3 or set(kwargs) - {*names, "scale", "attn_mask", "dropout_p", "is_causal"}:
        return None  # a positional mask or dropout, or enable_gqa: PyTorch's own
    if kwargs.get("attn_mask") is not None or kwargs.get("dropout_p", 0.0) or kwargs.get("is_causal", False):
        return None
    qkv = (*args, *(kwargs.get(n) for n in names[len(args):]))
    if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in qkv):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in qkv):
        return None
    return qkv


def chunked_attention_pays() -> bool:
    """Whether :class:`ChunkedCpuAttention` is faster here than PyTorch's CPU flash kernel: where the CPU has no
    AMX. The figures above are from 2 AVX-512 BF16 EPYC cores; on 2 Xeon cores with AMX (2026-12-03) the flash
    kernel won on every Hiera-t shape at 1024 px, SAM2's transposed q/k/v as given: the global block 30 against
    121 ms, the windowed ones 6.6 / 16.8 / 3.3 / 1.1 against 8.8 / 38.4 / 4.5 / 1.8 ms, and the whole bf16
    encoder (hiera-t @1024, same process) took 0.412 s without the chunking against 0.517 s with it (@512:
    0.092 against 0.106 s)."""
    from medsam2.engine.runtime import cpu_has_amx

    return not cpu_has_amx()


class ChunkedCpuAttention(TorchFunctionMode):
    """Inside ``with ChunkedCpuAttention():``, CPU bf16 inference calls of ``scaled_dot_product_attention`` run
    :func:`chunked_attention`; everything else is untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and (qkv := _covered(args, kwargs)) is not None:
            return chunked_attention(*qkv, kwargs.get("scale"))
        return func(*args, **kwargs)

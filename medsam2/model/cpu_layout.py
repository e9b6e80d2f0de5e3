"""Memory-layout hooks on SAM2's mask decoder for CPU inference: the same arithmetic, without strided passes.

SAM2's decoder mixes layouts on CPU. Its two-way transformer flattens the (B,256,h,w) image embedding and the
dense positional encoding to (B,h·w,256) by a permute, which is a strided view unless the map is channels-last,
and then adds them token-wise seven times (a strided 4 MB add took 2.8 ms against 0.27 ms dense on 2 cores).
The positional encoding is channels-last, but ``predict_masks`` copies it to NCHW (``repeat_interleave``). Its
first transposed convolution reads a channels-last view whose size-1 batch stride is not the canonical one, which
oneDNN takes for NCHW: 9.6 ms instead of 2.7 ms for the same strides written canonically (hiera-t @1024). With
SAM2's features kept channels-last (as the encoder makes them), these hooks bring an extra prompt on a cached
image from ~77 to ~55 ms (:mod:`benchmarks.cpu_infer`'s ``encoder_once``).

For the image encoder's twins, :func:`strided_max_pools` swaps Hiera's ``MaxPool2d`` (its q-pooling at each stage
change, fed a channels-last view of a strided slice of the qkv projection, which the pooling kernel first copied)
for :class:`StridedMaxPool`: the same maxima read in place (q-pool of hiera-t @1024's stage 2: 10.6 → 3.9 ms).

The decoder's hooks are forward pre-hooks, so the module tree and its ``state_dict`` keys stay SAM2's. They act
only on CPU with autograd off and outside tracing, compiling and export. The convolutions sum in another order
by layout, so logits move by fp32 rounding only (~1e-7 at 128 and 1024 px; tested).
"""

from __future__ import annotations

import torch
from torch import nn

CL = torch.channels_last


def _active(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and x.dim() == 4
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and not torch.compiler.is_exporting())


def canonical_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A channels-last (B,C,H,W) tensor restrided with its canonical strides (H·W·C, 1, W·C, C), the same
    elements without a copy; any other tensor as it is."""
    if not x.is_contiguous(memory_format=CL):
        return x
    b, c, h, w = x.shape
    strides = (h * w * c, 1, w * c, c)
    return x if x.stride() == strides else x.as_strided(x.shape, strides)


def _transformer_inputs(module: nn.Module, args: tuple) -> tuple | None:
    """``TwoWayTransformer(image_embedding (B,C,h,w), image_pe (B,C,h,w), point_embedding (B,N,C))``: both maps
    channels-last, so that their (B,h·w,C) token views are dense."""
    emb, pe, *rest = args
    if not _active(emb):
        return None
    return (emb.contiguous(memory_format=CL), pe.contiguous(memory_format=CL), *rest)


def _upscale_input(module: nn.Module, args: tuple) -> tuple | None:
    """The first upscaling convolution's (B,256,h,w) input with canonical channels-last strides."""
    x, *rest = args
    if not _active(x):
        return None
    return (canonical_channels_last(x), *rest)


def install(mask_decoder: nn.Module) -> None:
    """Register the hooks on ``sam.sam_mask_decoder`` (once; a second call does nothing)."""
    if getattr(mask_decoder, "_medsam2_cpu_layout", False):
        return
    mask_decoder.transformer.register_forward_pre_hook(_transformer_inputs)
    mask_decoder.output_upscaling[0].register_forward_pre_hook(_upscale_input)
    mask_decoder._medsam2_cpu_layout = True


class StridedMaxPool(nn.Module):
    """``MaxPool2d(k, stride=k)`` (no padding, floor mode) as the elementwise maximum of the k² strided
    sub-grids of its (B,C,H,W) input, read where they lie: no copy of a channels-last or strided input. The
    same values as the pooling it replaces (NaN propagates as there); the output keeps the input's layout."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k
        h, w = x.shape[-2] // k * k, x.shape[-1] // k * k
        out = None
        for i in range(k):
            for j in range(k):
                part = x[..., i:h:k, j:w:k]
                out = part if out is None else torch.maximum(out, part)
        return out


def _plain_pool(m: nn.Module) -> int | None:
    """k for a ``MaxPool2d`` that :class:`StridedMaxPool` reproduces (square kernel = stride, no padding,
    no dilation, floor mode, no indices); else None."""
    if not isinstance(m, nn.MaxPool2d) or m.ceil_mode or m.return_indices:
        return None
    k, s, p, d = (v if isinstance(v, tuple) else (v, v) for v in (m.kernel_size, m.stride, m.padding, m.dilation))
    return k[0] if k[0] == k[1] and s == k and p == (0, 0) and d == (1, 1) else None


def strided_max_pools(module: nn.Module) -> int:
    """In place: every plain ``MaxPool2d`` under ``module`` (Hiera's q-pooling) → :class:`StridedMaxPool`.
    For inference twins only (a parameter-free swap, but ``MaxPool2d``'s backward is the one PyTorch tests).
    Returns how many were swapped."""
    swaps = [(parent, name, k) for parent in module.modules() for name, child in parent.named_children()
             if (k := _plain_pool(child)) is not None]
    for parent, name, k in swaps:
        setattr(parent, name, StridedMaxPool(k))
    return len(swaps)

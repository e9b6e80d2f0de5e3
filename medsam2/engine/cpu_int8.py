"""int8 Linears for CPU inference on oneDNN: int8 weights, int8 activations quantised per call, bf16 around them.

``torch.ao``'s dynamic int8 Linear takes and returns fp32, so a model running it keeps fp32 everywhere else; on
2 AMX cores (2026-12-04) that stopped at 0.66 s per hiera-t @1024 image against bf16's 0.40 s. Here each of the
image encoder's Linears becomes an :class:`Int8Linear`: its input (bf16 or fp32, any leading dims) is quantised to
uint8 per tensor with that call's own min and max (no calibration set, nothing clipped), multiplied on oneDNN's
int8 kernel (``onednn::qlinear_pointwise``: int8 weights per output channel, prepacked once) and returned in the
input's dtype, with the MLP's GELU fused into its first Linear (:func:`int8_linears`). Everything between the
Linears (layer norms, attention, pooling, the neck's convolutions) runs as the twin's dtype does: bf16 on CPUs
with native bf16; each Linear keeps the float path for the input shapes where int8 timed slower
(:class:`Int8Linear`).

End to end on 2 AMX cores (hiera-t @1024, 6 Kvasir test images, cpu-infer-20261204-amx-int8-autotuned.json):
0.48 s per image (3.20x ``SAM2ImagePredictor``), against bf16's 0.43 s (3.53x) in the same run and the
``torch.ao`` path's 0.66 s; masks at Dice 0.998 against fp32's. On AMX the bf16 GEMMs are already fast and the
Linears are a third of the encoder (attention, copies and norms the rest), so int8 pays little here; CPUs
with VNNI but no AMX are where it should pay more (not measured yet).

The per-call quantisation (min, max, scale, round, clamp) is one ``torch.compile``d function
(:func:`_quantize`): on the (16384, 768) bf16 input of a hiera-t @1024 MLP it took 4.1 ms, where eager PyTorch
took 19-68 ms (bf16 → fp32 alone 11.5 ms). Where compiling fails (no C++ compiler) it runs eager, with one
warning, and the timing in :class:`Int8Linear` then keeps float wherever int8 no longer pays.
"""

from __future__ import annotations

import functools
import logging

import torch

from medsam2.engine.cpu_linear import TimedLinear, swap_linears

log = logging.getLogger(__name__)

def available() -> bool:
    """Whether this PyTorch has oneDNN's int8 Linear (x86 builds with oneDNN; not every aarch64 build)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops, "onednn")
            and hasattr(torch.ops.onednn, "qlinear_pointwise"))


def _quantize_math(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N,K) float → (uint8 (N,K), scale (), zero point ()), asymmetric per tensor over ``x``'s own min and
    max (0 always in range, so zero maps exactly). Compiled, inductor fuses it into the reductions and one pass."""
    lo = x.amin().float().clamp(max=0.0)
    hi = x.amax().float().clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, 255).to(torch.int64)
    q = torch.clamp(torch.round(x.float() / scale) + zero, 0, 255).to(torch.uint8)
    return q, scale, zero


@functools.cache
def _compiled():
    return torch.compile(_quantize_math, dynamic=True)


_EAGER: list[str] = []
"""The reason compiling :func:`_quantize_math` failed, once it has (then every call runs eager)."""


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not _EAGER:
        try:
            return _compiled()(x)
        except Exception as exc:  # noqa: BLE001 - any inductor failure (no compiler, ...) means: eager
            _EAGER.append(f"{type(exc).__name__}: {exc}"[:300])
            log.warning("int8: compiling the activation quantiser failed, running it eager (slower): %s",
                        _EAGER[0])
    return _quantize_math(x)


class Int8Linear(TimedLinear):
    """:class:`~medsam2.engine.cpu_linear.TimedLinear` whose fast path is oneDNN's int8 Linear.

    int8: weights (out, in) int8 symmetric per output channel, prepacked for oneDNN; the input (..., in)
    quantised per call (:func:`_quantize`); the output (..., out) in the input's dtype, after ``post`` applied to
    the int32 accumulator. Against it: the float Linear (then ``post``) through oneDNN's fused kernel
    (:meth:`~medsam2.engine.cpu_linear.TimedLinear.baseline`). Which runs is timed per shape: on 2 AMX
    cores (hiera-t @1024, bf16, 2026-12-04) int8 won on 15 of 50 Linears (most MLP first layers with their
    GELU, and stage 4's) and lost on the memory-bound ones (stage 1's 96-channel inputs: 23 against 2.9 ms for
    the first qkv), where quantising costs more than the int8 GEMM saves."""

    def __init__(self, linear: torch.nn.Linear, post: str = "none") -> None:
        super().__init__(linear, post)
        w = linear.weight.detach().float()
        self.register_buffer("w_scale", (w.abs().amax(1) / 127.0).clamp(min=1e-12))
        self.register_buffer("w_zero", torch.zeros(self.out_features, dtype=torch.int64))
        qw = torch.clamp(torch.round(w / self.w_scale[:, None]), -127, 127).to(torch.int8)
        self.packed = torch.ops.onednn.qlinear_prepack(qw, None)  # oneDNN's opaque layout: not a buffer
        self.bias32 = None if linear.bias is None else linear.bias.detach().float()

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) float → (..., out) in ``x``'s dtype, through oneDNN's int8 Linear."""
        lead = x.shape[:-1]
        q, scale, zero = _quantize(x.reshape(-1, self.in_features))
        algo = "none" if self.post == "gelu" else ""
        y = torch.ops.onednn.qlinear_pointwise.tensor(q, scale, zero, self.packed, self.w_scale, self.w_zero,
                                                      self.bias32, 1.0, 0, x.dtype, self.post, [None], algo)
        return y.reshape(*lead, self.out_features)

    int8 = fast


def int8_linears(module: torch.nn.Module) -> int:
    """In place: :func:`~medsam2.engine.cpu_linear.swap_linears` with :class:`Int8Linear` (every ``nn.Linear``
    with ≥ 64 inputs and outputs; the GELU of Hiera's MLPs fused into their first Linear). Returns how many
    Linears it replaced."""
    return swap_linears(module, Int8Linear)

"""Linears for CPU inference that pick, by timing, between PyTorch's own path and a faster kernel.

:class:`TimedLinear` is the shared mechanism: it wraps an ``nn.Linear`` (optionally with the GELU that follows it
in SAM2's two-layer ``MLP`` fused in, ``post="gelu"``), and on the first call with a given number of rows and
dtype it times both paths and keeps the faster for that shape. Two kernels use it:

- :class:`OnednnLinear` (here): fp32 through oneDNN's Linear (``mkldnn::_linear_pointwise``) with the bias and
  the GELU in the GEMM's epilogue. PyTorch's fp32 ``addmm`` on CPU first copies the broadcast bias into the
  output and then runs the GEMM with beta=1, and the GELU is a second pass over the output: on 2 AMX cores
  (2026-12-05, hiera-t @1024, one image) the encoder's ``addmm`` took 940 ms, 146 of them in those bias copies,
  and its GELUs 88 ms. Alone, the stage-1 MLP's first Linear with its GELU, (65536,96)→384, took 72 ms through
  PyTorch and 40 ms through oneDNN; the qkv (65536,96)→576 65 against 54 ms; the stage-3 shapes were even.
  Same fp32 arithmetic (outputs within 1.1e-6 relative of PyTorch's; the GELU is the exact erf one).
- :class:`~medsam2.engine.cpu_int8.Int8Linear`: oneDNN's int8 Linear.

:func:`swap_linears` puts either into a module PEFT-style (the modules replaced, SAM2's code untouched).
"""

from __future__ import annotations

import abc
import functools
import time
from collections.abc import Callable

import torch

MIN_FEATURES = 64
"""Linears with fewer input or output features stay as they are: LoRA's rank-r factors, where a second kernel
has nothing to win."""


class FusedLinear(torch.nn.Module, abc.ABC):
    """``nn.Linear`` (then ``post``: ``none`` or ``gelu``, the exact erf GELU of ``nn.GELU()``) for inference
    through a faster kernel (:meth:`fast`, what a subclass provides; input (..., in) float, output (..., out) in
    the input's dtype), or PyTorch's own Linear (:meth:`float`) where a call needs a gradient."""

    def __init__(self, linear: torch.nn.Linear, post: str = "none") -> None:
        super().__init__()
        if post not in ("none", "gelu"):
            raise ValueError(f"post must be 'none' or 'gelu', not {post!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.post = post
        self.linear = linear

    @abc.abstractmethod
    def fast(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) → (..., out) through the faster kernel; what a subclass provides."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.float(x) if self._needs_grad(x) else self.fast(x)

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.linear.weight.requires_grad)

    def float(self, x: torch.Tensor) -> torch.Tensor:
        """PyTorch's own Linear (and ``post``)."""
        y = self.linear(x)
        return torch.nn.functional.gelu(y) if self.post == "gelu" else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, post={self.post}"


class TimedLinear(FusedLinear):
    """:class:`FusedLinear` that runs :meth:`fast` only where timing shows it faster here than :meth:`float`.

    The first call with a given number of rows and dtype times both paths (one warm-up and :data:`TRIALS` timed
    runs each, the best of them) and keeps the faster for that shape in ``choice`` (the call returns the kept
    path's output, so every call of that shape runs the same path)."""

    TRIALS = 2

    def __init__(self, linear: torch.nn.Linear, post: str = "none") -> None:
        super().__init__(linear, post)
        self.choice: dict[tuple[int, torch.dtype], bool] = {}
        """(rows, dtype) → whether :meth:`fast` runs for inputs of that shape."""
        self.force: bool | None = None
        """True: always :meth:`fast`, False: always :meth:`float`, None: by ``choice`` (tests and benchmarks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._needs_grad(x):
            return self.float(x)
        if self.force is not None:
            return self.fast(x) if self.force else self.baseline(x)
        key = (x.numel() // self.in_features, x.dtype)
        use = self.choice.get(key)
        if use is None:
            use = self.choice[key] = self._fast_is_faster(x)
        return self.fast(x) if use else self.baseline(x)

    def baseline(self, x: torch.Tensor) -> torch.Tensor:
        """What :meth:`fast` is timed against and runs where it is not faster: the float Linear, through
        oneDNN's fused kernel where it has one (:func:`onednn_linear`)."""
        return onednn_linear(x, self.linear, self.post)

    def _fast_is_faster(self, x: torch.Tensor) -> bool:
        best = {}
        for path in (self.fast, self.baseline):
            path(x)  # warm-up: oneDNN's primitive, a quantiser's compilation
            times = []
            for _ in range(self.TRIALS):
                t = time.perf_counter()
                path(x)
                times.append(time.perf_counter() - t)
            best[path.__name__] = min(times)
        return best["fast"] < best["baseline"]


@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch has oneDNN's fused Linear (x86 builds with oneDNN; not every aarch64 build)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OnednnLinear(FusedLinear):
    """:class:`FusedLinear` whose fast path is :func:`onednn_linear`."""

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.linear, self.post)


def onednn_linear(x: torch.Tensor, linear: torch.nn.Linear, post: str = "none") -> torch.Tensor:
    """(..., in) → (..., out): ``linear`` then ``post`` (``none``/``gelu``) through oneDNN's Linear with the
    bias and ``post`` fused (fp32 or bf16, the weights as they are: nothing prepacked, no second copy). PyTorch's
    own path where oneDNN's is missing, the dtypes differ, or inductor is tracing (it fuses its own Linears)."""
    w, b = linear.weight, linear.bias
    if not onednn_available() or w.dtype != x.dtype or torch.compiler.is_compiling():
        y = linear(x)
        return torch.nn.functional.gelu(y) if post == "gelu" else y
    algo = "none" if post == "gelu" else ""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, linear.in_features), w, b, post, [], algo)
    return y.reshape(*x.shape[:-1], linear.out_features)


def swap_linears(module: torch.nn.Module, make: Callable[[torch.nn.Linear, str], torch.nn.Module]) -> int:
    """In place: every ``nn.Linear`` of ``module`` with ≥ :data:`MIN_FEATURES` inputs and outputs →
    ``make(linear, post)``; in SAM2's two-layer ``MLP`` with an exact ``nn.GELU`` (Hiera's blocks) the GELU moves
    into the first Linear (``post="gelu"``; the MLP's ``act`` becomes ``Identity``). Returns how many Linears
    it replaced."""
    from sam2.modeling.sam2_utils import MLP

    made: set[int] = set()
    for m in list(module.modules()):
        if (isinstance(m, MLP) and m.num_layers == 2 and type(m.act) is torch.nn.GELU
                and m.act.approximate == "none" and _swappable(m.layers[0])):
            m.layers[0] = make(m.layers[0], "gelu")
            m.act = torch.nn.Identity()
            made.add(id(m.layers[0]))
    for parent in [m for m in module.modules() if id(m) not in made]:
        for name, child in list(parent.named_children()):
            if _swappable(child):
                setattr(parent, name, new := make(child, "none"))
                made.add(id(new))
    return len(made)


def _swappable(linear: torch.nn.Module) -> bool:
    return (type(linear) is torch.nn.Linear and linear.in_features >= MIN_FEATURES
            and linear.out_features >= MIN_FEATURES)


def onednn_linears(module: torch.nn.Module) -> int:
    """In place: :func:`swap_linears` with :class:`OnednnLinear` where oneDNN's Linear exists (else nothing).
    Returns how many Linears it replaced."""
    return swap_linears(module, OnednnLinear) if onednn_available() else 0

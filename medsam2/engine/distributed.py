"""Data-parallel training over ``torch.distributed``: what ``train(cfg)`` needs to run as one of N workers.

The process group is made by whoever launched the workers (Ray Train's ``TorchTrainer`` in
``tuning/distributed.py``, or ``torchrun``): this module never starts one, and imports no launcher. With no
group (or a group of one), :func:`current` is a single worker and every helper here is a no-op, so the one
training loop is the same code with 1 or N workers.

What makes N workers train the same model as one worker at the same global batch:

- every worker builds the same model from the same seed, and :meth:`Workers.broadcast_params` copies rank 0's
  parameters to the others before the first step (as DDP does);
- the global batch of a step (``StepSampler``: ``train.batch_size × train.grad_accum`` samples, each with its
  own augmentation seed) is cut into ``N`` equal contiguous shards, one per rank (``StepSampler(..., rank, world)``);
- each rank's loss is the mean over its shard and :meth:`Workers.average_gradients` all-reduces the gradients
  and divides by ``N``: the gradient of the global-batch mean, the same arithmetic as DDP. It runs once per
  optimiser step (after gradient accumulation, before clipping) over every trainable parameter, the strategy's
  extra modules included (a discriminator, a projection head), which DDP's forward hooks would not reach;
- only rank 0 evaluates and writes checkpoints; its val metrics and early-stop decision are broadcast
  (:meth:`Workers.broadcast_floats`), so every rank's ``on_eval`` sees them, and a time budget running out on any
  rank stops all (:meth:`Workers.agree`): no rank waits forever in an all-reduce the others left.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 2**20
"""Gradients are all-reduced in flat buckets of about this size (DDP's default), so a full fine-tune of
hiera-l needs a 25 MiB buffer, not a copy of every gradient."""


@dataclass(frozen=True)
class Workers:
    """This process's place among the data-parallel workers of one run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: evaluates, writes checkpoints, logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def device(self, device: torch.device) -> torch.device:
        """``cuda`` → this worker's GPU (``cuda:<local rank>``); any other device as it is."""
        if self.distributed and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    @torch.no_grad()
    def broadcast_params(self, modules: list[torch.nn.Module]) -> None:
        """Rank 0's parameters and buffers → every rank (all ranks call it, with the same modules)."""
        if not self.distributed:
            return
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                dist.broadcast(t.data, src=0)

    @torch.no_grad()
    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each ``p.grad`` by the mean over the ranks of their gradients (a rank where ``p`` took no part
        counts as a zero gradient); a parameter that had no gradient on any rank keeps ``grad = None``, so
        AdamW skips it exactly as it would with one worker."""
        if not self.distributed or not params:
            return
        ref = params[0]
        had = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=ref.device)
        dist.all_reduce(had)
        for bucket in _buckets(params):
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                              for p in bucket])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p in bucket:
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
                offset += n
        for p, any_grad in zip(params, had.tolist(), strict=True):
            if not any_grad:
                p.grad = None

    def agree(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is True on any rank (rank 0 decides stops; the others learn of them)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_floats(self, values: list[float], device: torch.device) -> list[float]:
        """Rank 0's ``values`` on every rank (the others pass placeholders of the same length)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
        dist.broadcast(t, src=0)
        return [float(v) for v in t.tolist()]


def current() -> Workers:
    """The workers of the process group this process belongs to (one worker when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Workers()
    return Workers(rank=dist.get_rank(), world=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _buckets(params: list[torch.nn.Parameter]):
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in params:
        bucket.append(p)
        size += p.numel() * 4
        if size >= BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket

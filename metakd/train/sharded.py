"""One inference pass of a frozen model over a whole split, shared out among the DDP ranks.

Rank r of W runs the r-th contiguous block of ceil(N / W) rows; an all-gather then gives
every rank all N rows, in the split's order. With one worker it is a plain loop.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from ..loader import trim_collate
from .loop import to_device
from .precision import autocast
from .runtime import unwrap


@torch.no_grad()
def sharded_forward(model, split, rows: Callable[[object, dict], dict[str, torch.Tensor]], runtime,
                    precision: str = "fp32", batch_size: int = 64, keep_on_device: bool = False,
                    forward_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
    """``rows(model(**batch, **forward_kwargs), batch)`` -> {name: [B, ...]} for each batch of
    ``split`` (eval mode, no grad, batches cut to their longest sequence; ``rows`` returns
    fixed-size rows, e.g. padded back to the split's length). Returns {name: [len(split), ...]} on every rank, on the CPU or, with
    ``keep_on_device``, on the runtime's device."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    n, world, rank, device = len(split), runtime.world_size, runtime.rank, runtime.device
    block = math.ceil(n / world) if n else 0
    start, end = min(rank * block, n), min((rank + 1) * block, n)
    local: dict[str, torch.Tensor] = {}
    for lo in range(start, end, batch_size):
        hi = min(lo + batch_size, end)
        batch = to_device(trim_collate(split.select(torch.arange(lo, hi)).to_dict()), device)
        with autocast(precision, device):
            out = net(**batch, **(forward_kwargs or {}))
        for name, value in rows(out, batch).items():
            if name not in local:
                local[name] = torch.zeros((block, *value.shape[1:]), dtype=value.dtype, device=device)
            local[name][lo - start:hi - start] = value
    net.train(was_training)
    if world > 1 and block and dist.is_available() and dist.is_initialized():
        local = _all_gather(local, block, device)
    out = {k: v[:n] for k, v in local.items()}
    return out if keep_on_device else {k: v.cpu() for k, v in out.items()}


def _all_gather(local: dict, block: int, device) -> dict[str, torch.Tensor]:
    """Every rank's block, in rank order. A rank with no rows (N < W) still joins with zeros
    shaped like the others' (shapes agreed through rank 0)."""
    spec = [(k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(local.items())]
    shared = [spec]
    dist.broadcast_object_list(shared, src=0)
    gathered = {}
    for name, shape, dtype in shared[0]:
        mine = local.get(name)
        if mine is None:
            mine = torch.zeros((block, *shape), dtype=dtype, device=device)
        full = torch.empty((dist.get_world_size() * block, *shape), dtype=dtype, device=device)
        dist.all_gather(list(full.split(block)), mine.contiguous())
        gathered[name] = full
    return gathered

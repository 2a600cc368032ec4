"""First-order importance of heads and FFN neurons and which ones a step prunes (cap-pruning spec
§1.5, CAP-f; the released ``StructuredPruning/prune/prune_utils.py``)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from .masks import HeadFFNGates


def first_order_importance(model, gates: HeadFFNGates, loss_fn: Callable, batches: Iterable[dict],
                           normalize_by_layer: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """I_g = sum over ``batches`` of |dL/dg| at the current gates (1 for a unit that is on), under
    ``loss_fn(model, batch)`` (the full training loss), in eval mode. With ``normalize_by_layer``
    each layer's scores are divided by their L2 norm, so they can be ranked across layers.
    Returns (heads [L, heads], neurons [L, intermediate]); the model's gradients are cleared after.
    """
    was_training = model.training
    model.eval()
    heads = torch.zeros_like(gates.heads)
    neurons = torch.zeros_like(gates.neurons)
    try:
        for batch in batches:
            live = (gates.heads.clone().requires_grad_(True), gates.neurons.clone().requires_grad_(True))
            gates.live = live
            loss = loss_fn(model, batch)
            g_heads, g_neurons = torch.autograd.grad(loss, live, allow_unused=True)
            if g_heads is not None:
                heads += g_heads.abs()
            if g_neurons is not None:
                neurons += g_neurons.abs()
    finally:
        gates.live = None
        model.train(was_training)
    if normalize_by_layer:
        heads, neurons = normalized_by_layer(heads), normalized_by_layer(neurons)
    return heads, neurons


def normalized_by_layer(scores: torch.Tensor) -> torch.Tensor:
    """Each layer's (row's) scores divided by their L2 norm, so that layers rank against each other."""
    return scores / (scores.norm(dim=-1, keepdim=True) + 1e-20)


def heads_to_prune(importance: torch.Tensor, off_after: int, mask: torch.Tensor,
                   min_per_layer: int = 1) -> torch.Tensor:
    """The head mask with ``off_after`` heads off in all: the lowest-importance heads still on are
    turned off, ranked across layers, never the ``min_per_layer`` most important heads of a layer."""
    mask = mask.clone()
    n_off = off_after - int((mask == 0).sum())
    if n_off <= 0:
        return mask
    protected = torch.zeros_like(mask, dtype=torch.bool)
    if min_per_layer:
        # the layer's most important heads that are still on (a head already off cannot keep it alive)
        on_scores = importance.masked_fill(mask == 0, float("-inf"))
        top = on_scores.topk(min(min_per_layer, importance.shape[1]), dim=1).indices
        protected.scatter_(1, top, True)
    candidates = (mask > 0) & ~protected
    order = sorted(((float(importance[l, h]), l, h) for l, h in candidates.nonzero().tolist()))
    if len(order) < n_off:
        raise ValueError(f"cannot turn {n_off} more heads off: only {len(order)} are on and unprotected "
                         f"(min_heads_per_layer {min_per_layer})")
    for _, layer, head in order[:n_off]:
        mask[layer, head] = 0
    return mask


def neurons_to_prune(importance: torch.Tensor, off_after: int, mask: torch.Tensor) -> torch.Tensor:
    """The neuron mask with ``off_after`` neurons off in all: the lowest-importance ones still on go
    first, ranked across layers."""
    mask = mask.clone()
    n_off = off_after - int((mask == 0).sum())
    if n_off <= 0:
        return mask
    scores = importance.masked_fill(mask == 0, float("inf")).flatten()
    off = torch.topk(scores, n_off, largest=False).indices
    mask.view(-1)[off] = 0
    return mask

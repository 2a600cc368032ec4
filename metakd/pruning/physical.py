"""The physically smaller copy of a head/neuron-pruned BERT (cap-pruning spec §4): pruned heads and
FFN neurons removed, so latency measures the smaller matrices. Its logits equal the gated model's."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import prune_linear_layer

from ..models import _layers
from .masks import HeadFFNGates


def prune_heads(attention: nn.Module, heads: list[int]) -> None:
    """Remove ``heads`` from a BERT attention block (``BertAttention``): their rows of Q, K and V
    (weights and biases) and their columns of the attention-output matrix. (Transformers 5 dropped
    its own ``prune_heads``; BERT's forward reshapes by head size, so fewer heads need no other change.)"""
    attn = attention.self
    size, n = attn.attention_head_size, attn.num_attention_heads
    keep = [h for h in range(n) if h not in set(heads)]
    if not heads:
        return
    index = torch.arange(n * size).view(n, size)[keep].flatten().to(attn.query.weight.device)
    attn.query = prune_linear_layer(attn.query, index)
    attn.key = prune_linear_layer(attn.key, index)
    attn.value = prune_linear_layer(attn.value, index)
    attention.output.dense = prune_linear_layer(attention.output.dense, index, dim=1)
    attn.num_attention_heads = len(keep)
    attn.all_head_size = len(keep) * size


def prune_neurons(layer: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the FFN neurons ``keep`` of a BERT layer: rows of FFN-in, columns of FFN-out."""
    layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, keep)
    layer.output.dense = prune_linear_layer(layer.output.dense, keep, dim=1)


@torch.no_grad()
def physical_copy(model: nn.Module, gates: HeadFFNGates) -> nn.Module:
    """A deep copy of ``model`` (an EncoderClassifier whose encoder ``gates`` masks) without the
    heads and neurons whose gates are 0, and without the gates' hooks."""
    small = copy.deepcopy(model)
    hooks = {h.id for h in gates._handles}  # the copy shares the gates' hooks: take them off it
    for module in small.modules():
        for hook in hooks & set(module._forward_pre_hooks):
            del module._forward_pre_hooks[hook]
    for i, layer in enumerate(_layers(small.encoder)):
        prune_heads(layer.attention, [h for h in range(gates.num_heads) if gates.heads[i, h] == 0])
        prune_neurons(layer, torch.nonzero(gates.neurons[i]).flatten())
    return small

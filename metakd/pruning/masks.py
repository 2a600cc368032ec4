"""Masks applied in the forward of Hugging Face BERT layers (cap-pruning spec §1.5).

Unstructured: each layer's Q, K, V, attention-output, FFN-in and FFN-out weight matrices become
:class:`MaskedLinear` s, whose forward uses W ⊙ M; embeddings, pooler, classifier, biases and
LayerNorm are never masked. M comes from

- movement: a learned score S per weight (init 0), M = TopK_kappa(S) per matrix (local), with a
  straight-through backward, so dL/dS = dL/dM = W ⊙ dL/d(W ⊙ M);
- soft_movement: M = [sigmoid(S) > kappa], straight-through, at least 0.5 % of each matrix kept;
- magnitude: M = TopK_kappa(|W|), no scores.

Structured (heads_ffn): 0/1 gates on each layer's attention heads (on the attention context,
before the attention-output matrix) and FFN neurons (on the activation, before the FFN-out
matrix), as forward pre-hooks; masked, not removed (:mod:`metakd.pruning.physical` removes them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..models import _layers

# the six matrices of a BERT layer that unstructured pruning masks, by their path in the layer
MATRICES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
            "intermediate.dense", "output.dense")
UNSTRUCTURED_CRITERIA = ("movement", "soft_movement", "magnitude")
SOFT_MIN_KEPT = 0.005  # soft movement keeps at least this fraction (+1 weight) of every matrix


def kept_count(keep: float, n: int) -> int:
    """Weights a topK mask keeps of ``n`` at kept fraction ``keep``: floor(keep · n), as released
    (``int(threshold * numel)``), with a tolerance so that 1 - 0.9 keeps 10 % and not one less."""
    return int(math.floor(keep * n + 1e-9))


def topk_mask(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """1 on the kept_count(keep, n) largest entries of ``scores`` (ties broken by position), else 0."""
    k = kept_count(keep, scores.numel())
    if k >= scores.numel():
        return torch.ones_like(scores)
    mask = torch.zeros(scores.numel(), dtype=scores.dtype, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.detach().flatten(), k, sorted=False).indices] = 1.0
    return mask.view_as(scores)


def threshold_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 where sigmoid(S) > threshold; the top int(0.005 n) + 1 scores when fewer pass (as released)."""
    s = scores.detach()
    mask = (torch.sigmoid(s) > threshold).to(s.dtype)
    least = int(SOFT_MIN_KEPT * s.numel()) + 1
    if mask.sum() < least:
        mask = topk_mask(s, least / s.numel() + 1e-12)
    return mask


class _StraightThrough(torch.autograd.Function):
    """M = binarize(S) forward; dL/dS = dL/dM backward."""

    @staticmethod
    def forward(ctx, scores, binarize, value):
        return binarize(scores, value)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class MaskedLinear(nn.Linear):
    """A Linear whose forward uses W ⊙ M. It shares the original's weight and bias; ``keep`` (kappa:
    the kept fraction, or the soft-movement threshold) is set by the schedule."""

    def __init__(self, linear: nn.Linear, criterion: str):
        nn.Module.__init__(self)
        if criterion not in UNSTRUCTURED_CRITERIA:
            raise ValueError(f"criterion must be one of {UNSTRUCTURED_CRITERIA}, got {criterion!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.criterion = criterion
        self.keep = 0.0 if criterion == "soft_movement" else 1.0
        self.scores = nn.Parameter(torch.zeros_like(linear.weight)) if criterion != "magnitude" else None

    def mask(self) -> torch.Tensor:
        """M at the current ``keep``; straight-through to the scores (movement, soft movement)."""
        if self.criterion == "magnitude":
            return topk_mask(self.weight.detach().abs(), self.keep)
        binarize = topk_mask if self.criterion == "movement" else threshold_mask
        return _StraightThrough.apply(self.scores, binarize, self.keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.criterion == "magnitude" and self.keep >= 1.0:
            return F.linear(x, self.weight, self.bias)
        # movement scores learn during the dense warm-up too (kappa = 1: M = 1, dL/dS = W ⊙ dL/dW')
        return F.linear(x, self.weight * self.mask().to(self.weight.dtype), self.bias)


def _module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    *parent, last = path.split(".")
    setattr(_module(root, ".".join(parent)) if parent else root, last, module)


def bert_layers(encoder: nn.Module) -> nn.ModuleList:
    """The transformer layers, refused unless each has BERT's six matrices as Linears."""
    layers = _layers(encoder)
    for path in MATRICES:
        try:
            ok = all(isinstance(_module(layer, path), nn.Linear) for layer in layers)
        except AttributeError:
            ok = False
        if not ok:
            raise ConfigError(f"student.prune: {type(encoder).__name__} layers lack BERT's {path} Linear; "
                              f"pruning supports BERT-like encoders (BERT, MiniLM)")
    return layers


class UnstructuredMasks:
    """The six matrices of every layer as :class:`MaskedLinear` s; names are ``<layer>.<path>``."""

    def __init__(self, encoder: nn.Module, criterion: str):
        self.encoder, self.criterion = encoder, criterion
        self.linears: dict[str, MaskedLinear] = {}
        for i, layer in enumerate(bert_layers(encoder)):
            for path in MATRICES:
                masked = MaskedLinear(_module(layer, path), criterion)
                _set_module(layer, path, masked)
                self.linears[f"{i}.{path}"] = masked

    def set_keep(self, keep: float) -> None:
        for m in self.linears.values():
            m.keep = keep

    def score_parameters(self) -> list[nn.Parameter]:
        return [m.scores for m in self.linears.values() if m.scores is not None]

    def regularization(self) -> torch.Tensor:
        """R(S) = mean over matrices of mean(sigmoid(S)) (soft movement's L1 term, as released)."""
        return torch.stack([torch.sigmoid(s).mean() for s in self.score_parameters()]).mean()

    @torch.no_grad()
    def masks(self) -> dict[str, torch.Tensor]:
        """The current 0/1 masks (bool), by name."""
        return {name: m.mask().bool() for name, m in self.linears.items()}

    @torch.no_grad()
    def remove(self) -> dict[str, torch.Tensor]:
        """Bake the masks into the weights (W <- W ⊙ M) and put plain Linears back (the same weight
        and bias), so the model is a dense one that holds zeros. Returns the masks."""
        masks = self.masks()
        for i, layer in enumerate(_layers(self.encoder)):
            for path in MATRICES:
                masked = _module(layer, path)
                masked.weight.mul_(masks[f"{i}.{path}"].to(masked.weight.dtype))
                plain = nn.Linear(masked.in_features, masked.out_features, bias=masked.bias is not None,
                                  device=masked.weight.device, dtype=masked.weight.dtype)
                plain.weight, plain.bias = masked.weight, masked.bias
                _set_module(layer, path, plain)
        self.linears = {}
        return masks


class HeadFFNGates:
    """0/1 gates on attention heads [L, heads] and FFN neurons [L, intermediate], applied by forward
    pre-hooks: a head's gate scales its slice of the attention context (the input of the
    attention-output matrix), a neuron's gate its activation (the input of the FFN-out matrix).

    ``live``: (head gates, neuron gates) with requires_grad, used instead of the 0/1 masks while
    first-order importance is measured (:func:`metakd.pruning.importance.first_order_importance`).
    """

    def __init__(self, encoder: nn.Module):
        layers = bert_layers(encoder)
        cfg = encoder.config
        device = next(encoder.parameters()).device
        self.num_heads, self.head_size = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        self.heads = torch.ones(len(layers), self.num_heads, device=device)
        self.neurons = torch.ones(len(layers), cfg.intermediate_size, device=device)
        self.live: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles = []
        for i, layer in enumerate(layers):
            self._handles.append(layer.attention.output.dense.register_forward_pre_hook(self._head_hook(i)))
            self._handles.append(layer.output.dense.register_forward_pre_hook(self._neuron_hook(i)))

    def _gates(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.live if self.live is not None else (self.heads, self.neurons)

    def _head_hook(self, i: int):
        def hook(module, args):
            gates = self._gates()[0][i]
            if self.live is None and bool((gates == 1).all()):
                return None
            x = args[0]
            shaped = x.view(*x.shape[:-1], self.num_heads, self.head_size)
            return ((shaped * gates.to(x.device, x.dtype)[:, None]).view(x.shape), *args[1:])
        return hook

    def _neuron_hook(self, i: int):
        def hook(module, args):
            gates = self._gates()[1][i]
            if self.live is None and bool((gates == 1).all()):
                return None
            return (args[0] * gates.to(args[0].device, args[0].dtype), *args[1:])
        return hook

    def kept_heads(self) -> list[list[int]]:
        """Per layer, the indices of the heads that are on."""
        return [torch.nonzero(row).flatten().tolist() for row in self.heads]

    @torch.no_grad()
    def bake(self, encoder: nn.Module) -> None:
        """Zero what an off gate silences, so the encoder needs no hooks: an off head's rows of Q, K, V
        (weights, biases) and its columns of the attention-output matrix; an off neuron's FFN-in row and
        bias and its FFN-out column. The attention output then gets exactly 0 from the head, as gated."""
        for i, layer in enumerate(bert_layers(encoder)):
            off = (self.heads[i] == 0).repeat_interleave(self.head_size).to(layer.attention.output.dense.weight.device)
            for linear in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                linear.weight[off] = 0
                linear.bias[off] = 0
            layer.attention.output.dense.weight[:, off] = 0
            off = (self.neurons[i] == 0).to(layer.output.dense.weight.device)
            layer.intermediate.dense.weight[off] = 0
            layer.intermediate.dense.bias[off] = 0
            layer.output.dense.weight[:, off] = 0

    def remove(self) -> None:
        """Take the hooks off (the gates stay readable)."""
        for h in self._handles:
            h.remove()
        self._handles = []

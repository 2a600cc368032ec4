"""How sparse a pruned student is (cap-pruning spec §1.7 and §4).

- ``encoder_remaining``: the paper's count (the released ``counts_parameters.py``): over the
  parameters of the transformer layers (weights, biases, LayerNorm; not the embeddings), the
  share still there. Unstructured: mask ones plus every bias and LayerNorm parameter;
  heads_ffn: the layers of the physical copy.
- ``student_nonzero_params``: parameters an inference needs (embeddings, layers, pooler,
  classifier) less the pruned ones: comparable with a dense student's ``student_params``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import _layers


def layer_parameters(encoder: nn.Module) -> int:
    """Parameters of the transformer layers (not the embeddings or pooler; no pruning scores)."""
    return sum(p.numel() for name, p in _layers(encoder).named_parameters() if not name.endswith("scores"))


def unstructured_summary(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict:
    """Sparsity of ``model`` (masks already baked in) pruned by ``masks`` (name -> 0/1 mask)."""
    removed = sum(int((~m.bool()).sum()) for m in masks.values())
    masked = sum(m.numel() for m in masks.values())
    dense = layer_parameters(model.encoder)
    cfg = model.encoder.config
    return {"encoder_remaining": (dense - removed) / dense, "student_nonzero_params": model.num_parameters() - removed,
            "prune_achieved": removed / masked, "heads_kept": cfg.num_hidden_layers * cfg.num_attention_heads,
            "ffn_kept": cfg.num_hidden_layers * cfg.intermediate_size}


def structured_summary(model: nn.Module, physical: nn.Module, heads: torch.Tensor, neurons: torch.Tensor) -> dict:
    """Sparsity of a head/neuron-pruned ``model`` whose pruned units ``physical`` has removed.
    ``prune_achieved`` is the share of the six matrices' weights removed, as for unstructured."""
    dense = layer_parameters(model.encoder)
    cfg = model.encoder.config
    hidden, head_size = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    matrices = cfg.num_hidden_layers * (4 * hidden * hidden + 2 * hidden * cfg.intermediate_size)
    removed = int((heads == 0).sum()) * 4 * hidden * head_size + int((neurons == 0).sum()) * 2 * hidden
    return {"encoder_remaining": layer_parameters(physical.encoder) / dense,
            "student_nonzero_params": physical.num_parameters(), "prune_achieved": removed / matrices,
            "heads_kept": int(heads.sum()), "ffn_kept": int(neurons.sum())}

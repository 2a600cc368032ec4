"""The memory banks of CAP's contrastive modules (cap-pruning spec §1.2).

A bank holds, for every training example of the target domain (addressed by the example's
``index``, as the teacher outputs are), R unit vectors z(x) and the example's label:

- PrC: R = 1, the pre-trained model phi_pre (theta before its first update);
- FiC: R = 1, the fine-tuned model phi_fine (the method's frozen teacher);
- SnC: R grows by one snapshot of theta at a time (unstructured: each epoch after the first;
  heads_ffn: before each pruning step after the first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODULES = ("prc", "snc", "fic")


class MemoryBank:
    """vectors [N, R, H] (unit norm, no gradient), labels [N], index [N] (row n holds example index[n])."""

    def __init__(self, index: torch.Tensor, labels: torch.Tensor, vectors: torch.Tensor):
        if vectors.dim() == 2:
            vectors = vectors[:, None]
        if not (len(index) == len(labels) == len(vectors)):
            raise ValueError(f"index, labels and vectors need one row per example, got {len(index)}, "
                             f"{len(labels)}, {len(vectors)}")
        self.vectors = F.normalize(vectors.detach().float(), dim=-1)
        self.labels, self.index = labels.long().to(self.vectors.device), index.long().to(self.vectors.device)
        self._row = torch.full((int(index.max()) + 1 if len(index) else 0,), -1, dtype=torch.long,
                               device=self.vectors.device)
        self._row[self.index] = torch.arange(len(index), device=self.vectors.device)

    @property
    def snapshots(self) -> int:
        """R: vectors per example."""
        return self.vectors.shape[1]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Bank rows of the examples ``index``; KeyError for an example the bank does not hold."""
        index = index.to(self._row.device).long()
        if len(index) and int(index.max()) >= len(self._row):
            raise KeyError(f"the bank holds no vector for example {int(index.max())}")
        rows = self._row[index]
        if bool((rows < 0).any()):
            raise KeyError(f"the bank holds no vector for example(s) {index[rows < 0].tolist()[:5]}")
        return rows

    def with_snapshot(self, vectors: torch.Tensor) -> "MemoryBank":
        """This bank plus one more vector per example ([N, H], in this bank's row order, normalised here)."""
        new = F.normalize(vectors.detach().float().to(self.vectors.device), dim=-1)
        return self._with(vectors=torch.cat([self.vectors, new[:, None]], 1))

    def to(self, device) -> "MemoryBank":
        return self._with(**{k: getattr(self, k).to(device) for k in ("vectors", "labels", "index", "_row")})

    def _with(self, **tensors) -> "MemoryBank":
        """A copy with some tensors replaced (its vectors are unit already: not normalised again)."""
        other = MemoryBank.__new__(MemoryBank)
        other.__dict__.update({**self.__dict__, **tensors})
        return other

"""The raw data in memory: one split of examples (:class:`TextSplit`) and a multi-domain
dataset with its train / dev / test splits (:class:`MultiDomainData`). No reading, no tokenising."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

SPLITS = ("train", "dev", "test")


@dataclass
class TextSplit:
    """One split of raw examples. ``domains`` holds domain ids (positions in ``MultiDomainData.domains``)."""

    texts: list[str]
    text_pairs: list[str] | None
    labels: np.ndarray
    domains: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.domains = np.asarray(self.domains, dtype=np.int64).reshape(-1)
        n = len(self.texts)
        if not (len(self.labels) == len(self.domains) == n) or (self.text_pairs is not None and len(self.text_pairs) != n):
            raise ValueError(f"TextSplit: texts ({n}), text_pairs, labels ({len(self.labels)}) and domains "
                             f"({len(self.domains)}) must have the same length")

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: Sequence[int] | np.ndarray) -> "TextSplit":
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return TextSplit(
            texts=[self.texts[i] for i in idx],
            text_pairs=None if self.text_pairs is None else [self.text_pairs[i] for i in idx],
            labels=self.labels[idx],
            domains=self.domains[idx],
        )

    def for_domains(self, ids: int | Iterable[int]) -> "TextSplit":
        """The examples whose domain id is in ``ids``, in their original order."""
        return self.select(np.flatnonzero(np.isin(self.domains, id_list(ids))))


@dataclass
class MultiDomainData:
    domains: list[str]
    num_labels: int
    train: TextSplit
    dev: TextSplit
    test: TextSplit
    name: str
    label_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)  # what reading left out or inferred (unlabelled rows, splits)

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {domain: number of examples}}."""
        return {s: {d: int((getattr(self, s).domains == k).sum()) for k, d in enumerate(self.domains)} for s in SPLITS}

    def class_counts(self) -> dict[str, list[int]]:
        """{domain: [examples of class 0, 1, ...]}, all splits together."""
        out = {}
        for k, d in enumerate(self.domains):
            labels = np.concatenate([getattr(self, s).labels[getattr(self, s).domains == k] for s in SPLITS])
            out[d] = np.bincount(labels, minlength=self.num_labels).tolist()
        return out

    def summary(self) -> str:
        counts = self.counts()
        width = max(8, *(len(d) for d in self.domains))
        lines = [f"{self.name}: {len(self.domains)} domains, {self.num_labels} labels"
                 + (f" {self.label_names}" if self.label_names else ""),
                 f"{'domain':<{width}} {'train':>7} {'dev':>7} {'test':>7}"]
        for d in self.domains:
            lines.append(f"{d:<{width}} " + " ".join(f"{counts[s][d]:>7}" for s in SPLITS))
        lines.append(f"{'total':<{width}} " + " ".join(f"{len(getattr(self, s)):>7}" for s in SPLITS))
        return "\n".join(lines)


def id_list(ids: int | Iterable[int]) -> list[int]:
    """``ids`` (one domain id or several) as a list of ints."""
    return [int(ids)] if isinstance(ids, (int, np.integer)) else [int(i) for i in ids]

"""Tokenised splits: :func:`encode` turns a :class:`TextSplit` into an :class:`EncodedSplit`
of fixed-length int64 tensors, the dataset the training loaders read."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch.utils.data import Dataset

from .containers import TextSplit, id_list


class EncodedSplit(Dataset):
    """Tokenised split: ``input_ids``, ``attention_mask``, ``token_type_ids`` [N, S] and
    ``labels``, ``domains``, ``index`` [N], all int64. ``index`` is the example's position in
    the split it was encoded from (kept by ``for_domains``), the key for per-example
    prototype scores. ``__getitem__`` returns a dict of these tensors for one example."""

    FIELDS = ("input_ids", "attention_mask", "token_type_ids", "labels", "domains", "index")

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                 labels: torch.Tensor, domains: torch.Tensor, index: torch.Tensor | None = None):
        n = labels.shape[0]
        self.input_ids = input_ids.long()
        self.attention_mask = attention_mask.long()
        self.token_type_ids = token_type_ids.long()
        self.labels = labels.long()
        self.domains = domains.long()
        self.index = torch.arange(n) if index is None else index.long()
        for f in self.FIELDS:
            if getattr(self, f).shape[0] != n:
                raise ValueError(f"EncodedSplit: {f} has {getattr(self, f).shape[0]} rows, labels has {n}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f)[i] for f in self.FIELDS}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A whole batch in one indexing per field (DataLoader uses it instead of N ``__getitem__``)."""
        pos = torch.as_tensor(indices, dtype=torch.long)
        return {f: getattr(self, f)[pos] for f in self.FIELDS}

    def select(self, positions: torch.Tensor | Sequence[int]) -> "EncodedSplit":
        pos = torch.as_tensor(positions, dtype=torch.long)
        return EncodedSplit(**{f: getattr(self, f)[pos] for f in self.FIELDS})

    def for_domains(self, ids: int | Iterable[int]) -> "EncodedSplit":
        """The examples of these domain ids, original order, ``index`` values kept."""
        return self.select(torch.isin(self.domains, torch.tensor(id_list(ids), dtype=torch.long)).nonzero().flatten())

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f) for f in self.FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> "EncodedSplit":
        return cls(**{f: d[f] for f in cls.FIELDS})


def encode(split: TextSplit, tokenizer: Any, max_length: int, batch_size: int = 2048,
           truncation: str = "head") -> EncodedSplit:
    """Tokenise (pairs when ``split.text_pairs``), truncate and pad to ``max_length``.

    ``truncation="head_tail"`` (single texts) keeps the first quarter and the last three
    quarters of the token budget of a long text (Sun et al. 2019): reviews often end with the verdict.
    """
    n = len(split)
    cols = {f: torch.zeros((n, max_length), dtype=torch.long) for f in ("input_ids", "attention_mask", "token_type_ids")}
    if truncation == "head_tail" and split.text_pairs is None:
        _encode_head_tail(split.texts, tokenizer, max_length, cols)
    else:
        for start in range(0, n, batch_size):
            end = min(n, start + batch_size)
            enc = tokenizer(split.texts[start:end], None if split.text_pairs is None else split.text_pairs[start:end],
                            padding="max_length", truncation=True, max_length=max_length,
                            return_token_type_ids=True, return_attention_mask=True, return_tensors="pt")
            for f in cols:
                cols[f][start:end] = enc[f]
    return EncodedSplit(**cols, labels=torch.from_numpy(split.labels.copy()),
                        domains=torch.from_numpy(split.domains.copy()))


def _encode_head_tail(texts: list[str], tokenizer: Any, max_length: int, cols: dict[str, torch.Tensor]) -> None:
    """Fill ``cols`` (zeros [N, max_length]) with ``[CLS] head ... tail [SEP]`` rows, padded."""
    budget = max_length - 2
    head = budget // 4
    ids = tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
    for i, toks in enumerate(ids):
        if len(toks) > budget:
            toks = toks[:head] + toks[len(toks) - (budget - head):]
        row = [tokenizer.cls_token_id, *toks, tokenizer.sep_token_id]
        cols["input_ids"][i, :len(row)] = torch.tensor(row)
        cols["attention_mask"][i, :len(row)] = 1
    cols["input_ids"][cols["attention_mask"] == 0] = tokenizer.pad_token_id

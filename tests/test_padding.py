"""Batches cut to their longest sequence: shorter batches, the same numbers as padding to max_length."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, BertConfig

from metakd.data import EncodedSplit
from metakd.loader import ShardedBatchSampler, make_loader, trim_collate
from metakd.losses import attention_mse, hidden_mse
from metakd.models import EncoderClassifier
from metakd.train.loop import StageSettings, train_stage
from metakd.train.runtime import LocalRuntime

pytestmark = pytest.mark.usefixtures("single_thread_torch")

MAX_LEN = 24


def ragged_split(n: int = 40, seed: int = 0) -> EncodedSplit:
    """Right-padded examples of 3..14 tokens in a width of 24 (no example reaches the width)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 15, (n,), generator=g)
    mask = (torch.arange(MAX_LEN)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, 100, (n, MAX_LEN), generator=g) * mask
    types = (torch.arange(MAX_LEN)[None, :] >= 2).long() * mask
    labels = torch.randint(0, 2, (n,), generator=g)
    return EncodedSplit(ids, mask, types, labels, torch.randint(0, 2, (n,), generator=g))


def tiny_model(seed: int = 0) -> EncoderClassifier:
    """Without dropout, so that a training step is a function of the batch alone."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return EncoderClassifier(AutoModel.from_config(cfg, attn_implementation="eager"), 2, 2, pooling="mean")


def test_trim_collate_cuts_to_the_longest_sequence_and_keeps_the_rest():
    split = ragged_split()
    rows = [3, 7, 11]
    full = split.__getitems__(rows)
    cut = trim_collate(split.__getitems__(rows))
    longest = int(split.attention_mask[rows].sum(1).max())
    assert longest < MAX_LEN
    for f in ("input_ids", "attention_mask", "token_type_ids"):
        assert cut[f].shape == (3, longest)
        assert torch.equal(cut[f], full[f][:, :longest])
        assert not full[f][:, longest:].any()  # only padding was removed
    for f in ("labels", "domains", "index"):
        assert torch.equal(cut[f], full[f])
    # a list of examples (the DataLoader's fallback path) gives the same batch
    listed = trim_collate([split[i] for i in rows])
    assert all(torch.equal(listed[f], cut[f]) for f in cut)


def test_loader_batches_are_contiguous_so_pinned_copies_can_overlap():
    split = ragged_split()
    for trim in (True, False):
        batches = list(make_loader(split, 8, True, seed=1, trim=trim))
        assert any(b["input_ids"].shape[1] < MAX_LEN for b in batches) == trim  # trimmed batches were cut
        for b in batches:
            assert all(v.is_contiguous() for v in b.values()), {k: v.stride() for k, v in b.items()}


def test_trimmed_batches_give_the_same_outputs_and_losses_as_fixed_padding():
    split = ragged_split()
    model = tiny_model().eval()
    s = 0
    for trimmed, fixed in zip(make_loader(split, 8, False), make_loader(split, 8, False, trim=False)):
        assert trimmed["input_ids"].shape[1] < fixed["input_ids"].shape[1] == MAX_LEN
        s += 1
        with torch.no_grad():
            a = model(**trimmed, output_states=True)
            b = model(**fixed, output_states=True)
        for x, y in ((a.logits, b.logits), (a.features, b.features), (a.domain_repr, b.domain_repr)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        n = trimmed["input_ids"].shape[1]
        for j in range(len(a.hidden_states)):  # the per-example layer losses against a shifted copy
            torch.testing.assert_close(hidden_mse(a.hidden_states[j], a.hidden_states[-1], trimmed["attention_mask"]),
                                       hidden_mse(b.hidden_states[j], b.hidden_states[-1], fixed["attention_mask"]),
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b.hidden_states[j][:, :n][trimmed["attention_mask"].bool()],
                                       a.hidden_states[j][trimmed["attention_mask"].bool()], rtol=1e-5, atol=1e-5)
        for j in range(len(a.attentions) - 1):
            torch.testing.assert_close(attention_mse(a.attentions[j], a.attentions[j + 1], trimmed["attention_mask"]),
                                       attention_mse(b.attentions[j], b.attentions[j + 1], fixed["attention_mask"]),
                                       rtol=1e-5, atol=1e-7)
    assert s == 5


def test_training_on_trimmed_batches_matches_fixed_padding():
    split = ragged_split(48)
    runs = {}
    for trim in (True, False):
        model = tiny_model(seed=1)
        loader = make_loader(split, 8, True, seed=3, trim=trim)
        result = train_stage(model, lambda m, b: F.cross_entropy(m(**b).logits, b["labels"]), loader, None, ["a", "b"],
                             StageSettings("teacher", 2, 1e-3, keep_best=False),
                             LocalRuntime("cpu", log=lambda *a: None), "pad")
        runs[trim] = ([p["train_loss"] for p in result.curve], copy.deepcopy(model.state_dict()))
    losses_t, weights_t = runs[True]
    losses_f, weights_f = runs[False]
    assert len(losses_t) == 2
    torch.testing.assert_close(torch.tensor(losses_t), torch.tensor(losses_f), rtol=1e-5, atol=1e-6)
    for k in weights_t:
        torch.testing.assert_close(weights_t[k], weights_f[k], rtol=1e-4, atol=1e-5)


def test_length_grouped_batches_are_shorter_but_cover_every_example_once():
    split = ragged_split(400, seed=1)
    lengths = split.attention_mask.sum(1)
    random = ShardedBatchSampler(len(split), 8, True, seed=0)
    grouped = ShardedBatchSampler(len(split), 8, True, seed=0, lengths=lengths)
    assert len(grouped) == len(random) == 50
    batches = list(grouped)
    assert sorted(i for b in batches for i in b) == list(range(400))
    width = lambda bs: sum(len(b) * int(lengths[b].max()) for b in bs)  # noqa: E731
    assert width(batches) < 0.8 * width(list(random))
    grouped.set_epoch(1)
    assert list(grouped) != batches

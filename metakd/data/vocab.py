"""The tokenizer: a checkpoint's own, or a deterministic WordPiece vocabulary trained on the
training texts for randomly initialised models (:func:`build_tokenizer`)."""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tokenizer(texts: list[str], checkpoint: str | None, vocab_size: int = 2000):
    """The checkpoint's own tokenizer (``AutoTokenizer.from_pretrained``), or, for randomly
    initialised models (``checkpoint=None``), a BERT-style WordPiece tokenizer trained on
    ``texts`` offline: lowercase BERT normaliser, BERT pre-tokenizer, special tokens
    [PAD]=0, [UNK], [CLS], [SEP], [MASK]; ``[CLS] a [SEP]`` and ``[CLS] a [SEP] b [SEP]``
    with token_type_ids 0 for a and 1 for b.

    The vocabulary comes from :func:`train_wordpiece_vocab`, not from ``tokenizers``'
    ``WordPieceTrainer``: that one breaks ties in hash-map order, so two processes trained on
    the same texts get different ids (a teacher and a student built apart would disagree)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if checkpoint is not None:
        return AutoTokenizer.from_pretrained(checkpoint)
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for t in texts:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t)))
    tok = Tokenizer(models.WordPiece(train_wordpiece_vocab(words, vocab_size), unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def train_wordpiece_vocab(word_counts: dict[str, int], vocab_size: int, min_frequency: int = 2) -> dict[str, int]:
    """WordPiece vocabulary {token: id} learned by BPE merges, as ``WordPieceTrainer`` does, but
    deterministic: ties are broken by the token strings.

    Ids: ``SPECIAL_TOKENS`` (so [PAD] = 0), then the alphabet (word-initial characters, then
    "##"-continuation characters, each by decreasing frequency, at most half the vocabulary),
    then merged tokens in merge order. A merge joins two adjacent symbols of a word
    ("t" + "##he" -> "the", "##h" + "##e" -> "##he"); the most frequent pair (summed over word
    counts) is merged next, until ``vocab_size`` tokens or no pair occurs ``min_frequency`` times.
    """
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    items = sorted(word_counts.items())  # fixed order: everything below is a function of the counts
    char_counts: Counter = Counter()
    for w, c in items:
        for j, ch in enumerate(w):
            char_counts[ch if j == 0 else "##" + ch] += c
    budget = max(0, vocab_size - len(vocab))
    by_freq = sorted(char_counts, key=lambda t: (-char_counts[t], t))[: budget // 2]
    for t in sorted(by_freq, key=lambda t: (t.startswith("##"), -char_counts[t], t)):
        vocab[t] = len(vocab)

    words = [[w[0]] + ["##" + ch for ch in w[1:]] for w, _ in items]
    counts = [c for _, c in items]
    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, sym in enumerate(words):
        if all(s in vocab for s in sym):  # words with a character outside the alphabet stay [UNK]
            for p in zip(sym, sym[1:]):
                pair_count[p] += counts[i]
                where[p].add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:
            continue  # stale heap entry
        if -neg < min_frequency:
            break
        a, b = pair
        merged = a + b[2:]
        if merged not in vocab:
            vocab[merged] = len(vocab)
        changed = set()
        for i in sorted(where.pop(pair, ())):
            sym, c = words[i], counts[i]
            for p in zip(sym, sym[1:]):
                pair_count[p] -= c
                changed.add(p)
            out, j = [], 0
            while j < len(sym):
                if j + 1 < len(sym) and sym[j] == a and sym[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(sym[j])
                    j += 1
            words[i] = out
            for p in zip(out, out[1:]):
                pair_count[p] += c
                where[p].add(i)
                changed.add(p)
        for p in sorted(changed):
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
            else:
                pair_count.pop(p, None)
    return vocab

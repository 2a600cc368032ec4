"""A generated multi-domain text classification corpus, for the laptop default and the tests.

Generative story (all draws from ``numpy.random.default_rng(cfg.seed)``, so the corpus is a
pure function of the config):

1. Vocabulary. Pronounceable pseudo-words ("bakoru", "tise", ...) built from syllables, all
   distinct, so a WordPiece tokenizer has sub-words to learn.
   - shared vocabulary (``shared_vocab`` words, used by every domain): the first half are
     *polarity words*, split evenly among the labels (word w signals label c in every
     domain, like "great"/"awful" in reviews); the rest are neutral filler words;
   - per-domain vocabulary (``domain_vocab`` words per domain): half are *topic words*
     (label-free, they only tell the domain apart, like "novel" vs "blender"), the other
     half are the domain's own *cue words*, split evenly among the labels (domain-specific
     surface forms of the label, like "page-turner" only in books).
2. Example i of domain k gets a true label y (labels balanced within a domain) and
   ``words_per_example`` words, each drawn independently:
   - with probability ``SIGNAL_RATE`` a label-bearing word for y: a cue word of domain k
     with probability ``domain_cue_rate``, else a shared polarity word;
   - otherwise a topic word of domain k or a shared neutral word (probability 1/2 each).
3. With probability ``label_noise`` the stored label is replaced by a different label drawn
   uniformly (the text still follows y), which caps the reachable accuracy.

Why transfer is measurable: (1 - domain_cue_rate) of the label signal uses shared words
with the same meaning in every domain, so data from other domains teaches a classifier most
of what it needs for domain k; the domain's own cue words and topic words are a domain
shift that only in-domain data covers. A classifier trained on all domains therefore beats
one trained on a small sample of one domain, and the gap shrinks as the sample grows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Probability that a word carries label signal. Low enough that a handful of examples do
# not reveal every polarity word (so small in-domain samples are visibly worse).
SIGNAL_RATE = 0.2

GREEK_NAMES = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "st", "kl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "", "n", "r", "s")


def domain_names(num_domains: int) -> list[str]:
    """Greek letter names for up to 8 domains, else "d00", "d01", ..."""
    if num_domains <= len(GREEK_NAMES):
        return list(GREEK_NAMES[:num_domains])
    width = max(2, len(str(num_domains - 1)))
    return [f"d{k:0{width}d}" for k in range(num_domains)]


def _pseudo_words(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct pronounceable words of 2-3 syllables, in draw order."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        syllables = rng.integers(2, 4)
        w = "".join(
            _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] + _CODAS[rng.integers(len(_CODAS))]
            for _ in range(syllables)
        )
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def _split_by_label(words: list[str], num_labels: int) -> list[list[str]]:
    per = max(1, len(words) // num_labels)
    return [words[c * per:(c + 1) * per] or words[:1] for c in range(num_labels)]


def generate_corpus(cfg: Any) -> list[dict]:
    """Rows ``{"text": str, "label": int, "domain": str}``, ``num_domains * examples_per_domain``
    of them, grouped by domain. ``cfg`` is a ``SyntheticConfig`` (or any object with its fields).
    """
    K, C = int(cfg.num_domains), int(cfg.num_labels)
    n_words = int(cfg.words_per_example)
    if K < 1 or C < 2 or n_words < 1:
        raise ValueError(f"synthetic: need num_domains >= 1, num_labels >= 2, words_per_example >= 1; "
                         f"got {K}, {C}, {n_words}")
    rng = np.random.default_rng(cfg.seed)

    shared_size = max(2 * C, int(cfg.shared_vocab))
    domain_size = max(2 * C, int(cfg.domain_vocab))
    vocab = _pseudo_words(shared_size + K * domain_size, rng)
    shared, rest = vocab[:shared_size], vocab[shared_size:]
    polarity = _split_by_label(shared[: shared_size // 2], C)
    neutral = shared[shared_size // 2:]
    topic, cues = [], []
    for k in range(K):
        own = rest[k * domain_size:(k + 1) * domain_size]
        topic.append(own[: domain_size // 2])
        cues.append(_split_by_label(own[domain_size // 2:], C))

    rows = []
    for k, name in enumerate(domain_names(K)):
        n = int(cfg.examples_per_domain)
        labels = rng.permutation(np.arange(n) % C)
        for y in labels:
            words = []
            for _ in range(n_words):
                if rng.random() < SIGNAL_RATE:
                    pool = cues[k][y] if rng.random() < cfg.domain_cue_rate else polarity[y]
                else:
                    pool = topic[k] if rng.random() < 0.5 else neutral
                words.append(pool[rng.integers(len(pool))])
            label = int(y)
            if rng.random() < cfg.label_noise:
                label = int((y + rng.integers(1, C)) % C)
            rows.append({"text": " ".join(words), "label": label, "domain": name})
    return rows

"""Multi-domain datasets: sources, train/dev/test splits, sample rate, tokenisation cache.

Pipeline (``prepare``): read a source -> validate -> split each domain -> subsample the
training split at ``sample_rate`` -> tokenise -> (optionally) cache the tensors on disk.

Sources (``DataConfig.source``):
- ``synthetic``: :func:`metakd.synthetic.generate_corpus`;
- ``amazon``: a directory with one ``<domain>.jsonl`` per domain (domain = file stem);
- ``files``: a JSONL/JSON/CSV/Parquet file, or a directory of them, with text [text pair],
  label and domain columns, and optionally a ``split`` column (train/dev/test);
- ``hf``: ``datasets.load_dataset`` on a hub id, a local dataset directory, or a local
  json/jsonl/csv/parquet file.

Splits (method spec section 6), always per domain and seeded by ``split_seed`` only, so a
training seed never changes them:
- no given splits: shuffle, stratified by label, 81% / 9% / 10% train / dev / test;
- given splits (``hf_test_split``, or a ``split`` column): honoured; a domain without dev
  rows takes the last 10% of its training rows as dev (the MNLI rule: first 90% of train
  for training, last 10% for dev).
``sample_rate`` then thins the training split only (:func:`subsample`); dev and test are
never subsampled.

Label ids: integer labels (or integer-looking strings) are used as they are; any other
labels are mapped to ids in sorted order of their names (kept in ``label_names``).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import re
import shutil
import tempfile
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

SPLITS = ("train", "dev", "test")
DEV_FRACTION = 0.09
TEST_FRACTION = 0.10
MNLI_DEV_FRACTION = 0.10
SPLIT_COLUMN = "split"
# Bump when the split rule, the encoding or the cache layout changes: old cache entries
# then stop matching instead of being silently reused.
CACHE_VERSION = "metakd-data-1"
COMPLETE_MARKER = "_COMPLETE"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

_SPLIT_ALIASES = {"train": "train", "dev": "dev", "validation": "dev", "valid": "dev", "val": "dev", "test": "test"}
_FILE_EXTS = (".jsonl", ".json", ".csv", ".parquet")
_HF_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_INT_RE = re.compile(r"\s*[-+]?\d+\s*")


from .errors import DataError  # noqa: E402  (re-exported: metakd.data.DataError)
from .loader import make_loader  # noqa: E402,F401  (re-exported: the loaders of the training loops)


# ----------------------------------------------------------------------------- containers


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
        return self.select(np.flatnonzero(np.isin(self.domains, _id_list(ids))))


@dataclass
class MultiDomainData:
    domains: list[str]
    num_labels: int
    train: TextSplit
    dev: TextSplit
    test: TextSplit
    name: str
    label_names: list[str] | None = None

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {domain: number of examples}}."""
        return {s: {d: int((getattr(self, s).domains == k).sum()) for k, d in enumerate(self.domains)} for s in SPLITS}

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


# ----------------------------------------------------------------------------- loading


@dataclass
class _Frame:
    """A table read from one file or one dataset split, before validation."""

    origin: str  # file path or "dataset [split]", for error messages
    df: pd.DataFrame
    domain: str | None = None  # forced domain (amazon: the file stem)
    split: str | None = None  # forced split (hf)
    label_names: list[str] | None = None  # hf ClassLabel names


def load_multidomain(cfg: Any, seed: int) -> MultiDomainData:
    """Read, validate and split ``cfg.source``, then keep ``cfg.sample_rate`` of the training
    split (stratified by domain and label, seeded by ``seed``). Dev and test are not subsampled."""
    full = _load_full(cfg)
    return replace(full, train=subsample(full.train, cfg.sample_rate, seed))


def _load_full(cfg: Any) -> MultiDomainData:
    _check_config(cfg)
    if cfg.source == "synthetic":
        from metakd.synthetic import generate_corpus

        frames = [_Frame("synthetic corpus", pd.DataFrame(generate_corpus(cfg.synthetic)))]
        cols = dict(text_column="text", text_pair_column=None, label_column="label", domain_column="domain")
        name = "synthetic"
    else:
        reader = {"amazon": _read_amazon, "files": _read_files, "hf": _read_hf}[cfg.source]
        frames = reader(cfg)
        cols = dict(text_column=cfg.text_column, text_pair_column=cfg.text_pair_column,
                    label_column=cfg.label_column, domain_column=cfg.domain_column)
        name = "amazon" if cfg.source == "amazon" else str(cfg.path)
        if cfg.source == "hf" and cfg.hf_config:
            name = f"{cfg.path}/{cfg.hf_config}"
    for fr in frames:
        _check_columns(fr, cols)
    texts, pairs, raw_labels, domains, splits, origin_of = _concat(frames, cols)
    labels, label_names, num_labels, keep = _label_ids(raw_labels, origin_of, frames, cols["label_column"], cfg,
                                                        drop_minus_one=cfg.source == "hf")

    # Domains come from training rows (an hf test split may hold extra genres; they are dropped).
    train_like = keep if splits is None else keep & (splits == "train")
    available = sorted(set(domains[train_like].tolist()))
    if cfg.domains is not None:
        missing = [d for d in cfg.domains if d not in available]
        if missing:
            raise DataError(f"data.domains: {missing} not found in {name}; available domains: {available}")
        names = list(cfg.domains)
    else:
        names = available
    dom_id = {d: k for k, d in enumerate(names)}
    domain_ids = np.array([dom_id.get(d, -1) for d in domains], dtype=np.int64)
    keep &= domain_ids >= 0

    present = np.unique(labels[keep])
    if len(present) < 2:
        raise DataError(f"data.label_column: column {cols['label_column']!r} of {name} has fewer than 2 distinct "
                        f"labels in the selected domains (found {present.tolist()}); classification needs >= 2")

    parts = _assign_splits(domain_ids, labels, splits, keep, names, cfg.split_seed)

    def make(idx: np.ndarray) -> TextSplit:
        return TextSplit([texts[i] for i in idx], None if pairs is None else [pairs[i] for i in idx],
                         labels[idx], domain_ids[idx])

    return MultiDomainData(domains=names, num_labels=num_labels, name=name, label_names=label_names,
                           **{s: make(parts[s]) for s in SPLITS})


def _check_config(cfg: Any) -> None:
    if cfg.source not in ("synthetic", "amazon", "files", "hf"):
        raise DataError(f"data.source: {cfg.source!r} is not one of synthetic, amazon, files, hf")
    rate = cfg.sample_rate
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not (0 < rate <= 1):
        raise DataError(f"data.sample_rate: {rate!r} is not a number in (0, 1]")
    if cfg.source != "synthetic" and not cfg.path:
        raise DataError(f"data.path: required for source {cfg.source!r} (got {cfg.path!r})")
    if cfg.domains is not None and (len(cfg.domains) == 0 or len(set(cfg.domains)) != len(cfg.domains)):
        raise DataError(f"data.domains: {cfg.domains!r} must be None or a non-empty list of distinct names")
    if cfg.num_labels is not None and cfg.num_labels < 2:
        raise DataError(f"data.num_labels: {cfg.num_labels!r}; classification needs None (inferred) or >= 2")


def _read_amazon(cfg: Any) -> list[_Frame]:
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a directory (source 'amazon' expects <domain>.jsonl files in it)")
    available = sorted(p.stem for p in root.glob("*.jsonl"))
    wanted = cfg.domains if cfg.domains is not None else available
    if not wanted:
        raise DataError(f"data.path: no <domain>.jsonl files in {root}")
    frames = []
    for d in wanted:
        f = root / f"{d}.jsonl"
        if not f.is_file():
            raise DataError(f"data.domains: {d!r}: file {f} not found; available domains: {available}")
        frames.append(_Frame(str(f), _read_json(f), domain=d))
    return frames


def _read_files(cfg: Any) -> list[_Frame]:
    p = Path(cfg.path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in _FILE_EXTS)
        if not files:
            raise DataError(f"data.path: no {'/'.join(_FILE_EXTS)} files in directory {p}")
    elif p.is_file():
        if p.suffix.lower() not in _FILE_EXTS:
            raise DataError(f"data.path: {p} has extension {p.suffix!r}; expected one of {_FILE_EXTS}")
        files = [p]
    else:
        raise DataError(f"data.path: {p} not found (source 'files' expects a file or a directory)")
    frames = []
    for f in files:
        ext = f.suffix.lower()
        if ext in (".jsonl", ".json"):
            df = _read_json(f)
        elif ext == ".csv":
            # All as strings: a numeric-looking text stays text; labels are parsed later.
            df = pd.read_csv(f, dtype=str, keep_default_na=False)
        else:
            df = pd.read_parquet(f)
        frames.append(_Frame(str(f), df))
    return frames


def _read_json(path: Path) -> pd.DataFrame:
    """JSON Lines, a JSON list of records, or a JSON object of columns."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            return pd.DataFrame.from_records(json.loads(text))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
    if stripped.startswith("{") and path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
            if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
                return pd.DataFrame(obj)
        except json.JSONDecodeError:
            pass  # JSON Lines in a .json file, as Hugging Face writes them
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({e})") from None
    return pd.DataFrame.from_records(records)


def _read_hf(cfg: Any) -> list[_Frame]:
    import datasets

    path = str(cfg.path)
    ext = os.path.splitext(path)[1].lower()
    try:
        if os.path.isfile(path) and ext in _HF_BUILDERS:
            ds = datasets.load_dataset(_HF_BUILDERS[ext], data_files=path)
        elif os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(path)  # a save_to_disk directory
        else:
            ds = datasets.load_dataset(path, cfg.hf_config)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear data error
        raise DataError(f"data.path: datasets could not load {path!r} (hf_config={cfg.hf_config!r}): "
                        f"{type(e).__name__}: {e}") from e
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    wanted = [("hf_train_split", cfg.hf_train_split, "train")]
    if cfg.hf_test_split is not None:
        wanted.append(("hf_test_split", cfg.hf_test_split, "test"))
    frames = []
    for fname, split, role in wanted:
        if split not in ds:
            raise DataError(f"data.{fname}: split {split!r} not in {path}; available splits: {sorted(ds)}")
        d = ds[split]
        needed = [c for c in (cfg.text_column, cfg.text_pair_column, cfg.label_column, cfg.domain_column) if c]
        origin = f"{path} [split {split}]"
        _check_columns(_Frame(origin, pd.DataFrame(columns=d.column_names)),
                       dict(text_column=cfg.text_column, text_pair_column=cfg.text_pair_column,
                            label_column=cfg.label_column, domain_column=cfg.domain_column))
        feat = d.features.get(cfg.label_column)
        names = list(feat.names) if isinstance(feat, datasets.ClassLabel) else None
        df = d.select_columns(list(dict.fromkeys(needed))).to_pandas()
        frames.append(_Frame(origin, df, split=role if cfg.hf_test_split is not None else None, label_names=names))
    return frames


def _check_columns(frame: _Frame, cols: dict) -> None:
    needed = ["text_column", "label_column"]
    if cols["text_pair_column"]:
        needed.append("text_pair_column")
    if frame.domain is None:
        needed.append("domain_column")
    available = [str(c) for c in frame.df.columns]
    for f in needed:
        if cols[f] not in frame.df.columns:
            raise DataError(f"{frame.origin}: column {cols[f]!r} (data.{f}) not found; available columns: {available}")


def _concat(frames: list[_Frame], cols: dict):
    texts: list[str] = []
    pairs: list[str] | None = [] if cols["text_pair_column"] else None
    labels: list = []
    domains: list[str] = []
    splits: list[str] = []
    origin_of: list[int] = []
    has_split = [f.split is not None or SPLIT_COLUMN in f.df.columns for f in frames]
    if any(has_split) and not all(has_split):
        raise DataError(f"column {SPLIT_COLUMN!r}: present in {frames[has_split.index(True)].origin} but not in "
                        f"{frames[has_split.index(False)].origin}; give it in every file or in none")
    for j, fr in enumerate(frames):
        df, n = fr.df, len(fr.df)
        texts += _as_texts(df[cols["text_column"]])
        if pairs is not None:
            pairs += _as_texts(df[cols["text_pair_column"]])
        labels += df[cols["label_column"]].tolist()
        if fr.domain is not None:
            domains += [fr.domain] * n
        else:
            for v in df[cols["domain_column"]].tolist():
                if _is_missing(v):
                    raise DataError(f"{fr.origin}: column {cols['domain_column']!r} (data.domain_column) has a "
                                    f"missing value; every row needs a domain")
                domains.append(str(v))
        if fr.split is not None:
            splits += [fr.split] * n
        elif has_split[j]:
            for v in df[SPLIT_COLUMN].tolist():
                s = _SPLIT_ALIASES.get(str(v).strip().lower())
                if s is None:
                    raise DataError(f"{fr.origin}: column {SPLIT_COLUMN!r} has value {v!r}; "
                                    f"expected one of {sorted(_SPLIT_ALIASES)}")
                splits.append(s)
        origin_of += [j] * n
    return (texts, pairs, labels, np.array(domains, dtype=object),
            np.array(splits, dtype=object) if any(has_split) else None, np.array(origin_of, dtype=np.int64))


def _label_ids(raw: list, origin_of: np.ndarray, frames: list[_Frame], column: str, cfg: Any, drop_minus_one: bool):
    """-> (label ids, label names or None, num_labels, keep mask). Validates every row."""
    n = len(raw)
    def where(i: int) -> str:
        row = i - int(np.argmax(origin_of == origin_of[i]))  # row number within its file
        return f"{frames[origin_of[i]].origin}: column {column!r} (data.label_column), row {row},"

    for i, v in enumerate(raw):
        if _is_missing(v):
            raise DataError(f"{where(i)} has a missing label")
    ints = [_as_int(v) for v in raw]
    keep = np.ones(n, dtype=bool)
    names = next((f.label_names for f in frames if f.label_names), None)
    if all(v is not None for v in ints):
        labels = np.array(ints, dtype=np.int64)
        if drop_minus_one:
            keep = labels != -1  # unlabeled rows (e.g. MNLI test)
        num_labels = cfg.num_labels if cfg.num_labels is not None else int(labels[keep].max(initial=-1)) + 1
        bad = np.flatnonzero(keep & ((labels < 0) | (labels >= num_labels)))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{where(i)} has label {labels[i]} outside [0, {num_labels}) "
                            f"(data.num_labels={cfg.num_labels!r})")
    else:
        names = sorted({str(v) for v in raw})
        ids = {s: k for k, s in enumerate(names)}
        labels = np.array([ids[str(v)] for v in raw], dtype=np.int64)
        num_labels = cfg.num_labels if cfg.num_labels is not None else len(names)
        if len(names) > num_labels:
            raise DataError(f"data.num_labels: {num_labels} but column {column!r} holds {len(names)} label names "
                            f"{names} (e.g. in {frames[0].origin})")
    if names is not None and len(names) != num_labels:
        names = None if len(names) > num_labels else names + [str(k) for k in range(len(names), num_labels)]
    if num_labels < 2:
        raise DataError(f"data.num_labels: the data has {num_labels} label(s) in column {column!r}; "
                        f"classification needs >= 2")
    return labels, names, num_labels, keep


def _assign_splits(domain_ids: np.ndarray, labels: np.ndarray, given: np.ndarray | None, keep: np.ndarray,
                   names: list[str], split_seed: int) -> dict[str, np.ndarray]:
    """Row indices of each split, grouped by domain, in file order within a domain."""
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for k, name in enumerate(names):
        rows = np.flatnonzero(keep & (domain_ids == k))
        if given is None:
            n = len(rows)
            if n < 3:
                raise DataError(f"domain {name!r} has {n} example(s); the 81/9/10 split needs at least 3")
            # The rng depends on the domain's name, not its position: selecting other domains
            # never changes this domain's split.
            rng = np.random.default_rng([split_seed % 2**32, zlib.crc32(name.encode())])
            order = rows[_stratified_order(labels[rows], rng)]
            n_test = max(1, _round_half_up(TEST_FRACTION * n))
            n_dev = max(1, _round_half_up(DEV_FRACTION * n))
            n_train = n - n_dev - n_test
            parts = {"train": order[:n_train], "dev": order[n_train:n_train + n_dev], "test": order[n_train + n_dev:]}
        else:
            parts = {s: rows[given[rows] == s] for s in SPLITS}
            if len(parts["dev"]) == 0 and len(parts["train"]) >= 2:
                tr = parts["train"]
                n_dev = max(1, _round_half_up(MNLI_DEV_FRACTION * len(tr)))
                parts["train"], parts["dev"] = tr[:len(tr) - n_dev], tr[len(tr) - n_dev:]
            for s in SPLITS:
                if len(parts[s]) == 0:
                    raise DataError(f"domain {name!r} has no {s} examples in the given splits "
                                    f"(column {SPLIT_COLUMN!r} or data.hf_test_split)")
        for s in SPLITS:
            out[s].append(np.sort(parts[s]))
    return {s: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for s, v in out.items()}


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of range(len(labels)) in which the labels are interleaved, so any
    contiguous block holds each label in proportion (to within one example per label).

    Each label's examples are shuffled and placed at evenly spaced positions (rank + 0.5) / n_c;
    sorting by position (random tie-break) merges the labels."""
    pos = np.empty(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        pos[rng.permutation(idx)] = (np.arange(len(idx)) + 0.5) / len(idx)
    return np.lexsort((rng.random(len(labels)), pos))


def subsample(split: TextSplit, rate: float, seed: int) -> TextSplit:
    """Keep ``rate`` of each (domain, label) stratum: round-half-up(rate * n), at least 1 per
    stratum that exists. Seeded by ``seed`` per stratum, so a domain's sample does not depend
    on the other domains, and a smaller rate keeps a subset of a larger rate's sample (same
    permutation, shorter prefix). Returns the kept examples in their original order."""
    if not isinstance(rate, (int, float)) or not (0 < rate <= 1):
        raise DataError(f"data.sample_rate: {rate!r} is not a number in (0, 1]")
    if rate == 1.0:
        return split
    keep = []
    for d in np.unique(split.domains):
        for y in np.unique(split.labels[split.domains == d]):
            idx = np.flatnonzero((split.domains == d) & (split.labels == y))
            k = max(1, _round_half_up(rate * len(idx)))
            rng = np.random.default_rng([seed % 2**32, int(d), int(y)])
            keep.append(idx[rng.permutation(len(idx))[:k]])
    return split.select(np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64))


# ----------------------------------------------------------------------------- tokenisation


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
        return self.select(torch.isin(self.domains, torch.tensor(_id_list(ids), dtype=torch.long)).nonzero().flatten())

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
        budget = max_length - 2
        head = budget // 4
        ids = tokenizer(split.texts, add_special_tokens=False, truncation=False)["input_ids"]
        for i, toks in enumerate(ids):
            if len(toks) > budget:
                toks = toks[:head] + toks[len(toks) - (budget - head):]
            row = [tokenizer.cls_token_id, *toks, tokenizer.sep_token_id]
            cols["input_ids"][i, :len(row)] = torch.tensor(row)
            cols["attention_mask"][i, :len(row)] = 1
        cols["input_ids"][cols["attention_mask"] == 0] = tokenizer.pad_token_id
        return EncodedSplit(**cols, labels=torch.from_numpy(split.labels.copy()),
                            domains=torch.from_numpy(split.domains.copy()))
    for start in range(0, n, batch_size):
        end = min(n, start + batch_size)
        enc = tokenizer(split.texts[start:end], None if split.text_pairs is None else split.text_pairs[start:end],
                        padding="max_length", truncation=True, max_length=max_length,
                        return_token_type_ids=True, return_attention_mask=True, return_tensors="pt")
        for f in cols:
            cols[f][start:end] = enc[f]
    return EncodedSplit(**cols, labels=torch.from_numpy(split.labels.copy()),
                        domains=torch.from_numpy(split.domains.copy()))


# ----------------------------------------------------------------------------- prepare + cache


@dataclass
class PreparedData:
    data: MultiDomainData
    tokenizer: Any
    train: EncodedSplit
    dev: EncodedSplit
    test: EncodedSplit
    key: str = ""
    from_cache: bool = False


_SYNTH_FIELDS = ("num_domains", "num_labels", "examples_per_domain", "words_per_example", "shared_vocab",
                 "domain_vocab", "domain_cue_rate", "label_noise", "seed")


def data_key(cfg: Any, seed: int, checkpoint: str | None, vocab_size: int | None = None) -> str:
    """sha256 (16 hex chars) of what determines the prepared tensors: the data fields that
    matter for ``cfg.source``, the seed (only when sample_rate < 1), the checkpoint (or the
    WordPiece vocab size when training one) and ``CACHE_VERSION``. File contents are not
    hashed: edit data under the same path -> bump the path or clear the cache."""
    d: dict[str, Any] = {f: getattr(cfg, f) for f in ("source", "domains", "num_labels", "sample_rate",
                                                         "max_length", "split_seed")}
    d["truncation"] = getattr(cfg, "truncation", "head")
    if cfg.source == "synthetic":
        d["synthetic"] = {f: getattr(cfg.synthetic, f) for f in _SYNTH_FIELDS}
    else:
        d.update({f: getattr(cfg, f) for f in ("path", "text_column", "text_pair_column", "label_column")})
    if cfg.source in ("files", "hf"):
        d["domain_column"] = cfg.domain_column
    if cfg.source == "hf":
        d.update({f: getattr(cfg, f) for f in ("hf_config", "hf_train_split", "hf_test_split")})
    if checkpoint is None:
        vocab_size = vocab_size if vocab_size is not None else getattr(cfg, "vocab_size", 2000)
    payload = {"version": CACHE_VERSION, "data": d, "seed": int(seed) if cfg.sample_rate < 1 else None,
               "checkpoint": checkpoint, "vocab_size": vocab_size if checkpoint is None else None}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def prepare(cfg: Any, seed: int, checkpoint: str | None, cache_dir: str | os.PathLike | None = None,
            vocab_size: int | None = None) -> PreparedData:
    """Load (:func:`load_multidomain`) and tokenise. The WordPiece tokenizer (checkpoint None)
    is trained on the *full* training split of all domains (text and pair), so every
    sample_rate and seed share one vocabulary. With ``cache_dir`` the tensors and tokenizer
    are stored under ``<cache_dir>/<data_key>/`` and a later call with the same key loads them
    instead of tokenising. ``vocab_size`` None -> ``cfg.vocab_size`` (2000 if absent)."""
    vocab_size = vocab_size if vocab_size is not None else getattr(cfg, "vocab_size", 2000)
    key = data_key(cfg, seed, checkpoint, vocab_size)
    full = _load_full(cfg)
    data = replace(full, train=subsample(full.train, cfg.sample_rate, seed))
    target = Path(cache_dir) / key if cache_dir is not None else None
    if target is not None and (target / COMPLETE_MARKER).exists():
        return _load_cached(target, data, key)

    corpus = full.train.texts + (full.train.text_pairs or [])
    tokenizer = build_tokenizer(corpus, checkpoint, vocab_size)
    truncation = getattr(cfg, "truncation", "head")
    encoded = {s: encode(getattr(data, s), tokenizer, cfg.max_length, truncation=truncation) for s in SPLITS}
    prepared = PreparedData(data=data, tokenizer=tokenizer, key=key, **encoded)
    if target is not None:
        _write_cache(target, prepared)
    return prepared


def load_prepared(directory: str | os.PathLike) -> PreparedData:
    """A prepared-data directory written by :func:`prepare` (tensors, tokenizer, meta), without the raw data.

    Training workers use this: they need the encoded splits, the tokenizer and the domain /
    label names, not the source files (which may not exist on a worker node).
    """
    from transformers import AutoTokenizer

    target = Path(directory)
    if not (target / COMPLETE_MARKER).exists():
        raise DataError(f"{target}: not a complete prepared-data directory (no {COMPLETE_MARKER})")
    meta = json.loads((target / "meta.json").read_text())
    tensors = torch.load(target / "encoded.pt", weights_only=True)
    empty = TextSplit(texts=[], text_pairs=None, labels=np.zeros(0), domains=np.zeros(0))
    data = MultiDomainData(domains=meta["domains"], num_labels=meta["num_labels"], train=empty, dev=empty,
                           test=empty, name=meta["name"], label_names=meta.get("label_names"))
    return PreparedData(data=data, tokenizer=AutoTokenizer.from_pretrained(str(target / "tokenizer")),
                        key=meta["key"], from_cache=True, **{s: EncodedSplit.from_dict(tensors[s]) for s in SPLITS})


def _load_cached(target: Path, data: MultiDomainData, key: str) -> PreparedData:
    from transformers import AutoTokenizer

    meta = json.loads((target / "meta.json").read_text())
    if meta["counts"] != data.counts() or meta["domains"] != data.domains:
        raise DataError(f"cache {target} does not match the data read now (the files under data.path changed?); "
                        f"delete that directory to rebuild it")
    tensors = torch.load(target / "encoded.pt", weights_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(target / "tokenizer"))
    return PreparedData(data=data, tokenizer=tokenizer, key=key, from_cache=True,
                        **{s: EncodedSplit.from_dict(tensors[s]) for s in SPLITS})


def _write_cache(target: Path, prepared: PreparedData) -> None:
    """Write into a private temp dir, then rename it into place: readers see either nothing
    or a complete entry; of two concurrent writers the first rename wins, the other discards."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        torch.save({s: getattr(prepared, s).to_dict() for s in SPLITS}, tmp / "encoded.pt")
        prepared.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        d = prepared.data
        meta = {"key": prepared.key, "version": CACHE_VERSION, "name": d.name, "domains": d.domains,
                "num_labels": d.num_labels, "label_names": d.label_names, "counts": d.counts()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / (COMPLETE_MARKER + ".tmp")).write_text(prepared.key)
        os.replace(tmp / (COMPLETE_MARKER + ".tmp"), tmp / COMPLETE_MARKER)  # last file written
        try:
            os.rename(tmp, target)
        except OSError:
            if (target / COMPLETE_MARKER).exists():
                return  # another writer finished first; ours is discarded below
            shutil.rmtree(target, ignore_errors=True)  # a leftover without the marker
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / COMPLETE_MARKER).exists():
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- helpers


def _round_half_up(x: float) -> int:
    # Python's round() rounds halves to even; the split/sample counts use the schoolbook rule.
    # The epsilon absorbs float error such as 0.09 * 50 = 4.499999...
    return int(math.floor(x + 0.5 + 1e-9))


def _id_list(ids: int | Iterable[int]) -> list[int]:
    return [int(ids)] if isinstance(ids, (int, np.integer)) else [int(i) for i in ids]


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))


def _as_texts(col: pd.Series) -> list[str]:
    return ["" if _is_missing(v) else str(v) for v in col.tolist()]


def _as_int(v: Any) -> int | None:
    if isinstance(v, (bool, np.bool_, int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    if isinstance(v, str) and _INT_RE.fullmatch(v):
        return int(v)
    return None

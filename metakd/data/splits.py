"""From a source's rows to train / dev / test: label ids, domain selection, the paper's
splits and the sample rate.

Splits (method spec section 6), always per domain and seeded by ``split_seed`` only, so a
training seed never changes them:
- no given splits: shuffle, stratified by label, 81% / 9% / 10% train / dev / test;
- given splits (file names, a ``split`` column, the hf splits: ``sources.SPLIT_ROLES``):
  honoured, MNLI's validation_matched as test; a domain without dev rows takes the last 10%
  of its training rows as dev (the MNLI rule: first 90% of train for training, last 10% for dev).
``sample_rate`` then thins the training split only (:func:`subsample`); dev and test are
never subsampled.

Labels, one rule (:func:`label_value`, :func:`_label_ids`):
- a missing or blank label is refused with its rows; ``-1`` (or ``"-1"``) and ``"-"`` (MNLI's
  ``gold_label``) mark an unlabelled row, which is dropped and counted in ``notes``;
- integers, integer-valued floats and integer-valued strings (``0``, ``0.0``, ``"0"``, ``"0.0"``)
  are class ids, the same class for the same integer; ids 0..K-1 as they are, and labels that
  start at 1 (no 0, e.g. star ratings 1-5) are 1-based: 1..K -> 0..K-1, named "1".."K";
- any other strings are names, compared after stripping whitespace and, unless
  ``data.label_case: keep``, case-folding (``Positive`` = ``positive``), mapped to ids in
  sorted order of the folded names (kept in ``label_names``); a column that mixes integers and
  names, or holds a non-integer number, is refused;
- ``data.num_labels``, when given, must equal the number of classes found (a hub dataset's
  ``ClassLabel`` names fix it).

Domains: every selected domain needs at least :data:`MIN_PER_CLASS` labelled rows of every
class (all its splits together), so each split of the 81/9/10 rule holds each class.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .containers import SPLITS, MultiDomainData, TextSplit
from .sources import SourceRows, is_missing, label_case, read_source

DEV_FRACTION = 0.09
TEST_FRACTION = 0.10
MNLI_DEV_FRACTION = 0.10
MIN_PER_CLASS = 10  # labelled rows of each class in each domain; 10 leaves each split of 81/9/10 one of each

UNLABELLED = -1  # label_value of an unlabelled row (-1, "-1", "-")
_INT_RE = re.compile(r"[-+]?\d+(\.0*)?")
_NUMBER_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def load_multidomain(cfg: DataConfig, seed: int) -> MultiDomainData:
    """Read, validate and split ``cfg.source``, then keep ``cfg.sample_rate`` of the training
    split (stratified by domain and label, seeded by ``seed``). Dev and test are not subsampled."""
    return apply_sample_rate(load_full(cfg), cfg, seed)


def apply_sample_rate(full: MultiDomainData, cfg: DataConfig, seed: int) -> MultiDomainData:
    """``full`` with its training split thinned to ``cfg.sample_rate`` (:func:`subsample`).

    ``cfg.sample_rate`` is checked by ``DataConfig.validate``, not here."""
    return replace(full, train=subsample(full.train, cfg.sample_rate, seed))


def load_full(cfg: DataConfig) -> MultiDomainData:
    """Every example of ``cfg.source`` in the selected domains, split; no sample rate applied."""
    rows = read_source(cfg)
    labels, label_names, num_labels, labelled = _label_ids(rows, cfg)
    domains, name = rows.domains, rows.name
    used = np.ones(len(labels), dtype=bool) if rows.splits is None else rows.splits != None  # noqa: E711
    keep = labelled & used

    # Domains come from training rows (an hf test split may hold extra genres; they are dropped).
    train_like = keep if rows.splits is None else keep & (rows.splits == "train")
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
    notes = list(rows.notes)
    dropped = np.flatnonzero(~labelled & used & (domain_ids >= 0))
    if len(dropped):
        per_file = Counter(rows.origins[j] for j in rows.origin_of[dropped])
        notes.append(f"{len(dropped)} unlabelled rows (label -1 or '-') dropped: "
                     + ", ".join(f"{o}: {n}" for o, n in per_file.items()))

    present = np.unique(labels[keep])
    if len(present) < 2:
        raise DataError(f"data.label_column: column {rows.label_column!r} of {name} has fewer than 2 distinct "
                        f"labels in the selected domains (found {present.tolist()}); classification needs >= 2")
    _check_class_sizes(labels, domain_ids, keep, names, num_labels, label_names)

    parts = _assign_splits(domain_ids, labels, rows.splits, keep, names, cfg.split_seed)
    texts, pairs = rows.texts, rows.text_pairs

    def make(idx: np.ndarray) -> TextSplit:
        return TextSplit([texts[i] for i in idx], None if pairs is None else [pairs[i] for i in idx],
                         labels[idx], domain_ids[idx])

    return MultiDomainData(domains=names, num_labels=num_labels, name=name, label_names=label_names, notes=notes,
                           **{s: make(parts[s]) for s in SPLITS})


def _label_ids(rows: SourceRows, cfg: DataConfig):
    """-> (label ids, label names or None, num_labels, labelled mask), by the rule of this
    module's docstring; unlabelled rows get id -1. Refuses, naming the file and rows: empty
    labels, mixed integers and names, ids out of range, a ``num_labels`` the data does not have."""
    raw, column = rows.labels, rows.label_column
    fold = label_case(cfg) == "fold"
    where = lambda i: f"{rows.where(i)}: column {column!r} (data.label_column)"  # noqa: E731
    values, empty = [], []
    for i, v in enumerate(raw):
        x = label_value(v, fold)
        if x is None:
            empty.append(i)
        elif isinstance(x, ValueError):
            raise DataError(f"{where(i)} has label {v!r}, {x}; labels are integers (class ids) or names")
        values.append(x)
    if empty:
        raise DataError(f"{rows.describe(empty)}: column {column!r} (data.label_column) is empty or missing in "
                        f"{len(empty)} row{'s' if len(empty) > 1 else ''}; every row needs a label (-1 or '-' "
                        f"marks an unlabelled row, which is dropped)")
    labelled = np.array([x != UNLABELLED for x in values], dtype=bool)
    ints = [i for i, x in enumerate(values) if isinstance(x, int) and x != UNLABELLED]
    strs = [i for i, x in enumerate(values) if isinstance(x, str)]
    if ints and strs:
        raise DataError(f"column {column!r} (data.label_column) mixes integer labels ({rows.where(ints[0])}: "
                        f"{raw[ints[0]]!r}) and names ({rows.where(strs[0])}: {raw[strs[0]]!r}); use one or the other")
    labels = np.full(len(values), -1, dtype=np.int64)
    names = rows.label_names
    if strs:
        found = sorted({values[i] for i in strs})
        ids = {s: k for k, s in enumerate(found)}
        labels[strs] = [ids[values[i]] for i in strs]
        names, k, what = found, len(found), f"{len(found)} label names {found}"
    else:
        ids = np.array([values[i] for i in ints], dtype=np.int64)
        if len(ids) and ids.min() < 0:
            i = ints[int(ids.argmin())]
            raise DataError(f"{where(i)} has label {raw[i]!r} outside [0, ...): labels are class ids from 0 "
                            f"(or 1-based), and -1 marks an unlabelled row")
        shift = 1 if names is None and len(ids) and ids.min() == 1 else 0  # 1..K (e.g. star ratings) -> 0..K-1
        labels[ints] = ids - shift
        k = len(names) if names is not None else int(labels.max(initial=-1)) + 1
        if shift:
            names = [str(j + 1) for j in range(k)]
        limit = cfg.num_labels if cfg.num_labels is not None else k
        bad = np.flatnonzero(labels >= limit)
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{where(i)} has label {raw[i]!r} outside [{shift}, {limit + shift}) "
                            f"(data.num_labels={cfg.num_labels!r}"
                            + (f"; the dataset's class names are {names}" if rows.label_names else "") + ")")
        what = f"{k} classes (labels {shift}..{k - 1 + shift}" + (", read as 1-based)" if shift else ")")
    if k < 2:
        raise DataError(f"data.label_column: the data has {k} label(s) in column {column!r}; classification needs "
                        f">= 2")
    if cfg.num_labels is not None and cfg.num_labels != k:
        raise DataError(f"data.num_labels: {cfg.num_labels}, but column {column!r} of {rows.name} holds {what}; set "
                        f"num_labels: {k} or leave it out (inferred)")
    return labels, names, k, labelled


def label_value(v: Any, fold: bool = True) -> int | str | ValueError | None:
    """One label cell by the module's rule: a class id (int; ``UNLABELLED`` for -1 / "-"), a
    name (str, stripped, case-folded when ``fold``), None when empty, or a ValueError saying
    why it is not a label."""
    if is_missing(v):
        return None
    if isinstance(v, (bool, np.bool_, int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return int(v) if float(v).is_integer() else ValueError("a number that is not an integer")
    if isinstance(v, str):
        s = v.strip()
        if not s:
            return None
        if s == "-":
            return UNLABELLED
        if _INT_RE.fullmatch(s):
            return int(s.split(".")[0])
        if _NUMBER_RE.fullmatch(s):
            return ValueError("a number that is not an integer")
        return s.casefold() if fold else s
    return ValueError(f"a {type(v).__name__}")


def _check_class_sizes(labels: np.ndarray, domain_ids: np.ndarray, keep: np.ndarray, domains: list[str],
                       num_labels: int, label_names: list[str] | None) -> None:
    for k, d in enumerate(domains):
        counts = np.bincount(labels[keep & (domain_ids == k)], minlength=num_labels)
        small = np.flatnonzero(counts < MIN_PER_CLASS)
        if len(small):
            show = lambda c: label_names[c] if label_names else str(c)  # noqa: E731
            per_class = ", ".join(f"{show(c)}: {int(n)}" for c, n in enumerate(counts))
            raise DataError(f"domain {d!r} (data.domain_column) has {int(counts[small[0]])} labelled rows of class "
                            f"{show(int(small[0]))} (rows per class: {per_class}); every domain needs at least "
                            f"{MIN_PER_CLASS} rows of each class (all splits together): add rows, or leave the domain "
                            f"out with data.domains")


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
                    raise DataError(f"domain {name!r} has no labelled {s} rows in the given splits (file names, a "
                                    f"'split' column, or data.hf_test_split)")
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
    """Keep ``rate`` (in (0, 1]; ``DataConfig.validate`` checks ``sample_rate``) of each
    (domain, label) stratum: round-half-up(rate * n), at least 1 per stratum that exists.
    Seeded by ``seed`` per stratum, so a domain's sample does not depend on the other domains,
    and a smaller rate keeps a subset of a larger rate's sample (same permutation, shorter
    prefix). Returns the kept examples in their original order; ``split`` itself at rate 1."""
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


def _round_half_up(x: float) -> int:
    # Python's round() rounds halves to even; the split/sample counts use the schoolbook rule.
    # The epsilon absorbs float error such as 0.09 * 50 = 4.499999...
    return int(math.floor(x + 0.5 + 1e-9))

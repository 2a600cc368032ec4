"""Label ids, domain selection, the paper's splits and the sample rate (metakd/data/splits.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metakd import data as D
from metakd.config import DataConfig, SyntheticConfig
from metakd.data.splits import _assign_splits

from data_files import AMAZON, make_rows, needs_amazon, write_jsonl


def _small_synthetic(**kw) -> DataConfig:
    return DataConfig(synthetic=SyntheticConfig(num_domains=2, examples_per_domain=40, words_per_example=8), **kw)


# ----------------------------------------------------------------------------- splits


@needs_amazon
def test_amazon_splits_are_81_9_10_and_label_balanced():
    data = D.load_multidomain(DataConfig(source="amazon", path=str(AMAZON)), seed=0)
    assert data.domains == ["books", "dvd", "electronics", "kitchen"]
    assert data.name == "amazon" and data.num_labels == 2
    for s, n, per_label in (("train", 1620, 810), ("dev", 180, 90), ("test", 200, 100)):
        split = getattr(data, s)
        for k in range(4):
            assert np.bincount(split.labels[split.domains == k]).tolist() == [per_label, per_label], (s, k)
        assert len(split) == 4 * n
    # The three splits partition each domain's 2000 reviews (the files hold some duplicate
    # texts, so compare multisets rather than test disjointness).
    books = [t for s in D.SPLITS for t in getattr(data, s).for_domains(0).texts]
    in_file = [json.loads(line)["text"] for line in (AMAZON / "books.jsonl").read_text().splitlines()]
    assert sorted(books) == sorted(in_file)
    assert "books" in data.summary() and "1620" in data.summary()


@needs_amazon
def test_amazon_domain_selection_order_and_split_independent_of_other_domains():
    all4 = D.load_multidomain(DataConfig(source="amazon", path=str(AMAZON)), seed=0)
    two = D.load_multidomain(DataConfig(source="amazon", path=str(AMAZON), domains=["kitchen", "books"]), seed=0)
    assert two.domains == ["kitchen", "books"]
    assert two.test.for_domains(0).texts == all4.test.for_domains(3).texts
    assert two.train.for_domains(1).texts == all4.train.for_domains(0).texts


def test_split_is_fixed_by_split_seed_not_training_seed():
    a = D.load_multidomain(_small_synthetic(sample_rate=0.5), seed=1)
    b = D.load_multidomain(_small_synthetic(sample_rate=0.5), seed=2)
    assert a.dev.texts == b.dev.texts and a.test.texts == b.test.texts
    assert a.train.texts != b.train.texts  # the sample of the training split follows the seed
    again = D.load_multidomain(_small_synthetic(sample_rate=0.5), seed=1)
    assert again.train.texts == a.train.texts
    other = D.load_multidomain(_small_synthetic(sample_rate=0.5, split_seed=99), seed=1)
    assert other.test.texts != a.test.texts


def test_tiny_domain_split_keeps_both_labels_in_every_split():
    # 20 rows, 10 per label: test = 2, dev = round(1.8) = 2, train = 16, each stratified 1/1, 1/1, 8/8.
    split = _assign_splits(np.zeros(20, dtype=np.int64), np.arange(20) % 2, None, np.ones(20, bool), ["x"], 5)
    assert [np.bincount((np.arange(20) % 2)[split[s]]).tolist() for s in D.SPLITS] == [[8, 8], [1, 1], [1, 1]]
    assert sorted(np.concatenate([split[s] for s in D.SPLITS]).tolist()) == list(range(20))


def test_files_split_column_is_honoured_and_dev_carved_from_train(tmp_path):
    split = lambda d, i: "test" if i >= 15 else "train"  # noqa: E731
    f = write_jsonl(tmp_path / "d.jsonl", make_rows(split=split))
    data = D.load_multidomain(DataConfig(source="files", path=str(f)), seed=0)
    # 15 train rows per domain -> last round(1.5) = 2 become dev (MNLI rule), test = rows 15..19.
    assert data.train.for_domains(0).texts == [f"news text {i}" for i in range(13)]
    assert data.dev.for_domains(0).texts == ["news text 13", "news text 14"]
    assert data.test.for_domains(0).texts == [f"news text {i}" for i in range(15, 20)]


# ----------------------------------------------------------------------------- sample rate


def _strata_split(sizes: dict[tuple[int, int], int]) -> D.TextSplit:
    doms, labs = [], []
    for (d, y), n in sizes.items():
        doms += [d] * n
        labs += [y] * n
    perm = np.random.default_rng(0).permutation(len(doms))  # interleave, so "order kept" means something
    doms, labs = np.array(doms)[perm], np.array(labs)[perm]
    return D.TextSplit([f"t{i}" for i in range(len(doms))], None, labs, doms)


def test_subsample_counts_per_domain_and_label():
    split = _strata_split({(0, 0): 810, (0, 1): 810, (1, 0): 3, (1, 1): 100, (2, 1): 5})
    sub = D.subsample(split, 0.01, seed=3)
    counts = {(d, y): int(((sub.domains == d) & (sub.labels == y)).sum()) for d, y in
              [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1)]}
    # round(8.1) = 8; a 3-example stratum keeps its minimum of 1; round(1.0) = 1; 5 -> max(1, 0) = 1.
    assert counts == {(0, 0): 8, (0, 1): 8, (1, 0): 1, (1, 1): 1, (2, 1): 1}
    kept = [int(t[1:]) for t in sub.texts]
    assert kept == sorted(kept)  # original order preserved
    # Half-up rounding: 5 * 0.5 = 2.5 -> 3.
    assert len(D.subsample(_strata_split({(0, 0): 5}), 0.5, seed=0)) == 3
    # Smaller rates keep a subset of larger ones; the seed changes the sample.
    assert set(sub.texts) <= set(D.subsample(split, 0.1, seed=3).texts)
    assert D.subsample(split, 0.01, seed=4).texts != sub.texts
    assert D.subsample(split, 1.0, seed=3) is split


def test_sample_rate_thins_train_only():
    full = D.load_multidomain(DataConfig(), seed=0)
    low = D.load_multidomain(DataConfig(sample_rate=0.05), seed=0)
    assert low.dev.texts == full.dev.texts and low.test.texts == full.test.texts
    for k in range(len(full.domains)):
        for y in range(2):
            n = int(((full.train.domains == k) & (full.train.labels == y)).sum())
            m = int(((low.train.domains == k) & (low.train.labels == y)).sum())
            assert m == max(1, int(np.floor(0.05 * n + 0.5))), (k, y, n, m)
    assert D.load_full(DataConfig(sample_rate=0.05)).train.texts == full.train.texts  # load_full ignores the rate


# ----------------------------------------------------------------------------- errors


def test_domain_not_in_data_lists_available(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", make_rows())
    with pytest.raises(D.DataError, match=r"\['golf'\] not found.*available domains: \['news', 'sport'\]"):
        D.load_multidomain(DataConfig(source="files", path=str(f), domains=["sport", "golf"]), seed=0)


def test_label_out_of_range_names_file_column_and_value(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", make_rows(label=lambda i: 2 if i == 7 else i % 2))
    with pytest.raises(D.DataError) as e:
        D.load_multidomain(DataConfig(source="files", path=str(f), num_labels=2), seed=0)
    assert str(f) in str(e.value) and "'label'" in str(e.value) and "label 2 outside [0, 2)" in str(e.value)
    g = write_jsonl(tmp_path / "neg.jsonl", make_rows(label=lambda i: -3 if i == 1 else i % 2))
    with pytest.raises(D.DataError, match="label -3 outside"):
        D.load_multidomain(DataConfig(source="files", path=str(g)), seed=0)
    # Inferred num_labels is max + 1, so without num_labels the file has a class 2 of one row: too small.
    with pytest.raises(D.DataError, match=r"domain 'news' .* at least 10 rows of each class"):
        D.load_multidomain(DataConfig(source="files", path=str(f)), seed=0)


def test_missing_label_names_the_file_and_its_row(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_rows(("news",)))
    write_jsonl(tmp_path / "b.jsonl", make_rows(("sport",), label=lambda i: None if i == 4 else i % 2))
    with pytest.raises(D.DataError, match=r"b\.jsonl: line 5: column 'label' \(data.label_column\) is empty"):
        D.load_multidomain(DataConfig(source="files", path=str(tmp_path)), seed=0)


def test_fewer_than_two_labels_and_bad_split_value(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", make_rows(label=lambda i: 0))
    with pytest.raises(D.DataError, match="data has 1 label.*needs >= 2"):
        D.load_multidomain(DataConfig(source="files", path=str(f)), seed=0)
    with pytest.raises(D.DataError, match="data has 1 label.*needs >= 2"):
        D.load_multidomain(DataConfig(source="files", path=str(f), num_labels=2), seed=0)
    one_each = write_jsonl(tmp_path / "o.jsonl", make_rows(("news",), label=lambda i: 0)
                           + make_rows(("sport",), label=lambda i: 1))
    with pytest.raises(D.DataError, match="fewer than 2 distinct labels in the selected domains"):
        D.load_multidomain(DataConfig(source="files", path=str(one_each), domains=["news"]), seed=0)
    g = write_jsonl(tmp_path / "s.jsonl", make_rows(split=lambda d, i: "holdout"))
    with pytest.raises(D.DataError, match="'split' has value 'holdout'"):
        D.load_multidomain(DataConfig(source="files", path=str(g)), seed=0)

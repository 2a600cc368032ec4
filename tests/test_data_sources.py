"""The readers of the four sources (metakd/data/sources.py) and the synthetic corpus."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from metakd import data as D
from metakd.config import DataConfig, SyntheticConfig
from metakd.synthetic import domain_names, generate_corpus

from data_files import make_rows, write_jsonl


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the datasets library's Arrow cache inside the test's tmp dir."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


# ----------------------------------------------------------------------------- errors


def test_amazon_missing_directory_and_file(tmp_path):
    with pytest.raises(D.DataError, match=str(tmp_path / "nope")):
        D.load_multidomain(DataConfig(source="amazon", path=str(tmp_path / "nope")), seed=0)
    write_jsonl(tmp_path / "books.jsonl", make_rows(("books",)))
    with pytest.raises(D.DataError, match=r"music\.jsonl not found; available domains: \['books'\]"):
        D.load_multidomain(DataConfig(source="amazon", path=str(tmp_path), domains=["books", "music"]), seed=0)


def test_missing_column_names_column_file_and_available(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0, "genre": "x"}] * 5)
    with pytest.raises(D.DataError) as e:
        D.load_multidomain(DataConfig(source="files", path=str(f)), seed=0)
    msg = str(e.value)
    assert "'domain'" in msg and "data.domain_column" in msg and str(f) in msg and "['text', 'label', 'genre']" in msg


# ----------------------------------------------------------------------------- files and hf sources


def test_files_jsonl_csv_parquet_and_directory(tmp_path):
    rows = make_rows()
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    csv = tmp_path / "b.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    pq = tmp_path / "c.parquet"
    pd.DataFrame(rows).to_parquet(pq)
    for f in (jsonl, csv, pq):
        data = D.load_multidomain(DataConfig(source="files", path=str(f)), seed=0)
        assert data.domains == ["news", "sport"] and data.name == str(f)
        # 20 per domain: test round(2.0) = 2, dev round(1.8) = 2, train 16.
        assert data.counts() == {"train": {"news": 16, "sport": 16}, "dev": {"news": 2, "sport": 2},
                                 "test": {"news": 2, "sport": 2}}
        assert data.train.labels.dtype == np.int64 and data.label_names is None
        for s in D.SPLITS:  # file order kept within a domain's split
            rank = [int(t.split()[-1]) for t in getattr(data, s).for_domains(1).texts]
            assert rank == sorted(rank)
    both = D.load_multidomain(DataConfig(source="files", path=str(tmp_path)), seed=0)
    assert len(both.train) + len(both.dev) + len(both.test) == 3 * len(rows)


def test_files_csv_text_pairs_and_string_labels(tmp_path):
    rows = [{"premise": f"premise {i}", "hypothesis": f"hyp {i}",
             "label": ["neutral", "entailment", "contradiction"][i % 3], "genre": ["fiction", "travel"][i % 2]}
            for i in range(60)]
    f = tmp_path / "pairs.csv"
    pd.DataFrame(rows).to_csv(f, index=False)
    cfg = DataConfig(source="files", path=str(f), text_column="premise", text_pair_column="hypothesis",
                     domain_column="genre")
    data = D.load_multidomain(cfg, seed=0)
    assert data.label_names == ["contradiction", "entailment", "neutral"] and data.num_labels == 3
    everything = {t: (p, y) for s in D.SPLITS for t, p, y in
                  zip(getattr(data, s).texts, getattr(data, s).text_pairs, getattr(data, s).labels)}
    assert everything["premise 4"] == ("hyp 4", 1)  # entailment -> 1
    assert everything["premise 0"] == ("hyp 0", 2)  # neutral -> 2 (an empty text is refused: test_data_refusals)


def test_hf_local_json_file(tmp_path, hf_cache):
    f = write_jsonl(tmp_path / "d.json", make_rows())
    data = D.load_multidomain(DataConfig(source="hf", path=str(f)), seed=0)
    files = D.load_multidomain(DataConfig(source="files", path=str(f)), seed=0)
    assert data.test.texts == files.test.texts and data.train.texts == files.train.texts


def test_hf_mnli_like_first_90_train_last_10_dev_and_test_split(tmp_path, hf_cache):
    (tmp_path / "data").mkdir()
    genres = ["fiction", "travel"]
    train = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3, "genre": genres[i % 2]} for i in range(120)]
    valid = [{"premise": f"v{i}", "hypothesis": f"w{i}", "label": -1 if i == 4 else i % 3, "genre": genres[i % 2]}
             for i in range(10)]
    write_jsonl(tmp_path / "data" / "train-00000-of-00001.jsonl", train)
    write_jsonl(tmp_path / "data" / "validation_matched-00000-of-00001.jsonl", valid)
    cfg = DataConfig(source="hf", path=str(tmp_path), text_column="premise", text_pair_column="hypothesis",
                     domain_column="genre", hf_test_split="validation_matched")
    data = D.load_multidomain(cfg, seed=0)
    assert data.domains == genres
    fiction = [f"p{i}" for i in range(0, 120, 2)]  # 60 rows, in file order
    assert data.train.for_domains(0).texts == fiction[:54] and data.dev.for_domains(0).texts == fiction[54:]
    assert data.test.for_domains(0).texts == ["v0", "v2", "v6", "v8"]  # v4 had label -1
    assert data.test.for_domains(0).text_pairs == ["w0", "w2", "w6", "w8"]
    assert data.notes == [f"1 unlabelled rows (label -1 or '-') dropped: {tmp_path} [split validation_matched]: 1"]
    # without hf_test_split, validation_matched is the test set too (the MNLI rule)
    default = D.load_multidomain(DataConfig(**{**cfg.__dict__, "hf_test_split": None}), seed=0)
    assert default.test.texts == data.test.texts and default.train.texts == data.train.texts
    with pytest.raises(D.DataError, match=r"split 'test' not in .*available splits: \['train', 'validation_matched'\]"):
        D.load_multidomain(DataConfig(**{**cfg.__dict__, "hf_test_split": "test"}), seed=0)


# ----------------------------------------------------------------------------- synthetic corpus


def test_synthetic_corpus_shape_names_and_determinism():
    cfg = SyntheticConfig(num_domains=3, examples_per_domain=30)
    rows = generate_corpus(cfg)
    assert len(rows) == 90 and {r["domain"] for r in rows} == {"alpha", "beta", "gamma"}
    assert rows == generate_corpus(cfg) and rows != generate_corpus(SyntheticConfig(num_domains=3, examples_per_domain=30, seed=8))
    assert all(len(r["text"].split()) == cfg.words_per_example for r in rows)
    assert domain_names(10)[:2] == ["d00", "d01"] and domain_names(8)[-1] == "theta"
    # Noise-free labels are balanced within a domain.
    clean = generate_corpus(SyntheticConfig(num_domains=1, examples_per_domain=40, label_noise=0.0))
    assert sum(r["label"] for r in clean) == 20


def _bow_logreg_accuracy(train: D.TextSplit, test: D.TextSplit, vocab: dict[str, int]) -> float:
    def bow(split):
        x = np.zeros((len(split), len(vocab)))
        for i, t in enumerate(split.texts):
            for w in t.split():
                x[i, vocab[w]] += 1
        return x

    x, y = bow(train), np.eye(2)[train.labels]
    w, b = np.zeros((len(vocab), 2)), np.zeros(2)
    for _ in range(200):  # full-batch gradient descent on the softmax cross-entropy
        z = x @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        g = (p / p.sum(1, keepdims=True) - y) / len(x)
        w -= 0.5 * (x.T @ g + 1e-3 * w)
        b -= 0.5 * g.sum(0)
    return float(((bow(test) @ w + b).argmax(1) == test.labels).mean())


def test_synthetic_transfer_all_domains_beat_small_single_domain():
    full = D.load_multidomain(DataConfig(), seed=0)
    vocab = {w: i for i, w in enumerate(sorted({w for s in D.SPLITS for t in getattr(full, s).texts
                                                for w in t.split()}))}
    small = D.subsample(full.train, 0.05, seed=0)
    acc_all, acc_small = [], []
    for k in range(len(full.domains)):
        test = full.test.for_domains(k)
        acc_all.append(_bow_logreg_accuracy(full.train, test, vocab))
        acc_small.append(_bow_logreg_accuracy(small.for_domains(k), test, vocab))
    # Measured at the defaults: ~0.9 vs ~0.65 averaged over domains.
    assert np.mean(acc_all) > np.mean(acc_small) + 0.1, (acc_all, acc_small)
    assert np.mean(acc_all) > 0.8

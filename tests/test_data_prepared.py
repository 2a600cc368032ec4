"""Prepared data (metakd/data/prepared.py): its key, and its directory published on a Store."""

from __future__ import annotations

import json

import pytest
import torch

from metakd import data as D
from metakd.config import DataConfig, SyntheticConfig, from_dict
from metakd.data import prepared as P
from metakd.jobs import experiment
from metakd.jobs.registry import LocalRegistry
from metakd.storage import MARKER, Store

_SMALL = dict(synthetic=SyntheticConfig(num_domains=2, examples_per_domain=40, words_per_example=8))


def _boom(*a, **k):
    raise AssertionError("prepared data rebuilt although a complete copy is on the store")


def _same_tensors(a: D.PreparedData, b: D.PreparedData) -> bool:
    return all(torch.equal(getattr(getattr(a, s), f), getattr(getattr(b, s), f))
               for s in D.SPLITS for f in D.EncodedSplit.FIELDS)


def test_prepare_cache_hit_skips_tokenizer_training(tmp_path, monkeypatch):
    cfg = DataConfig(sample_rate=0.5, max_length=16, **_SMALL)
    first = D.prepare(cfg, seed=3, checkpoint=None, cache_dir=tmp_path)
    entry = tmp_path / first.key
    assert len(first.key) == 16 and not first.from_cache
    assert sorted(p.name for p in entry.iterdir()) == [MARKER, "encoded.pt", "meta.json", "tokenizer"]
    assert Store(str(tmp_path)).is_complete(first.key)
    assert json.loads((entry / "meta.json").read_text())["counts"] == first.data.counts()
    assert [p.name for p in tmp_path.iterdir()] == [first.key]  # no temp dirs left behind

    monkeypatch.setattr(P, "build_tokenizer", _boom)
    monkeypatch.setattr(P, "encode", _boom)
    second = D.prepare(cfg, seed=3, checkpoint=None, cache_dir=tmp_path)
    assert second.from_cache and second.key == first.key and _same_tensors(first, second)
    assert second.data.counts() == first.data.counts() and second.data.train.texts == first.data.train.texts
    assert second.tokenizer("a b", "c")["input_ids"] == first.tokenizer("a b", "c")["input_ids"]
    loaded = D.load_prepared(entry)  # what a worker reads: tensors and names, no raw texts
    assert _same_tensors(first, loaded) and loaded.data.domains == first.data.domains and not loaded.data.train.texts


def test_cache_without_marker_is_a_miss_and_a_late_writer_changes_nothing(tmp_path):
    cfg = DataConfig(max_length=16, **_SMALL)
    key = D.data_key(cfg, 0, None)
    (tmp_path / key).mkdir()  # a leftover without _COMPLETE
    (tmp_path / key / "junk").write_text("x")
    with pytest.raises(D.DataError, match="no _COMPLETE"):
        D.load_prepared(tmp_path / key)
    prepared = D.prepare(cfg, seed=0, checkpoint=None, cache_dir=tmp_path)
    assert not prepared.from_cache and (tmp_path / key / MARKER).exists()
    assert not (tmp_path / key / "junk").exists()
    before = (tmp_path / key / "meta.json").stat().st_mtime_ns
    D.publish_prepared(prepared, Store(str(tmp_path)), key)  # a second writer finishing late
    assert (tmp_path / key / "meta.json").stat().st_mtime_ns == before
    assert [p.name for p in tmp_path.iterdir()] == [key]


def test_cache_that_no_longer_matches_the_data_is_an_error(tmp_path):
    cfg = DataConfig(max_length=16, **_SMALL)
    key = D.prepare(cfg, seed=0, checkpoint=None, cache_dir=tmp_path).key
    meta = json.loads((tmp_path / key / "meta.json").read_text())
    meta["counts"]["train"]["alpha"] += 1  # as if the files under data.path had changed
    (tmp_path / key / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(D.DataError, match=f"cache {tmp_path / key} does not match the data read now"):
        D.prepare(cfg, seed=0, checkpoint=None, cache_dir=tmp_path)


def test_ensure_data_publishes_through_the_store_and_reuses_it(tmp_path, monkeypatch):
    cfg = from_dict({"seeds": [0, 1], "data": {"sample_rate": 0.5, "max_length": 16,
                                               "synthetic": {"num_domains": 2, "examples_per_domain": 40}}})
    store = Store(str(tmp_path / "store"))
    rels = experiment.ensure_data(cfg, store, LocalRegistry(), log=lambda *a: None)
    assert rels == {s: f"data/{D.data_key(cfg.data, s, None)}" for s in (0, 1)} and rels[0] != rels[1]
    for seed, rel in rels.items():
        assert store.is_complete(rel) and (tmp_path / "store" / rel / MARKER).exists()
        assert _same_tensors(D.load_prepared(store.fetch_dir(rel)), D.prepare(cfg.data, seed, None))
    assert sorted(p.name for p in (tmp_path / "store" / "data").iterdir()) == sorted(r[5:] for r in rels.values())

    monkeypatch.setattr(experiment, "prepare", _boom)
    assert experiment.ensure_data(cfg, store, LocalRegistry(), log=lambda *a: None) == rels


def test_data_key_covers_what_matters():
    base = DataConfig(sample_rate=1.0)
    k = D.data_key(base, 0, None)
    assert k == "0eed8d2c00b4a934"  # pinned (the key before metakd/data/ was split): changing it must be deliberate
    assert D.data_key(base, 1, None) == k  # all training data kept: the seed does not matter
    assert D.data_key(DataConfig(sample_rate=0.1), 1, None) != D.data_key(DataConfig(sample_rate=0.1), 2, None)
    assert D.data_key(base, 0, "bert-base-uncased") != k
    assert D.data_key(DataConfig(text_column="other"), 0, None) == k  # unused by the synthetic source
    assert D.data_key(DataConfig(synthetic=SyntheticConfig(seed=8)), 0, None) != k
    assert D.data_key(DataConfig(vocab_size=500), 0, None) != k
    assert D.data_key(DataConfig(vocab_size=500), 0, "bert-base-uncased") == D.data_key(base, 0, "bert-base-uncased")
    assert D.data_key(DataConfig(truncation="head_tail"), 0, None) != k

"""Prototype features: one frozen-encoder pass per (initial encoder, prepared data), stored and
shared by every meta-teacher, sharded across ranks, claimed like a teacher."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metakd.config import ModelConfig, from_dict
from metakd.data import EncodedSplit
from metakd.jobs.registry import LocalRegistry
from metakd.models import build_teacher
from metakd.storage import Store
from metakd.train import features
from metakd.train.features import features_key, prototype_features
from metakd.train.runtime import LocalRuntime
from metakd.train.sharded import sharded_forward
from metakd.train.teacher import compute_prototype_scores

VOCAB, SEQ, N = 90, 12, 11

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _split(n=N) -> EncodedSplit:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)
    mask = (torch.arange(SEQ)[None] < torch.randint(3, SEQ + 1, (n,), generator=g)[:, None]).long()
    return EncodedSplit(ids * mask, mask, torch.zeros_like(ids), labels=torch.arange(n) % 2,
                        domains=(torch.arange(n) // 2) % 2)


def _teacher(seed=0):
    torch.manual_seed(seed)
    return build_teacher(ModelConfig(preset="tiny-teacher"), VOCAB, SEQ, 2, 2)


def _counting(model):
    rows = []
    forward = model.forward

    def counted(*a, **k):
        rows.append(len(k["input_ids"]))
        return forward(*a, **k)

    model.forward = counted
    return rows


def test_key_covers_the_initial_weights_and_the_data_not_the_scoring_settings():
    cfg = from_dict({})
    key = features_key(cfg, 0, "data", "cpu")
    assert features_key(cfg, 1, "data", "cpu") != key  # random init: the seed makes the weights
    assert features_key(cfg, 0, "other", "cpu") != key
    assert features_key(from_dict({"teacher": {"preset": "bert-mini"}}), 0, "data", "cpu") != key
    assert features_key(from_dict({"meta_teacher": {"alpha": 0.2, "prototype": "domain", "gamma1": 0.1}}),
                        0, "data", "cpu") == key
    assert features_key(from_dict({"precision": "bf16"}), 0, "data", "cpu") != key
    ckpt = from_dict({"teacher": {"checkpoint": "some/model"}})
    assert features_key(ckpt, 0, "data", "cpu") == features_key(ckpt, 1, "data", "cpu")  # pretrained weights


def test_features_are_computed_once_and_shared_through_the_store(tmp_path):
    store = Store(str(tmp_path))
    prepared = SimpleNamespace(key="data", train=_split())
    runtime = LocalRuntime("cpu")
    first = _teacher()
    rows = _counting(first)
    feats = prototype_features(first, prepared, from_dict({}), 0, runtime, store)
    assert sum(rows) == N and feats.shape == (N, 64)
    assert len(store.list_dirs("features")) == 1
    with torch.no_grad():
        direct = first.eval()(**prepared.train.to_dict()).features
    assert torch.allclose(feats, direct, atol=1e-5)
    # another meta-teacher of the same initial encoder (other alpha / prototype mode): no pass at all
    second = _teacher()
    rows2 = _counting(second)
    again = prototype_features(second, prepared, from_dict({"meta_teacher": {"alpha": 0.3}}), 0, runtime, store)
    assert rows2 == [] and torch.equal(again, feats)
    # scores of each configuration come from the shared features
    by_class = compute_prototype_scores(feats, prepared.train, [0, 1], from_dict({}))
    by_domain = compute_prototype_scores(feats, prepared.train, [0, 1],
                                         from_dict({"meta_teacher": {"prototype": "domain"}}))
    assert by_class.shape == by_domain.shape == (N,) and not torch.allclose(by_class, by_domain)
    # another seed is another random encoder: computed anew
    prototype_features(_teacher(1), prepared, from_dict({}), 1, runtime, store)
    assert len(store.list_dirs("features")) == 2


def test_trainers_side_by_side_claim_the_features_and_compute_them_once(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "POLL_S", 0.02)
    store = Store(str(tmp_path))
    prepared = SimpleNamespace(key="data", train=_split())
    registry = LocalRegistry()
    models = {name: _teacher() for name in ("a", "b")}
    rows = {name: _counting(model) for name, model in models.items()}
    slow = models["a"].forward
    started = threading.Event()

    def slow_forward(*a, **k):  # a's pass is under way while b asks for the features
        started.set()
        time.sleep(0.3)
        return slow(*a, **k)

    models["a"].forward = slow_forward
    out = {}

    def trainer(name):
        out[name] = prototype_features(models[name], prepared, from_dict({}), 0, LocalRuntime("cpu"), store,
                                       registry.for_owner(name))

    a = threading.Thread(target=trainer, args=("a",))
    a.start()
    assert started.wait(30)
    trainer("b")
    a.join()
    assert sum(rows["a"]) == N and rows["b"] == []  # b waited for a's features instead of computing them
    assert torch.equal(out["a"], out["b"]) and len(store.list_dirs("features")) == 1
    rel = f"features/{features_key(from_dict({}), 0, 'data', 'cpu')}"
    assert registry.backend.states([rel]) == {rel: ("done", None)}


def test_a_trainer_that_fails_computing_the_features_gives_its_claim_back(tmp_path):
    store = Store(str(tmp_path))
    prepared = SimpleNamespace(key="data", train=_split())
    registry = LocalRegistry()
    broken = _teacher()
    broken.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost"))
    with pytest.raises(RuntimeError, match="device lost"):
        prototype_features(broken, prepared, from_dict({}), 0, LocalRuntime("cpu"), store, registry.for_owner("a"))
    rel = f"features/{features_key(from_dict({}), 0, 'data', 'cpu')}"
    assert registry.backend.states([rel]) == {rel: ("missing", None)}  # the next one need not wait for it
    feats = prototype_features(_teacher(), prepared, from_dict({}), 0, LocalRuntime("cpu"), store,
                               registry.for_owner("b"))
    assert feats.shape == (N, 64) and store.is_complete(rel)


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _teacher()
    rows = _counting(model)
    runtime = SimpleNamespace(rank=rank, world_size=world, device=torch.device("cpu"))
    out = sharded_forward(model, _split(), lambda o, b: {"features": o.features}, runtime, batch_size=4)
    torch.save({"features": out["features"], "rows": sum(rows)}, f"{out_dir}/{rank}.pt")
    dist.barrier()  # leave together (see tests/test_recipe_ddp.py)
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_pass_is_sharded_across_ranks_and_every_rank_gets_all_rows(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert (r0["rows"], r1["rows"]) == (6, 5)  # blocks of ceil(11 / 2) rows
    single = sharded_forward(_teacher(), _split(), lambda o, b: {"features": o.features}, LocalRuntime("cpu"))
    assert torch.equal(r0["features"], r1["features"])
    assert torch.allclose(r0["features"], single["features"], atol=1e-5)

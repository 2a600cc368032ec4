"""Training in-process (no Ray): the experiment end to end, teacher reuse, plan, Distiller, ensure, evaluate."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from metakd.report import results
from metakd.config import ModelConfig, from_dict
from metakd.data import EncodedSplit, load_prepared
from metakd.models import build_student, build_teacher, load_model
from metakd.storage import Store
from metakd.jobs.experiment import LocalRegistry, count_teacher_trainings, ensure, plan
from metakd.train.loop import evaluate
from metakd.jobs.run import format_table, run_local
from metakd.report.rows import running_metrics
from metakd.train.student import Distiller
from metakd.train.teacher import compute_prototype_scores, teacher_spec
from metakd.train.teacher_cache import TeacherOutputs

# Tuned to learn reliably in a few seconds on 2 CPU cores: a small vocabulary (each polarity
# word is seen often), no label noise, batch 16 (enough optimiser steps on 162 examples).
BASE = {
    "name": "tiny",
    "methods": ["metakd", "student_ft"],
    "seeds": [0],
    "device": "cpu",
    "data": {
        "max_length": 24, "vocab_size": 400,
        "synthetic": {"num_domains": 2, "examples_per_domain": 200, "words_per_example": 16,
                      "shared_vocab": 40, "domain_vocab": 20, "label_noise": 0.0},
    },
    "teacher": {"preset": "tiny-teacher", "epochs": 4, "lr": 2e-3, "batch_size": 16},
    "student": "tiny-student",
    "distill": {"stage1_epochs": 1, "stage1_lr": 3e-3, "stage2_epochs": 4, "stage2_lr": 3e-3,
                "epochs": 2, "lr": 3e-3, "batch_size": 16},
}
DOMAINS = ["alpha", "beta"]

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _cfg(**over) -> object:
    raw = copy.deepcopy(BASE)

    def merge(a, b):
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(a.get(k), dict):
                merge(a[k], v)
            else:
                a[k] = v

    merge(raw, over)
    return from_dict(raw)


def _quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    out = run_local(_cfg(), root=str(root), log=_quiet)
    return root, out


def _fork(base_root: Path, dst: Path) -> Path:
    """A new root holding the base run's prepared data and teachers (not its results)."""
    for sub in ("data", "teachers"):
        shutil.copytree(base_root / sub, dst / sub)
    return dst


# ----------------------------------------------------------------------------- end to end


def test_meta_teacher_and_metakd_students_learn(base_run):
    _, out = base_run
    assert out["domains"] == DOMAINS
    (teacher,) = out["teachers_trained"]
    assert teacher["kind"] == "meta" and teacher["domain"] is None
    assert teacher["dev_accuracy"] >= 0.8, teacher["curve"]
    metakd = [s for s in out["students"] if s["method"] == "metakd"]
    assert sorted(s["domain"] for s in metakd) == DOMAINS
    avg = sum(s["test_accuracy"] for s in metakd) / len(metakd)
    assert avg >= 0.7, [(s["domain"], s["test_accuracy"]) for s in metakd]
    for s in out["students"]:
        assert 0.0 <= s["dev_accuracy"] <= 1.0 and math.isfinite(s["test_loss"])
        assert s["student_layers"] == 2 and s["student_hidden"] == 32
        assert s["latency_ms_b1"] > 0 and s["latency_ms_b32"] > 0
    ft = [s for s in out["students"] if s["method"] == "student_ft"]
    assert all(s["teacher_key"] is None and s["teacher_params"] is None for s in ft)
    assert all(s["teacher_key"] == teacher["key"] for s in metakd)


def test_results_part_parses_with_one_row_per_method_domain_split(base_run):
    root, out = base_run
    part = root / "results" / "run.parquet"
    assert part.is_file() and (root / "curves" / "run.parquet").is_file()
    df = pd.read_parquet(part)
    assert len(df) == 2 * 2 * 2  # methods x domains x splits
    assert set(zip(df["method"], df["domain"], df["split"])) == {
        (m, d, s) for m in ("metakd", "student_ft") for d in DOMAINS for s in ("dev", "test")}
    assert (df["gamma2"] == 0.5).all() and (df["sample_rate"] == 1.0).all() and (df["status"] == "ok").all()
    by_student = {(s["method"], s["domain"]): s for s in out["students"]}
    for r in df.itertuples():
        assert r.accuracy == pytest.approx(by_student[(r.method, r.domain)][f"{r.split}_accuracy"])
    assert len(results.load(str(root))) == 8
    table = format_table(out["rows"], "test")
    assert "metakd" in table and "student_ft" in table and "average" in table


def test_teacher_artifacts_exist_and_parse(base_run):
    root, out = base_run
    key = out["teacher_keys"][0]
    d = root / "teachers" / key
    expected = {"_COMPLETE", "model.json", "model.safetensors", "scores.pt", "teacher.json"}
    assert expected <= {p.name for p in d.iterdir()}
    summary = json.loads((d / "teacher.json").read_text())
    assert summary["key"] == key and summary["kind"] == "meta" and len(summary["curve"]) == 4
    scores = torch.load(d / "scores.pt", weights_only=True)["scores"]
    n_train = 2 * (200 - 18 - 20)  # 81/9/10 split: 18 dev, 20 test per domain
    assert scores.shape == (n_train,)
    assert not torch.allclose(scores, torch.ones_like(scores))  # prototype weighting is on
    assert scores.abs().max() <= 1.0 + 1e-5  # convex combinations of cosines
    assert count_teacher_trainings(Store(str(root))) == 1
    # the frozen teacher computed once: its outputs on every training example, for the prepared data it saw
    prepared = load_prepared(next((root / "data").glob("*/meta.json")).parent)
    outputs = TeacherOutputs.load(str(d), prepared.key, "cpu")
    assert outputs is not None and outputs.logits.shape == (n_train, 2)
    teacher = load_model(d).eval()
    rows = prepared.train.select(torch.arange(5))
    with torch.no_grad():
        ref = teacher(**rows.to_dict())
    assert torch.allclose(outputs.logits[rows.index], ref.logits, atol=1e-5)
    assert torch.allclose(outputs.domain_repr[rows.index], ref.domain_repr, atol=1e-5)
    # the prototype features it was scored with are a shared artifact
    assert len(Store(str(root)).list_dirs("features")) == 1


def test_two_stage_curve_has_both_stages(base_run):
    _, out = base_run
    s = next(s for s in out["students"] if s["method"] == "metakd")
    assert [p["stage"] for p in s["curve"]] == ["stage1"] + ["stage2"] * 4
    ft = next(s for s in out["students"] if s["method"] == "student_ft")
    assert [p["stage"] for p in ft["curve"]] == ["finetune"] * 2


def test_teacher_is_reused_across_gamma2_and_retrained_for_gamma1(base_run, tmp_path):
    base_root, base = base_run
    root = _fork(base_root, tmp_path / "g2")
    fast = {"stage1_epochs": 0, "stage2_epochs": 1}
    out = run_local(_cfg(methods=["metakd"], distill={**fast, "gamma2": 0.0}), root=str(root), log=_quiet)
    assert out["teachers_trained"] == []
    assert out["teacher_keys"] == base["teacher_keys"]
    assert {s["teacher_key"] for s in out["students"]} == set(base["teacher_keys"])
    assert count_teacher_trainings(Store(str(root))) == 0

    out = run_local(_cfg(methods=["metakd"], distill=fast, meta_teacher={"gamma1": 0.1}), root=str(root), log=_quiet)
    assert [t["kind"] for t in out["teachers_trained"]] == ["meta"]
    assert out["teacher_keys"] != base["teacher_keys"]
    assert (root / "teachers" / out["teacher_keys"][0] / "_COMPLETE").is_file()


def test_stage1_epochs_zero_skips_stage1(base_run, tmp_path):
    root = _fork(base_run[0], tmp_path / "s0")
    out = run_local(_cfg(methods=["metakd"], distill={"stage1_epochs": 0, "stage2_epochs": 2}), root=str(root),
                    log=_quiet)
    assert out["teachers_trained"] == []
    for s in out["students"]:
        assert [p["stage"] for p in s["curve"]] == ["stage2", "stage2"]


def test_joint_schedule_with_js_runs(base_run, tmp_path):
    root = _fork(base_run[0], tmp_path / "joint")
    out = run_local(_cfg(methods=["metakd"], distill={"schedule": "joint", "epochs": 1, "pred_loss": "js"}),
                    root=str(root), log=_quiet)
    assert len(out["students"]) == 2
    for s in out["students"]:
        assert [p["stage"] for p in s["curve"]] == ["joint"]
        assert math.isfinite(s["curve"][0]["train_loss"]) and s["curve"][0]["train_loss"] > 0
    assert (pd.read_parquet(root / "results" / "run.parquet")["pred_loss"] == "js").all()


# ----------------------------------------------------------------------------- plan and teacher keys


def _specs(methods, seeds=(0,), domains=("a", "b", "c"), **over):
    cfg = _cfg(methods=list(methods), seeds=list(seeds), **over)
    return plan(cfg, list(domains))


def test_plan_teachers_per_method():
    specs, jobs = _specs(["metakd"], seeds=(0, 1))
    assert [(s.kind, s.domain, s.seed) for s in specs] == [("meta", None, 0), ("meta", None, 1)]
    assert len(jobs) == 6 and {j["teacher_key"] for j in jobs if j["seed"] == 1} == {specs[1].key}

    specs, jobs = _specs(["kd_single"])
    assert [(s.kind, s.domain) for s in specs] == [("single", "a"), ("single", "b"), ("single", "c")]
    assert [j["teacher_key"] for j in jobs] == [s.key for s in specs]  # each student its own domain's teacher

    specs, jobs = _specs(["student_ft"])
    assert specs == [] and len(jobs) == 3
    assert all(j["teacher_key"] is None and j["teacher_rel"] is None for j in jobs)

    specs, _ = _specs(["metakd_no_target"])
    assert [(s.kind, s.domain) for s in specs] == [("meta_no_target", d) for d in "abc"]

    specs, jobs = _specs(["kd_mix", "kd_mtl", "metakd"])
    assert sorted(s.kind for s in specs) == ["meta", "mix", "mtl"] and len(jobs) == 9
    assert all(j["teacher_rel"] == f"teachers/{j['teacher_key']}" for j in jobs)


def test_plan_refuses_no_target_with_one_domain():
    with pytest.raises(ValueError, match="at least 2 domains"):
        _specs(["metakd_no_target"], domains=("a",))


def test_teacher_keys_ignore_student_settings_but_not_teacher_settings():
    def key(method="metakd", domain="a", seed=0, **over):
        return teacher_spec(_cfg(**over), method, domain, seed).key

    base = key()
    assert key(domain="b") == base  # one meta-teacher for every target
    assert key(distill={"gamma2": 0.0}) == base
    assert key(distill={"schedule": "joint", "stage2_lr": 1e-4}) == base
    assert key(student="tiny-student-1l") == base
    assert key(methods=["metakd", "kd_single"]) == base
    assert key(meta_teacher={"gamma1": 0.1}) != base
    assert key(data={"sample_rate": 0.5}) != base
    assert key(seed=1) != base
    assert key(teacher={"epochs": 5}) != base
    # baseline teachers do not depend on the meta-teacher's loss settings, but on the target domain
    single = key("kd_single")
    assert key("kd_single", meta_teacher={"gamma1": 0.1}) == single
    assert key("kd_single", domain="b") != single
    assert key("metakd_no_target") != key("metakd_no_target", domain="b")


# ----------------------------------------------------------------------------- Distiller


VOCAB, SEQ = 80, 12


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    teacher = build_teacher(ModelConfig(preset="tiny-teacher"), VOCAB, SEQ, 2, 2).eval()
    student = build_student(ModelConfig(preset="tiny-student"), teacher, VOCAB, SEQ).eval()  # eval: no dropout
    g = torch.Generator().manual_seed(1)
    n = 6
    ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[:2, 7:] = 0
    batch = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
             "labels": torch.tensor([0, 1, 1, 0, 1, 0]), "domains": torch.tensor([0, 1, 0, 1, 0, 1]),
             "index": torch.tensor([5, 0, 3, 1, 4, 2])}
    scores = torch.tensor([0.9, -0.2, 0.4, 0.1, 0.7, 0.3])  # t_i indexed by batch["index"]
    return teacher, student, batch, scores


def _lambda(teacher, batch, scores):
    p = teacher(**batch).logits.softmax(-1).gather(1, batch["labels"][:, None]).squeeze(1)
    t = scores[batch["index"]]
    return (1 + t) / (1 + torch.exp((1 - p) ** 2))


def _soft_ce(student, teacher, batch, temperature=1.0):
    zs, zt = student(**batch).logits / temperature, teacher(**batch).logits / temperature
    return -(zt.softmax(-1) * zs.log_softmax(-1)).sum(-1)


def _intermediate(student, teacher, batch):
    """L_embd + sum_j (L_hidn + L_attn) by the spec's formulas, g(j) = 2j for 2 vs 4 layers."""
    s = student(**batch, output_states=True)
    t = teacher(**batch, output_states=True)
    m = batch["attention_mask"].float()
    n_tok = m.sum(1)

    def hid(a, b):
        return ((student.hidden_proj(a) - b) ** 2).sum(-1).mul(m).sum(1) / (n_tok * b.shape[-1])

    def att(a, b):  # 2 vs 4 heads: compare head-averaged maps
        pairs = m[:, :, None] * m[:, None, :]
        return ((a.mean(1) - b.mean(1)) ** 2).mul(pairs).sum((1, 2)) / pairs.sum((1, 2))

    per = hid(s.hidden_states[0], t.hidden_states[0])
    for j, g in ((1, 2), (2, 4)):
        per = per + hid(s.hidden_states[j], t.hidden_states[g]) + att(s.attentions[j - 1], t.attentions[g - 1])
    tkd = ((student.repr_proj(s.domain_repr) - t.domain_repr) ** 2).mean(-1)
    return per, tkd


@torch.no_grad()
def test_distiller_weights_are_ones_without_meta(pair):
    teacher, student, batch, scores = pair
    d = Distiller(teacher, student, _cfg(), meta=False, scores=None)
    assert d.gamma2 == 0.0 and d.layers == [2, 4]
    assert torch.allclose(d.stage2(student, batch), _soft_ce(student, teacher, batch).mean(), atol=1e-6)
    per, _ = _intermediate(student, teacher, batch)
    assert torch.allclose(d.stage1(student, batch), per.mean(), rtol=1e-5)


@torch.no_grad()
def test_distiller_weights_are_domain_expertise_with_meta(pair):
    teacher, student, batch, scores = pair
    d = Distiller(teacher, student, _cfg(distill={"gamma2": 0.7}), meta=True, scores=scores)
    assert d.gamma2 == 0.7
    lam = _lambda(teacher, batch, scores)
    assert torch.allclose(d.stage2(student, batch), (lam * _soft_ce(student, teacher, batch)).mean(), atol=1e-6)
    per, tkd = _intermediate(student, teacher, batch)
    assert torch.allclose(d.stage1(student, batch), (lam * (per + 0.7 * tkd)).mean(), rtol=1e-5)
    # joint = the whole L_KD at once: the same weights on the sum of both stages' terms
    assert torch.allclose(d.joint(student, batch), d.stage1(student, batch) + d.stage2(student, batch), rtol=1e-5)


@torch.no_grad()
def test_distiller_temperature_scales_the_prediction_loss(pair):
    teacher, student, batch, _ = pair
    d = Distiller(teacher, student, _cfg(distill={"temperature": 3.0}), meta=False, scores=None)
    assert torch.allclose(d.stage2(student, batch), _soft_ce(student, teacher, batch, 3.0).mean(), atol=1e-6)


def _divergence(kind, student, teacher, batch):
    log_p, log_q = teacher(**batch).logits.log_softmax(-1), student(**batch).logits.log_softmax(-1)
    p, q = log_p.exp(), log_q.exp()
    if kind == "rkl":
        return (q * (log_q - log_p)).sum(-1)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    m = (p + q) / 2
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


@pytest.mark.parametrize("kind", ["rkl", "js", "tvd"])
def test_distiller_pred_loss_variants(pair, kind):
    teacher, student, batch, scores = pair
    d = Distiller(teacher, student, _cfg(distill={"pred_loss": kind}), meta=True, scores=scores)
    loss = d.stage2(student, batch)
    with torch.no_grad():
        expected = (_lambda(teacher, batch, scores) * _divergence(kind, student, teacher, batch)).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()  # the student gets gradients, the frozen teacher none
    assert student.classifier.weight.grad is not None and student.classifier.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- prototype scores


def _split(n_per_domain=4):
    n = 2 * n_per_domain
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)
    domains = torch.tensor([0] * n_per_domain + [1] * n_per_domain)
    return EncodedSplit(ids, torch.ones(n, SEQ, dtype=torch.long), torch.zeros(n, SEQ, dtype=torch.long),
                        labels=torch.tensor([0, 1] * n_per_domain), domains=domains)


def _features(model, split):
    """E(x) of the frozen model, rows by index (what metakd.train.features stores)."""
    from metakd.train.features import encoder_features
    from metakd.train.runtime import LocalRuntime

    return encoder_features(model, split, LocalRuntime("cpu"))


def test_prototype_weighting_false_gives_ones():
    cfg = _cfg(meta_teacher={"prototype_weighting": False})
    scores = compute_prototype_scores(torch.zeros(8, 0), _split(), [0, 1], cfg)
    assert torch.equal(scores, torch.ones(8))


def test_prototype_scores_for_a_subset_of_domains(pair):
    teacher = pair[0]
    split = _split()
    scores = compute_prototype_scores(_features(teacher, split), split, [0], _cfg())
    assert torch.equal(scores[4:], torch.ones(4))  # domain 1 is not among the teacher's domains
    teacher.eval()
    with torch.no_grad():
        feats = teacher(**split.for_domains([0]).to_dict()).features
    labels = split.labels[:4]
    # one domain: K' = 1, t_i = cos(E_i, p[d_i, y_i])
    for i in range(4):
        proto = feats[labels == labels[i]].mean(0)
        assert scores[i] == pytest.approx(float(F.cosine_similarity(feats[i], proto, dim=0)), abs=1e-5)


# ----------------------------------------------------------------------------- ensure


def _publish(store: Store, rel: str) -> None:
    tmp = Path(store.local_root) / ".src"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "x.txt").write_text(rel)
    store.publish_dir(tmp, rel)
    shutil.rmtree(tmp)


def test_ensure_builds_missing_keys_once_and_reuses_complete_ones(tmp_path):
    store = Store(str(tmp_path))
    _publish(store, "teachers/done")
    calls = []

    def build(keys):
        calls.append(sorted(keys))
        for k in keys:
            _publish(store, f"teachers/{k}")

    items = {k: f"teachers/{k}" for k in ("done", "a", "b")}
    registry = LocalRegistry()
    assert sorted(ensure(store, registry, items, build, log=_quiet)) == ["a", "b"]
    assert calls == [["a", "b"]]
    assert ensure(store, registry, items, build, log=_quiet) == []
    assert ensure(store, LocalRegistry(), items, build, log=_quiet) == []  # complete on the store
    assert calls == [["a", "b"]]
    assert (tmp_path / "teachers" / "a" / "x.txt").read_text() == "teachers/a"


def test_ensure_releases_keys_whose_build_left_nothing(tmp_path):
    store, registry = Store(str(tmp_path)), LocalRegistry()
    with pytest.raises(RuntimeError, match="without a complete artifact"):
        ensure(store, registry, {"k": "teachers/k"}, lambda keys: None, log=_quiet)
    assert registry.claim("k") == "mine"  # released: the next caller may build it


def test_ensure_releases_keys_when_build_raises(tmp_path):
    store, registry = Store(str(tmp_path)), LocalRegistry()

    def boom(keys):
        raise KeyError("no")

    with pytest.raises(KeyError):
        ensure(store, registry, {"k": "teachers/k"}, boom, log=_quiet)
    assert "k" not in registry.state


# ----------------------------------------------------------------------------- evaluate and metrics


class _Stub(torch.nn.Module):
    """Logits looked up from a table by input_ids[:, 0]."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def test_evaluate_per_domain_accuracy_and_loss_by_hand():
    table = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 3.0]])
    rows = [  # (table row, label, domain)
        (0, 0, 0), (1, 0, 0), (3, 1, 2),  # batch 1
        (1, 1, 0), (0, 1, 2), (3, 1, 2), (2, 0, 2),  # batch 2
    ]

    def batch(rs):
        return {"input_ids": torch.tensor([[r[0], 0] for r in rs]), "attention_mask": torch.ones(len(rs), 2),
                "labels": torch.tensor([r[1] for r in rs]), "domains": torch.tensor([r[2] for r in rs]),
                "extra": torch.zeros(len(rs))}

    loader = [batch(rows[:3]), batch(rows[3:])]
    model = _Stub(table).train()
    out = evaluate(model, loader, ["books", "dvd", "kitchen"], "cpu")
    assert model.training  # mode restored
    # books: rows 0 (argmax 0, y 0 ok), 1 (argmax 1, y 0 wrong), 1 (argmax 1, y 1 ok) -> 2/3
    # kitchen: 3 (y 1 ok), 0 (argmax 0, y 1 wrong), 3 (ok), 2 (tie -> argmax 0, y 0 ok) -> 3/4
    assert set(out["accuracy"]) == {"books", "kitchen"}
    assert out["accuracy"]["books"] == pytest.approx(2 / 3)
    assert out["accuracy"]["kitchen"] == pytest.approx(3 / 4)
    assert out["average"] == pytest.approx((2 / 3 + 3 / 4) / 2)

    def ce(row, y):
        z = table[row].tolist()
        return math.log(sum(math.exp(v) for v in z)) - z[y]

    books = (ce(0, 0) + ce(1, 0) + ce(1, 1)) / 3
    kitchen = (ce(3, 1) + ce(0, 1) + ce(3, 1) + ce(2, 0)) / 4
    assert out["loss"]["books"] == pytest.approx(books, rel=1e-5)
    assert out["loss"]["kitchen"] == pytest.approx(kitchen, rel=1e-5)


def test_running_metrics_average_the_first_method():
    res = [{"method": "metakd", "dev_accuracy": 0.8, "test_accuracy": 0.6},
           {"method": "kd_single", "dev_accuracy": 0.5, "test_accuracy": 0.4},
           {"method": "metakd", "dev_accuracy": 0.6, "test_accuracy": 0.9}]
    m = running_metrics(res, ["metakd", "kd_single"])
    assert m["jobs_done"] == 3
    assert m["dev_accuracy"] == pytest.approx(0.7) and m["test_accuracy"] == pytest.approx(0.75)
    assert m["kd_single/dev_accuracy"] == pytest.approx(0.5)
    # the first method has no result yet: everything so far
    m = running_metrics(res[1:2], ["metakd", "kd_single"])
    assert m["dev_accuracy"] == pytest.approx(0.5) and "metakd/dev_accuracy" not in m

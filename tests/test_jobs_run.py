"""``metakd run`` in-process (no Ray), end to end: a meta-teacher and its students learn, the results
part parses, the teacher's artifacts exist, teachers are reused across gamma2 and retrained for gamma1,
and the distillation schedules run. Slow: the module's fixture trains a teacher and four students."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from metakd.config import from_dict
from metakd.data import load_prepared
from metakd.jobs.events import count_teacher_trainings
from metakd.jobs.run import format_table, run_local
from metakd.models import load_model
from metakd.report import results
from metakd.storage import Store
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

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread_torch")]


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
    (name,) = out["parts"]  # one configuration, one seed: one part
    part = root / "results" / f"{name}.parquet"
    assert part.is_file() and (root / "curves" / f"{name}.parquet").is_file()
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
    assert (pd.read_parquet(root / "results" / f"{out['parts'][0]}.parquet")["pred_loss"] == "js").all()

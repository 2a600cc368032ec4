"""An experiment's plan (its teachers and student jobs), the student key, and ``ensure`` (build each
missing artifact once, through the registry)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from metakd.config import from_dict
from metakd.jobs.experiment import ensure, plan, student_identity
from metakd.jobs.registry import LocalRegistry
from metakd.storage import Store
from metakd.train.student import StudentJob


def _cfg(**over):
    return from_dict({"methods": ["metakd", "kd_single"], **over})


# ----------------------------------------------------------------------------- plan


def _plan(methods, seeds=(0,), domains=("a", "b", "c")):
    return plan(_cfg(methods=list(methods), seeds=list(seeds)), list(domains))


def test_plan_teachers_per_method():
    specs, jobs = _plan(["metakd"], seeds=(0, 1))
    assert [(s.kind, s.domain, s.seed) for s in specs] == [("meta", None, 0), ("meta", None, 1)]
    assert len(jobs) == 6 and {j.teacher_key for j in jobs if j.seed == 1} == {specs[1].key}
    assert all(isinstance(j, StudentJob) and j.method == "metakd" for j in jobs)
    assert [(j.domain, j.seed) for j in jobs] == [(d, s) for s in (0, 1) for d in "abc"]

    specs, jobs = _plan(["kd_single"])
    assert [(s.kind, s.domain) for s in specs] == [("single", "a"), ("single", "b"), ("single", "c")]
    assert [j.teacher_key for j in jobs] == [s.key for s in specs]  # each student its own domain's teacher

    specs, jobs = _plan(["student_ft"])
    assert specs == [] and len(jobs) == 3
    assert all(j.teacher_key is None and j.teacher_rel is None for j in jobs)

    specs, _ = _plan(["metakd_no_target"])
    assert [(s.kind, s.domain) for s in specs] == [("meta_no_target", d) for d in "abc"]

    specs, jobs = _plan(["kd_mix", "kd_mtl", "metakd"])
    assert sorted(s.kind for s in specs) == ["meta", "mix", "mtl"] and len(jobs) == 9
    rel = {s.key: s.rel for s in specs}
    assert all(j.teacher_rel == rel[j.teacher_key] == f"teachers/{j.teacher_key}" for j in jobs)


def test_plan_refuses_no_target_with_one_domain():
    with pytest.raises(ValueError, match="at least 2 domains"):
        _plan(["metakd_no_target"], domains=("a",))


# ----------------------------------------------------------------------------- student keys


def test_student_key_holds_exactly_the_settings_the_method_reads():
    base = _cfg()
    t = "teacher-key"

    def key(method, cfg=base, teacher=t):
        return student_identity(cfg, method, "alpha", 0, teacher if method != "student_ft" else None)

    def distill(**over):
        return _cfg(distill=over)

    # gamma2 is read by the meta methods only
    assert key("metakd") != key("metakd", distill(gamma2=0.1))
    assert key("metakd_no_target") != key("metakd_no_target", distill(gamma2=0.1))
    for m in ("kd_single", "kd_mix", "kd_mtl", "student_ft"):
        assert key(m) == key(m, distill(gamma2=0.1)), m
    # distillation settings matter to distillation, not to fine-tuning; fine-tuning settings to student_ft
    assert key("kd_single") != key("kd_single", distill(temperature=2.0))
    assert key("student_ft") == key("student_ft", distill(temperature=2.0, stage2_lr=1e-3))
    assert key("student_ft") != key("student_ft", distill(lr=1e-3))
    # the teacher (through its key), the seed, the domain, the data and the student model
    assert key("kd_single") != key("kd_single", teacher="other")
    assert student_identity(base, "kd_single", "alpha", 0, t) != student_identity(base, "kd_single", "alpha", 1, t)
    assert student_identity(base, "kd_single", "alpha", 0, t) != student_identity(base, "kd_single", "beta", 0, t)
    assert key("student_ft") != key("student_ft", _cfg(data={"sample_rate": 0.5}))
    assert key("metakd") != key("metakd", _cfg(student={"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64}))
    # plan() keys its jobs by this identity
    _, jobs = plan(base, ["alpha", "beta"])
    assert len({j.key for j in jobs}) == len(jobs) == 4
    assert all(j.rel == f"students/{j.key}" for j in jobs)


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
    assert sorted(ensure(store, registry, items, build)) == ["a", "b"]
    assert calls == [["a", "b"]]
    assert ensure(store, registry, items, build) == []
    assert ensure(store, LocalRegistry(), items, build) == []  # complete on the store
    assert calls == [["a", "b"]]
    assert (tmp_path / "teachers" / "a" / "x.txt").read_text() == "teachers/a"


def test_ensure_releases_keys_whose_build_left_nothing(tmp_path):
    store, registry = Store(str(tmp_path)), LocalRegistry()
    with pytest.raises(RuntimeError, match="without a complete artifact"):
        ensure(store, registry, {"k": "teachers/k"}, lambda keys: None)
    assert registry.claim("k") == "mine"  # released: the next caller may build it


def test_ensure_releases_keys_when_build_raises(tmp_path):
    store, registry = Store(str(tmp_path)), LocalRegistry()

    def boom(keys):
        raise KeyError("no")

    with pytest.raises(KeyError):
        ensure(store, registry, {"k": "teachers/k"}, boom)
    assert "k" not in registry.state


def test_ensure_waits_for_a_key_another_owner_builds(tmp_path):
    store, registry = Store(str(tmp_path)), LocalRegistry()
    other = registry.for_owner("other")
    assert other.claim("k") == "mine"
    with pytest.raises(TimeoutError, match="teachers/k"):
        ensure(store, registry, {"k": "teachers/k"}, lambda keys: pytest.fail("built a key another owner holds"),
               poll_s=0.01, timeout_s=0.05)
    other.release("k")  # the owner failed: the waiting caller takes over
    assert ensure(store, registry, {"k": "teachers/k"}, lambda keys: _publish(store, "teachers/k"),
                  poll_s=0.01, timeout_s=5) == ["k"]
    other.close()

"""Scheduling without Ray: the registry (claims, leases, admissions), student keys, and trials that
share a store: every teacher and every distinct student job is trained once, reused rows say so,
and the analyses count a shared student once."""

from __future__ import annotations

import copy
import threading
import time

import pandas as pd
import pytest

from metakd.report import analysis, results
from metakd.config import from_dict
from metakd.storage import Store
from metakd.jobs.events import STUDENT, TEACHER, count_student_trainings, count_teacher_trainings, read_events
from metakd.jobs.experiment import LocalRunner, plan, run_experiment, student_identity
from metakd.jobs.registry import LocalRegistry, RegistryState
from metakd.report.rows import result_rows

pytestmark = pytest.mark.usefixtures("single_thread_torch")

TINY = {
    "name": "sched", "methods": ["metakd", "kd_single"], "seeds": [0], "device": "cpu",
    "data": {"max_length": 24, "vocab_size": 400,
             "synthetic": {"num_domains": 2, "examples_per_domain": 120, "words_per_example": 16,
                           "shared_vocab": 40, "domain_vocab": 20, "label_noise": 0.0}},
    "teacher": {"preset": "tiny-teacher", "epochs": 2, "lr": 2e-3, "batch_size": 16},
    "student": "tiny-student",
    "distill": {"stage1_epochs": 1, "stage1_lr": 3e-3, "stage2_epochs": 1, "stage2_lr": 3e-3,
                "epochs": 1, "lr": 3e-3, "batch_size": 16},
}


def _cfg(**distill):
    raw = copy.deepcopy(TINY)
    raw["distill"].update(distill)
    return from_dict(raw)


def _quiet(*_a, **_k):
    pass


# ----------------------------------------------------------------------------- registry


def test_claims_are_exclusive_until_finished_released_or_expired():
    r = RegistryState(lease_s=0.3)
    assert r.claim("k", "a") == "mine"
    assert r.claim("k", "b") == "wait" and r.claim("k", "a") == "mine"  # the owner may claim again
    assert r.states(["k", "x"]) == {"k": ("running", "a"), "x": ("missing", None)}
    time.sleep(0.35)  # a dead owner stops renewing: its lease runs out
    assert r.states(["k"]) == {"k": ("missing", None)}
    assert r.claim("k", "b") == "mine"
    r.renew(["k"], "a")  # not a's any more: no effect
    r.release("k", "a")
    assert r.claim("k", "a") == "wait"
    r.finish("k", {"type": "teacher", "key": "k"})
    assert r.claim("k", "a") == "done" and r.states(["k"]) == {"k": ("done", None)}
    # a failed run gives back its own claims and its workers' ("run/w0", ...), not others'
    for key, owner in (("p", "run"), ("q", "run/w0"), ("s", "runner")):
        assert r.claim(key, owner) == "mine"
    assert sorted(r.release_owner("run")) == ["p", "q"]
    assert r.states(["p", "q", "s"]) == {"p": ("missing", None), "q": ("missing", None), "s": ("running", "runner")}


def test_admission_counts_what_was_promised_to_runs_that_have_not_started():
    r = RegistryState()
    free = {"CPU": 2.0, "GPU": 1.0}
    assert r.admit("t1", {"CPU": 1.0}, 1, free) == 1
    assert r.admit("t2", {"CPU": 1.0}, 3, free) == 1  # 2 CPUs free, 1 promised to t1
    assert r.admit("t3", {"CPU": 1.0}, 1, free) == 0
    assert r.admit("t3", {"CPU": 1.0}, 1, free, at_least_one=True) == 1  # a cluster that must scale up
    r.started("t1"), r.started("t2"), r.started("t3")
    # quarter-GPU student workers: 4 fit on one GPU, whatever the CPUs say first
    assert r.admit("s", {"CPU": 0.5, "GPU": 0.25}, 8, free) == 4
    assert r.admit("s2", {"CPU": 0.5, "GPU": 0.25}, 8, free) == 0
    r.started("s")
    assert r.admit("s2", {"CPU": 0.5, "GPU": 0.25}, 2, {"CPU": 0.0, "GPU": 1.0}) == 0  # no CPU left


def test_registry_counts_needed_done_and_training_and_logs_finished_trainings():
    r = RegistryState()
    r.need("teacher", ["a", "b", "c"])
    r.need("teacher", ["a"])  # another trial needs the same teacher: still 3
    r.claim("a", "t1")
    r.finish("b", {"type": "teacher", "key": "b"})
    r.finish("b", {"type": "teacher", "key": "b"})  # a late duplicate finish logs nothing new
    records, seen, counts = r.progress()
    assert [x["key"] for x in records] == ["b"] and seen == 1
    assert counts == {"teacher": {"needed": 3, "done": 1, "running": 1}}
    assert r.progress(seen)[0] == []
    r.reset()  # a new driver: nothing live, nothing remembered (the store says what is done)
    assert r.progress() == ([], 0, {}) and r.claim("b", "x") == "mine"


# ----------------------------------------------------------------------------- student keys


def test_student_key_holds_exactly_the_settings_the_method_reads():
    base = _cfg()
    t = "teacher-key"

    def key(method, cfg=base, teacher=t, **over):
        return student_identity(cfg, method, "alpha", 0, teacher if method != "student_ft" else None)

    # gamma2 is read by the meta methods only
    assert key("metakd") != key("metakd", _cfg(gamma2=0.1))
    assert key("metakd_no_target") != key("metakd_no_target", _cfg(gamma2=0.1))
    for m in ("kd_single", "kd_mix", "kd_mtl", "student_ft"):
        assert key(m) == key(m, _cfg(gamma2=0.1)), m
    # distillation settings matter to distillation, not to fine-tuning; fine-tuning settings to student_ft
    assert key("kd_single") != key("kd_single", _cfg(temperature=2.0))
    assert key("student_ft") == key("student_ft", _cfg(temperature=2.0, stage2_lr=1e-3))
    assert key("student_ft") != key("student_ft", _cfg(lr=1e-3))
    # the teacher (through its key), the seed, the domain, the data and the student model
    assert key("kd_single") != key("kd_single", teacher="other")
    assert student_identity(base, "kd_single", "alpha", 0, t) != student_identity(base, "kd_single", "alpha", 1, t)
    assert student_identity(base, "kd_single", "alpha", 0, t) != student_identity(base, "kd_single", "beta", 0, t)
    raw = copy.deepcopy(TINY)
    raw["data"]["sample_rate"] = 0.5
    assert key("student_ft") != key("student_ft", from_dict(raw))
    raw = copy.deepcopy(TINY)
    raw["student"] = {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64}
    assert key("metakd") != key("metakd", from_dict(raw))
    # plan() keys its jobs by this identity
    _, jobs = plan(base, ["alpha", "beta"])
    assert len({j["key"] for j in jobs}) == len(jobs) == 4
    assert all(j["rel"] == f"students/{j['key']}" for j in jobs)


# ----------------------------------------------------------------------------- trials sharing a store


def _trial(cfg, root, registry, trial_id, rows: list):
    """One in-process 'trial': its rows are rewritten after every finished student, as in a sweep."""

    def on_students(new, so_far):
        rows[:] = result_rows(cfg, "sched", trial_id, so_far, {"gamma2": cfg.distill.gamma2})

    return run_experiment(cfg, Store(str(root)), registry, LocalRunner(), _quiet, on_students=on_students,
                          source={"trial_id": trial_id, "part": f"cfg-{trial_id}"}, run_prefix=trial_id)


@pytest.fixture(scope="module")
def gamma2_sweep(tmp_path_factory):
    """Two gamma2 'trials' racing in two threads on one store and one registry."""
    root = tmp_path_factory.mktemp("share")
    registry = LocalRegistry()
    rows = {"t0": [], "t1": []}
    outs, errors = {}, []

    def go(trial_id, gamma2):
        try:
            outs[trial_id] = _trial(_cfg(gamma2=gamma2), root, registry, trial_id, rows[trial_id])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go, args=a) for a in (("t0", 0.0), ("t1", 0.5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    df = pd.DataFrame(rows["t0"] + rows["t1"])
    return root, outs, df


def test_racing_trials_train_each_teacher_and_each_student_job_once(gamma2_sweep):
    root, outs, df = gamma2_sweep
    store = Store(str(root))
    # 1 meta-teacher + 2 single teachers, shared; 2 x 2 metakd students + 2 kd_single students
    assert count_teacher_trainings(store) == 3
    assert sum(len(o["teachers_trained"]) for o in outs.values()) == 3
    students = read_events(store, STUDENT)
    assert len(students) == count_student_trainings(store) == 6
    assert len({e["key"] for e in students}) == 6
    kd = [e for e in students if e["method"] == "kd_single"]
    assert sorted(e["domain"] for e in kd) == ["alpha", "beta"]  # once per (domain, seed)
    for e in students + read_events(store, TEACHER):
        assert e["end"] >= e["start"] > 0 and e["worker"] and e["device"] == "cpu" and e["key"]
    # each student starts after its teacher was published
    published = {e["key"]: e["end"] for e in read_events(store, TEACHER)}
    assert all(e["start"] >= published[e["teacher_key"]] for e in students)


def test_reused_rows_name_their_source_and_the_table_keeps_one_row_per_trial(gamma2_sweep):
    _, outs, df = gamma2_sweep
    # one row per trial x seed x method x domain x split, as without reuse
    assert len(df) == 2 * 1 * 2 * 2 * 2
    assert not df.duplicated(["trial_id", "seed", "method", "domain", "split"]).any()
    meta = df[df["method"] == "metakd"]
    assert meta["reused_from"].isna().all() and meta["student_key"].nunique() == 4
    kd = df[df["method"] == "kd_single"]
    assert kd["student_key"].nunique() == 2
    for (domain, split), g in kd.groupby(["domain", "split"]):
        # the same student in both trials: the trial that did not train it names the one that did
        assert len(g) == 2 and g["accuracy"].nunique() == 1 and g["student_key"].nunique() == 1
        assert g["reused_from"].isna().sum() == 1
        (source,) = g["reused_from"].dropna()
        assert g.loc[g["reused_from"].isna(), "trial_id"].item() == source


def test_analyses_count_a_shared_student_once_and_keep_the_means(gamma2_sweep, tmp_path):
    _, _, df = gamma2_sweep
    results.write_part(str(tmp_path), df.to_dict("records"), "all")
    table = results.load(str(tmp_path))
    long = analysis.main_table(table, "test")
    test = df[df["split"] == "test"]
    # by hand: each trained student once, averaged per (method, domain) (one seed)
    distinct = test.drop_duplicates("student_key")
    expected = distinct.groupby(["method", "domain"])["accuracy"].mean()
    got = long[long["domain"] != analysis.AVERAGE].set_index(["method", "domain"])["mean"]
    pd.testing.assert_series_equal(got.sort_index(), expected.sort_index(), check_names=False)
    # the same means as a table where every trial had trained its own identical kd_single copy
    naive = test.groupby(["method", "domain"])["accuracy"].mean()
    pd.testing.assert_series_equal(got.sort_index(), naive.sort_index(), check_names=False)
    # and an unbalanced table (one student listed by 4 trials, the others by 2) is not weighted by trials
    shared = table[(table["method"] == "kd_single") & (table["domain"] == "alpha")]
    more = [shared.assign(trial_id=f"t{i}", reused_from="t0") for i in (2, 3)]
    again = analysis.main_table(pd.concat([table, *more], ignore_index=True), "test")
    pd.testing.assert_frame_equal(again, long)


# ----------------------------------------------------------------------------- resources


def test_student_workers_share_jobs_unless_student_ddp_makes_them_ranks_of_one_student():
    from metakd.config import ConfigError

    def sweep(**resources):
        raw = copy.deepcopy(TINY)
        raw["search"] = {"algorithm": "grid", "params": {"gamma2": {"type": "grid", "values": [0.5]}},
                         "resources": resources}
        return from_dict(raw)

    # independent workers: each takes the whole batch of its own job, any GPU fraction
    cfg = sweep(student_workers=3, student_gpus_per_worker=0.25, gpus_per_worker=1)
    assert cfg.search.resources.student_gpus() == 0.25 and not cfg.search.resources.student_ddp
    with pytest.raises(ConfigError, match=r"distill\.batch_size: 16 .*student_workers \(3\)"):
        sweep(student_workers=3, student_ddp=True)  # DDP ranks split the global batch
    with pytest.raises(ConfigError, match=r"search\.resources\.student_gpus_per_worker: 0\.25 is fractional"):
        sweep(student_workers=2, student_gpus_per_worker=0.25, student_ddp=True)
    sweep(student_workers=2, student_ddp=True)  # 16 splits over 2 ranks

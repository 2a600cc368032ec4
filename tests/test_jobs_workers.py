"""The per-worker functions: a student job that runs out of device memory, or whose loss goes NaN,
fails alone, with a result that names it, and a later run trains it again; a teacher whose loss
goes NaN fails the jobs that need it, with the reason, and no other; a trainer whose lease ran out
does not publish over the owner that took its key over."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from metakd.config import from_dict
from metakd.jobs import workers
from metakd.jobs.events import RUN_FAILED, STUDENT, TEACHER, read_events, write_event
from metakd.jobs.experiment import LocalRunner, run_experiment
from metakd.jobs.registry import LocalRegistry
from metakd.report.rows import result_rows, running_metrics
from metakd.storage import Store
from metakd.train import student as student_module, teacher as teacher_module
from metakd.train.teacher import TeacherSpec

pytestmark = pytest.mark.usefixtures("single_thread_torch")

CFG = {
    "name": "oom", "methods": ["student_ft"], "seeds": [0], "device": "cpu",
    "data": {"max_length": 16, "vocab_size": 300,
             "synthetic": {"num_domains": 2, "examples_per_domain": 60, "words_per_example": 10,
                           "shared_vocab": 30, "domain_vocab": 15}},
    "distill": {"epochs": 1, "lr": 3e-3, "batch_size": 16},
}


def _quiet(*_a, **_k):
    pass


def test_a_job_out_of_memory_fails_alone_and_is_trained_again_by_a_later_run(tmp_path, monkeypatch):
    cfg = from_dict(CFG)
    store = Store(str(tmp_path))
    real = workers.train_student

    def alpha_runs_out(job, *a, **k):
        if job.domain == "alpha":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.90 GiB")
        return real(job, *a, **k)

    monkeypatch.setattr(workers, "train_student", alpha_runs_out)
    out = run_experiment(cfg, store, LocalRegistry(), LocalRunner(), _quiet)
    failed, ok = out["students"]  # job order: alpha, beta; the worker went on to beta after alpha failed
    assert failed["status"] == "failed" and failed["domain"] == "alpha" and failed["dev_accuracy"] is None
    assert "student student_ft:alpha seed=0" in failed["error"] and failed["student_key"] in failed["error"]
    assert "out of memory" in failed["error"]
    assert ok.get("status", "ok") == "ok" and ok["domain"] == "beta" and ok["dev_accuracy"] > 0
    # the failure is this run's result, not an artifact: a later run trains the job again
    assert not store.is_complete(f"students/{failed['student_key']}")
    assert store.is_complete(f"students/{ok['student_key']}")
    rows = result_rows(cfg, "oom", "run", out["students"])
    assert {(r["domain"], r["status"]) for r in rows} == {("alpha", "failed"), ("beta", "ok")}
    assert all(r["error"] == failed["error"] for r in rows if r["status"] == "failed")
    metrics = running_metrics(out["students"], cfg.methods)
    assert metrics["jobs_failed"] == 1 and metrics["dev_accuracy"] == pytest.approx(ok["dev_accuracy"])

    monkeypatch.setattr(workers, "train_student", real)
    again = run_experiment(cfg, store, LocalRegistry(), LocalRunner(), _quiet)  # a restarted driver
    assert [r.get("status", "ok") for r in again["students"]] == ["ok", "ok"]
    assert store.is_complete(f"students/{failed['student_key']}")
    # one event per training: alpha failed then trained, beta trained once and read back
    events = read_events(store, STUDENT)
    assert sorted((e["domain"], e["status"]) for e in events) == [("alpha", "failed"), ("alpha", "ok"), ("beta", "ok")]


def test_out_of_memory_in_a_ddp_rank_fails_the_run(monkeypatch):
    monkeypatch.setattr(workers, "train_student", lambda *a, **k: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("CUDA out of memory")))
    runtime = type("Rank", (), {"world_size": 2, "device": torch.device("cpu"), "gpu_share": 1.0})()
    with pytest.raises(torch.cuda.OutOfMemoryError):  # the other ranks wait for this one in a collective
        workers._train_or_fail(None, None, None, None, runtime, None)


def test_a_job_whose_loss_goes_nan_fails_alone_and_its_siblings_train(tmp_path, monkeypatch):
    cfg = from_dict(CFG)
    store = Store(str(tmp_path))
    real = student_module.finetune_step

    def nan_on_alpha(model, batch):  # the student of domain 0 (alpha) diverges; beta's is untouched
        loss = real(model, batch)
        return loss * float("nan") if bool((batch["domains"] == 0).all()) else loss

    monkeypatch.setattr(student_module, "finetune_step", nan_on_alpha)
    out = run_experiment(cfg, store, LocalRegistry(), LocalRunner(), _quiet)
    failed, ok = out["students"]
    assert failed["status"] == "failed" and failed["domain"] == "alpha" and failed["dev_accuracy"] is None
    assert failed["error"].startswith("student student_ft:alpha seed=0: the training loss is nan in finetune epoch 1/1")
    assert failed["student_key"] in failed["error"]
    assert ok.get("status", "ok") == "ok" and ok["domain"] == "beta" and ok["dev_accuracy"] > 0
    assert not store.is_complete(f"students/{failed['student_key']}")  # a later run trains it again
    rows = result_rows(cfg, "nan", "run", out["students"])
    assert {(r["domain"], r["status"]) for r in rows} == {("alpha", "failed"), ("beta", "ok")}
    assert all(r["error"] == failed["error"] for r in rows if r["status"] == "failed")
    assert all(r["error"] is None for r in rows if r["status"] == "ok")
    assert sorted((e["domain"], e["status"]) for e in read_events(store, STUDENT)) == [("alpha", "failed"),
                                                                                     ("beta", "ok")]


def test_a_teacher_whose_loss_goes_nan_fails_the_jobs_that_need_it_with_the_reason(tmp_path, monkeypatch):
    cfg = from_dict({**CFG, "methods": ["kd_mix", "student_ft"],
                     "teacher": {"preset": "tiny-teacher", "epochs": 1, "batch_size": 16}})
    store = Store(str(tmp_path))
    real = teacher_module.teacher_loss_step

    def diverging(kind, *a, **k):
        step = real(kind, *a, **k)
        return lambda model, batch: step(model, batch) * float("nan")

    monkeypatch.setattr(teacher_module, "teacher_loss_step", diverging)
    out = run_experiment(cfg, store, LocalRegistry(), LocalRunner(), _quiet)  # ends: nobody waits for the teacher
    by_job = {(r["method"], r["domain"]): r for r in out["students"]}
    teacher_key = by_job["kd_mix", "alpha"]["teacher_key"]
    for domain in ("alpha", "beta"):
        r = by_job["kd_mix", domain]
        assert r["status"] == "failed" and r["dev_accuracy"] is None
        assert r["error"].startswith(f"student kd_mix:{domain} seed=0 (job {r['student_key']}) not trained: "
                                     f"its teacher failed: teacher mix seed=0: the training loss is nan in "
                                     f"teacher epoch 1/1")
        assert teacher_key in r["error"]
        assert by_job["student_ft", domain].get("status", "ok") == "ok"  # no teacher: trained as ever
    assert not store.is_complete(f"teachers/{teacher_key}")
    assert [(e["kind"], e["status"]) for e in read_events(store, TEACHER)] == [("mix", "failed")]
    assert {e["method"] for e in read_events(store, STUDENT)} == {"student_ft"}  # the kd_mix jobs trained nothing
    rows = result_rows(cfg, "nan", "run", out["students"])
    assert {(r["method"], r["status"]) for r in rows} == {("kd_mix", "failed"), ("student_ft", "ok")}

    monkeypatch.setattr(teacher_module, "teacher_loss_step", real)
    again = run_experiment(cfg, store, LocalRegistry(), LocalRunner(), _quiet)  # a restarted driver
    assert [r.get("status", "ok") for r in again["students"]] == ["ok"] * 4
    assert store.is_complete(f"teachers/{teacher_key}")
    assert sorted(p.name for p in Path(store.fetch_dir(f"teachers/{teacher_key}")).iterdir()
                  if p.name == workers.TEACHER_FAILED) == []  # the failure was replaced, not kept beside it


def _sleeps(owner: str, runtime) -> None:
    time.sleep(1.0 if owner == "runA" else 0.6)


def _lease_race(tmp_path, monkeypatch, renew_a: bool | None = None, a_unreachable=None, train=_sleeps) -> dict:
    """Two teacher runs, A then B 0.5 s later, want one teacher; leases last 0.3 s and renew every 0.05 s,
    A's only with ``renew_a`` (or while not ``a_unreachable(seconds since the start)``). ``train(owner,
    runtime)`` trains (default: A for 1 s, B for 0.6 s). Returns who trained, who published, and each
    run's summaries."""
    registry = LocalRegistry(lease_s=0.3, renew_s=0.05)
    state, t0 = registry.backend, time.monotonic()
    real_renew = state.renew
    if a_unreachable is None:
        a_unreachable = lambda seconds: not renew_a  # noqa: E731

    def renew(keys, owner):
        if owner == "runA" and a_unreachable(time.monotonic() - t0):
            raise ConnectionError("registry unreachable from A's node")
        return real_renew(keys, owner)

    state.renew = renew
    trained, published = [], []
    real_publish = Store.publish_dir

    def fake_teacher(spec, cfg, prepared, runtime, out, store, claims=None):
        trained.append(claims.owner)
        train(claims.owner, runtime)
        Path(out, "who.txt").write_text(claims.owner)
        return {"dev_accuracy": 0.5, "train_seconds": 0.0, "train_examples": 1}

    def spying_publish(store, local_dir, rel):
        published.append((rel, Path(local_dir, "who.txt").read_text()))
        return real_publish(store, local_dir, rel)

    monkeypatch.setattr(workers, "train_one_teacher", fake_teacher)
    monkeypatch.setattr(workers, "_Prepared", lambda store, rels: (lambda seed: None))
    monkeypatch.setattr(Store, "publish_dir", spying_publish)
    spec = TeacherSpec("mix", None, 0, "tkey")
    summaries = {}

    def run(name):
        config = workers.WorkerConfig(workers.RunPhase.TEACHERS, name, from_dict(CFG), str(tmp_path), {0: "data/x"},
                                      registry, {"trial_id": "t", "part": "p"}, specs=(spec,))
        summaries[name] = workers.teacher_worker(config)

    a = threading.Thread(target=run, args=("runA",))
    a.start()
    time.sleep(0.5)
    run("runB")
    a.join()
    registry.close()
    return {"trained": trained, "published": published, "summaries": summaries,
            "events": [e["run"] for e in read_events(Store(str(tmp_path)), TEACHER)],
            "log": [r["run"] for r in state.progress()[0]]}


def test_a_renewed_lease_outlives_its_lease_time_and_nothing_is_trained_twice(tmp_path, monkeypatch):
    race = _lease_race(tmp_path, monkeypatch, renew_a=True)
    assert race["trained"] == ["runA"]  # B found A's claim alive after three lease times, and left it
    assert race["published"] == [("teachers/tkey", "runA")] and race["events"] == race["log"] == ["runA"]
    assert race["summaries"]["runB"] == [] and len(race["summaries"]["runA"]) == 1


def test_a_trainer_that_lost_its_lease_does_not_publish_over_the_new_owner(tmp_path, monkeypatch):
    race = _lease_race(tmp_path, monkeypatch, renew_a=False)
    assert race["trained"] == ["runA", "runB"]  # A's lease ran out (its renewals failed): B took the teacher over
    # A finished first, while B held the teacher: A dropped its work; B published, once, and only B finished it
    assert race["published"] == [("teachers/tkey", "runB")] and race["events"] == race["log"] == ["runB"]
    assert race["summaries"]["runA"] == [] and len(race["summaries"]["runB"]) == 1
    assert (Path(Store(str(tmp_path)).fetch_dir("teachers/tkey")) / "who.txt").read_text() == "runB"


# ----------------------------------------------------------------------------- a teacher another run lost


def test_a_teacher_another_run_lost_resumes_from_that_runs_latest_registered_checkpoint(tmp_path):
    events, train = Store(str(tmp_path / "sweep")), Store(str(tmp_path / "sweep" / "train"))
    config = workers.WorkerConfig(workers.RunPhase.TEACHERS, "t2-teachers-0", from_dict(CFG), str(tmp_path / "cache"),
                                  {}, LocalRegistry(), {}, checkpoints=train.root)

    def lost(run: str, keys: list[str], at: float) -> None:
        write_event(events, RUN_FAILED, {"type": RUN_FAILED, "key": run, "run": run, "interrupted": keys,
                                         "lost_node": True, "start": at, "end": at + 1})

    def snapshot(run: str, latest: str) -> None:  # what Ray Train writes when it registers a checkpoint
        train.write_json(f"{run}/{workers.TRAIN_SNAPSHOT}",
                         {"latest_checkpoint_result": {"checkpoint_dir_name": latest}})

    assert workers._resume_point(events, config, "k") is None  # no run lost it
    lost("t0-teachers-0", ["k"], 10.0)
    assert workers._resume_point(events, config, "k") is None  # it lost it before any checkpoint
    snapshot("t0-teachers-0", "checkpoint_a")
    assert workers._resume_point(events, config, "k") == train.uri("t0-teachers-0/checkpoint_a")
    lost("t1-both-3", ["k", "s"], 20.0)  # lost again later, by a run that got further
    snapshot("t1-both-3", "checkpoint_b")
    assert workers._resume_point(events, config, "k") == train.uri("t1-both-3/checkpoint_b")
    assert workers._resume_point(events, config, "other") is None
    # its own checkpoint Ray Train restores: not looked up; and without Ray no checkpoints at all
    own = workers.WorkerConfig(config.phase, "t1-both-3", config.experiment, config.store, {}, config.registry, {},
                               checkpoints=train.root)
    assert workers._resume_point(events, own, "k") == train.uri("t0-teachers-0/checkpoint_a")
    local = workers.WorkerConfig(config.phase, "x", config.experiment, config.store, {}, config.registry, {})
    assert workers._resume_point(events, local, "k") is None


def test_a_trainer_whose_key_was_taken_over_stops_training_before_its_end(tmp_path, monkeypatch):
    """A's node loses the registry for 0.8 s: its lease (0.3 s) runs out and B takes the teacher over.
    When A's renewals come back they say so, and A's training stops at its next progress line
    instead of running its 100 steps to the end; only B publishes."""
    from metakd.train import loop

    monkeypatch.setattr(loop, "LOG_EVERY_S", 0.0)  # a progress line (and a look at the lease) after every step
    steps = {"runA": 0, "runB": 0}

    def train(owner, runtime):  # the real loop: A 100 steps of 20 ms, B 10
        batches = [{"input_ids": torch.randn(4, 3), "labels": torch.zeros(4, dtype=torch.long)}] * 100

        def step(m, batch):
            steps[owner] += 1
            time.sleep(0.02)
            return torch.nn.functional.cross_entropy(m(batch["input_ids"]), batch["labels"])

        n = 100 if owner == "runA" else 10
        loop.train_stage(torch.nn.Linear(3, 2), step, batches[:n], None, [], loop.StageSettings("teacher", 1, 1e-3),
                         runtime, "t")

    race = _lease_race(tmp_path, monkeypatch, a_unreachable=lambda seconds: seconds < 0.8, train=train)
    assert race["trained"] == ["runA", "runB"]
    assert steps["runB"] == 10 and 0 < steps["runA"] < 100  # A stopped early (without the lease thread: 100)
    assert race["published"] == [("teachers/tkey", "runB")] and race["events"] == race["log"] == ["runB"]
    assert race["summaries"]["runA"] == [] and len(race["summaries"]["runB"]) == 1

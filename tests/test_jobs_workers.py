"""The per-worker functions: a student job that runs out of device memory fails alone, with a
result that names it, and a later run trains it again."""

from __future__ import annotations

import pytest
import torch

from metakd.config import from_dict
from metakd.jobs import workers
from metakd.jobs.events import STUDENT, read_events
from metakd.jobs.experiment import LocalRunner, run_experiment
from metakd.jobs.registry import LocalRegistry
from metakd.report.rows import result_rows, running_metrics
from metakd.storage import Store

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

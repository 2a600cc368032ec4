"""Placement with more slots than cores: Ray advertises 8 CPUs and 1 GPU on this small machine, and
a trial's 8 student jobs spread over its 4 student workers of a quarter GPU each, one job per
worker at a time (the GPUs are Ray resources only: the workers train on the CPU)."""

from __future__ import annotations

import logging

import pytest

from metakd.config import from_dict
from metakd.storage import Store
from metakd.jobs.events import STUDENT, read_events
from metakd.jobs.experiment import run_experiment
from metakd.jobs.ray_runner import RayRunner
from metakd.jobs.registry import ray_registry

pytestmark = pytest.mark.slow

CFG = {
    "name": "place", "methods": ["student_ft"], "seeds": [0, 1], "device": "cpu",
    "data": {"max_length": 24, "vocab_size": 400,
             "synthetic": {"num_domains": 4, "examples_per_domain": 200, "words_per_example": 16,
                           "shared_vocab": 40, "domain_vocab": 20, "label_noise": 0.0}},
    "teacher": {"preset": "tiny-teacher"}, "student": "tiny-student",
    "distill": {"epochs": 3, "lr": 3e-3, "batch_size": 16},
    "search": {"algorithm": "grid", "params": {"gamma2": {"type": "grid", "values": [0.5]}},
               "resources": {"student_workers": 4, "cpus_per_worker": 1, "student_gpus_per_worker": 0.25}},
}


@pytest.fixture(scope="module")
def fake_cluster():
    import ray

    ray.init(address="local", num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    yield
    ray.shutdown()


def test_eight_student_jobs_spread_over_four_quarter_gpu_workers(fake_cluster, tmp_path):
    cfg = from_dict(CFG)
    store = Store(str(tmp_path))
    registry = ray_registry("placement-test", "trial", detached=False)
    lines = []
    out = run_experiment(cfg, store, registry, RayRunner(cfg.search.resources, str(tmp_path / "train")), lines.append)
    registry.close()
    assert len(out["students"]) == 8 and out["teachers_trained"] == []
    assert sum("starting" in line and "4 worker(s)" in line for line in lines) == 1, lines  # one fit, 4 workers
    events = read_events(store, STUDENT)
    assert len(events) == 8 and len({e["key"] for e in events}) == 8  # each job trained once
    assert {(e["domain"], e["seed"]) for e in events} == {(d, s) for d in ("alpha", "beta", "gamma", "delta")
                                                          for s in (0, 1)}
    workers = {e["worker"] for e in events}
    assert len(workers) == 4, sorted((e["worker"], e["start"]) for e in events)
    assert {e["run"] for e in events} == {"run-students-0"} and {e["device"] for e in events} == {"cpu"}
    # one job at a time per worker, and the workers side by side
    for w in workers:
        mine = sorted((e["start"], e["end"]) for e in events if e["worker"] == w)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(mine, mine[1:]))
    first_end = min(e["end"] for e in events)
    assert sum(e["start"] < first_end for e in events) >= 3

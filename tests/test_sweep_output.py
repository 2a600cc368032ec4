"""What ``metakd sweep`` prints by default: the trial table, one line per finished teacher or student,
the summary; no Ray INFO lines, worker banners or checkpoint reports. One smoke sweep, as a user runs
it; the line formats are also checked without Ray."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from metakd.storage import Store
from metakd.sweep.progress import failure_line, status_line, training_line, trial_table
from metakd.jobs.events import STUDENT, TEACHER, read_events

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(teacher|student) (\S+) .*seed=(\d+): dev (\d+\.\d)% in (\d+\.\d)s")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    storage = tmp_path_factory.mktemp("smoke")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "metakd.cli", "sweep", str(ROOT / "sweeps" / "smoke.yaml"),
                           "--storage", str(storage)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr, Store(str(storage / "smoke"))


@pytest.mark.slow
def test_smoke_sweep_prints_one_line_per_training_and_no_ray_noise(smoke):
    out, store = smoke
    lines = out.splitlines()
    assert len(lines) < 60, out
    for noise in (" INFO ", "(RayTrainWorker", "(TrainController", "(trial_driver", "Checkpoint", "checkpoint",
                  "Setting up process group", "Started training worker group", "(raylet)", "View detailed results"):
        assert noise not in out, noise
    trained = {"teacher": read_events(store, TEACHER), "student": read_events(store, STUDENT)}
    printed = [LINE.match(line) for line in lines]
    for kind, events in trained.items():
        ours = [m for m in printed if m and m.group(1) == kind]
        assert len(ours) == len(events) > 0, (kind, out)  # every training once, reused students not again
        if kind == "student":
            assert sorted((m.group(2), int(m.group(3))) for m in ours) == sorted(
                (e["method"], e["seed"]) for e in events)
        for m in ours:  # accuracy and seconds are numbers a person can read
            assert 0 <= float(m.group(4)) <= 100 and float(m.group(5)) > 0
    teachers = len(trained["teacher"])
    assert f"(teachers {teachers}/{teachers} done)" in out
    assert re.search(r"^-- trials: .*TERMINATED; teachers \d+/\d+ trained", out, re.M)
    assert "per-method test accuracy" in out and "best configuration" in out


def test_progress_lines_say_what_finished_and_what_is_training():
    teacher = {"type": "teacher", "kind": "single", "domain": "beta", "seed": 1, "dev_accuracy": 0.9167,
               "train_seconds": 4.25, "start": 0.0, "end": 5.0}
    assert training_line(teacher, 2, 3) == "teacher single:beta seed=1: dev 91.7% in 4.2s  (teachers 2/3 done)"
    student = {"type": "student", "method": "metakd", "domain": "alpha", "seed": 0, "dev_accuracy": 0.5,
               "train_seconds": 2.0, "start": 0.0, "end": 2.0, "trial_id": "trial_driver_ab_00001"}
    assert training_line(student, 5, 6) == "student metakd alpha seed=0: dev 50.0% in 2.0s  [ab_00001] (students 5/6 done)"
    lost = {"type": "run_failed", "run": "ab_00000-both-1", "attempt": 1, "lost_node": True,
            "interrupted": ["t-meta-0"], "retried": True, "error": "WorkerGroupError: ..."}
    assert failure_line(lost) == "run ab_00000-both-1 lost its node (attempt 1), interrupting 1 training: " \
                                 "starting it again"
    own = {**lost, "lost_node": False, "interrupted": [], "retried": False, "attempt": 4,
           "error": "ValueError: a bad batch\nTraceback ..."}
    assert failure_line(own) == "run ab_00000-both-1 failed (ValueError: a bad batch) (attempt 4), with nothing in " \
                                "training: giving up, its trial fails"
    counts = {"teacher": {"needed": 3, "done": 1, "running": 2}, "student": {"needed": 6, "done": 0, "running": 0}}
    assert status_line(counts) == "teachers 1/3 trained, 2 training; students 0/6 trained"
    counts["teacher"].update(done=0, running=1)
    assert status_line(counts).startswith("teachers 0/3 trained, 1 training, 2 to train")
    trials = [_Trial("trial_driver_ab_00000", "RUNNING", {"gamma2": 0.5}, {"jobs_done": 2, "dev_accuracy": 0.875}),
              _Trial("trial_driver_ab_00001", "PENDING", {"gamma2": 1.0}, None)]
    table = trial_table(trials, "dev_accuracy", ["gamma2"])
    assert table[0].split() == ["trial", "status", "gamma2", "students", "dev_accuracy"]
    assert table[1].split() == ["ab_00000", "RUNNING", "0.5", "2", "87.50%"]
    assert table[2].split() == ["ab_00001", "PENDING", "1", "0", "-"]


class _Trial:
    def __init__(self, name, status, config, last_result):
        self.name, self.status, self.config, self.last_result = name, status, config, last_result

    def __str__(self):
        return self.name

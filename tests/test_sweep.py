"""End-to-end sweeps on a local Ray instance: teacher and student reuse, DDP teachers, Parquet
results, resume after the driver is killed. Each runs ``metakd sweep`` in a subprocess, as a user would.

These are the slow tests of the suite (about a minute each on 2 cores).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from metakd.report import results
from metakd.config import load_sweep
from metakd.storage import Store
from metakd.jobs.events import STUDENT, TEACHER, count_student_trainings, count_teacher_trainings, read_events

pytestmark = pytest.mark.slow

# Learns in seconds (see tests/test_jobs_run.py); 2 domains, tiny models.
TINY = {
    "methods": ["metakd"],
    "seeds": [0, 1],
    "data": {"source": "synthetic", "domains": ["alpha", "beta"], "max_length": 24, "vocab_size": 400,
             "synthetic": {"num_domains": 2, "examples_per_domain": 200, "words_per_example": 16,
                           "shared_vocab": 40, "domain_vocab": 20, "label_noise": 0.0}},
    "teacher": {"preset": "tiny-teacher", "epochs": 6, "lr": 2e-3, "batch_size": 16},  # 2 DDP ranks halve the steps
    "student": {"preset": "tiny-student"},
    "distill": {"stage1_epochs": 1, "stage1_lr": 3e-3, "stage2_epochs": 4, "stage2_lr": 3e-3, "batch_size": 16},
}


def write_sweep(tmp_path: Path, name: str, search: dict, **overrides) -> Path:
    raw = {"name": name, **TINY, **overrides, "search": {"algorithm": "grid", "num_samples": 1, **search}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_sweep(path)  # the file itself must be valid
    return path


def sweep_cmd(path: Path, storage: Path) -> list[str]:
    return [sys.executable, "-m", "metakd.cli", "sweep", str(path), "--storage", str(storage)]


def sweep_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


def run_sweep(path: Path, storage: Path, timeout: int = 420) -> str:
    proc = subprocess.run(sweep_cmd(path, storage), capture_output=True, text=True, timeout=timeout, env=sweep_env())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def test_teachers_and_baseline_students_are_trained_once_with_ddp_and_results_are_tidy(tmp_path):
    """2 gamma2 values x 2 seeds x {metakd, kd_single} x 2 domains: 6 teachers (each trained once, by
    2 DDP workers) and 12 distinct students (each kd_single one once per domain and seed, not once per
    trial); still one result row per trial x seed x method x domain x split."""
    path = write_sweep(tmp_path, "reuse", {
        "params": {"gamma2": {"type": "grid", "values": [0.0, 1.0]}},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1, "student_workers": 2, "max_concurrent_trials": 2},
    }, methods=["metakd", "kd_single"])
    storage = tmp_path / "store"
    out = run_sweep(path, storage)
    root = storage / "reuse"
    store = Store(str(root))
    assert count_teacher_trainings(store) == 2 * 3, out[-3000:]  # per seed: meta + single:alpha + single:beta
    teachers = read_events(store, TEACHER)
    assert sorted(e["seed"] for e in teachers) == [0, 0, 0, 1, 1, 1]
    for e in teachers:  # a real 2-rank DDP run: rank 0 took half of every global batch, every epoch
        assert e["world_size"] == 2
        summary = json.loads((storage / "cache" / "teachers" / e["key"] / "teacher.json").read_text())
        assert set(summary["epoch_examples"]) == {math.ceil(e["train_examples"] / 2)}

    df = results.load(str(root))
    assert len(df) == 2 * 2 * 2 * 2 * 2  # gamma2 x seeds x methods x domains x splits
    assert df.duplicated(["trial_id", "seed", "method", "domain", "split"]).sum() == 0
    assert set(df["status"]) == {"ok"}
    assert sorted(df["gamma2"].unique()) == [0.0, 1.0]
    assert df["teacher_key"].nunique() == 6 and df[df["method"] == "metakd"]["teacher_key"].nunique() == 2
    assert df.groupby(["method", "seed"])["teacher_key"].nunique().to_dict() == {
        ("kd_single", 0): 2, ("kd_single", 1): 2, ("metakd", 0): 1, ("metakd", 1): 1}

    # each distinct student job trained once: 2 x 2 x 2 metakd + 2 x 2 kd_single
    students = read_events(store, STUDENT)
    assert count_student_trainings(store) == len(students) == df["student_key"].nunique() == 12
    kd = [e for e in students if e["method"] == "kd_single"]
    assert sorted((e["seed"], e["domain"]) for e in kd) == [(0, "alpha"), (0, "beta"), (1, "alpha"), (1, "beta")]
    # the kd_single rows of the trials that did not train it name the trial that did
    kd_rows = df[df["method"] == "kd_single"]
    for _, g in kd_rows.groupby(["seed", "domain", "split"]):
        assert len(g) == 2 and g["student_key"].nunique() == 1 and g["accuracy"].nunique() == 1
        trainer = g.loc[g["reused_from"].isna(), "trial_id"]
        assert len(trainer) == 1 and set(g["reused_from"].dropna()) == {trainer.item()}
    assert df[df["method"] == "metakd"]["reused_from"].isna().all()
    # every student started after its teacher was published
    published = {e["key"]: e["end"] for e in teachers}
    assert all(e["start"] >= published[e["teacher_key"]] for e in students)

    # the analyses give the means of a sweep that trained every copy: a shared student counts once
    from metakd.report import analysis

    test = df[df["split"] == "test"]
    long = analysis.main_table(df, "test")
    cells = long[long["domain"] != analysis.AVERAGE].set_index(["method", "domain"])["mean"].sort_index()
    every_copy = test.groupby(["method", "domain", "seed"])["accuracy"].mean().groupby(["method", "domain"]).mean()
    once = test.drop_duplicates("student_key").groupby(["method", "domain", "seed"])["accuracy"].mean() \
        .groupby(["method", "domain"]).mean()
    assert cells.to_dict() == pytest.approx(every_copy.to_dict()) and cells.to_dict() == pytest.approx(once.to_dict())
    fig4 = analysis.accuracy_vs_gamma2(df, "kd_single", "test")  # the baseline line: the same at every gamma2
    avg = fig4[fig4["domain"] == analysis.AVERAGE]
    assert len(avg) == 2 and avg["mean"].nunique() == 1

    assert df["accuracy"].between(0, 1).all() and (df["student_params"] > 0).all()
    assert df[df["split"] == "test"]["accuracy"].mean() > 0.7  # students learned (chance is 0.5)
    assert (df["latency_ms_b1"] > 0).all() and (df["latency_ms_b32"] > 0).all()
    assert pq.read_table(str(root / "results")).num_rows == len(df)
    assert not results.load_curves(str(root)).empty
    assert "best configuration" in out and "per-method test accuracy" in out

    # a rerun of the finished sweep trains nothing and writes no new rows
    run_sweep(path, storage)
    assert count_teacher_trainings(store) == 6 and count_student_trainings(store) == 12
    assert len(results.load(str(root))) == len(df)


def test_sweep_resumes_after_the_driver_is_killed(tmp_path):
    path = write_sweep(tmp_path, "resume", {
        "params": {"gamma2": {"type": "grid", "values": [0.0, 0.25, 0.5, 0.75, 1.0]}},
        "resources": {"max_concurrent_trials": 1},
    }, seeds=[0])
    storage = tmp_path / "store"
    parts = storage / "resume" / "results"
    proc = subprocess.Popen(sweep_cmd(path, storage), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=sweep_env(), start_new_session=True)
    def complete_parts() -> list[Path]:  # a finished trial: 2 domains x 2 splits (parts grow per student)
        return [p for p in parts.glob("*.parquet") if pq.read_metadata(p).num_rows == 4]

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(complete_parts()) < 2:
        time.sleep(0.5)
    time.sleep(6)  # let Tune save its experiment state (every 5 s) with the finished trials
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray instance and the trials
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in complete_parts()}
    assert 2 <= len(before) < 5, f"expected a partial sweep, found {sorted(before)}"
    trainings = count_teacher_trainings(Store(str(storage / "resume")))

    out = run_sweep(path, storage)
    assert "resuming sweep" in out
    after = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    assert len(after) == 5
    rerun = [name for name, mtime in before.items() if after[name] != mtime]
    assert len(rerun) <= 1, f"finished trials were rerun: {rerun}"  # at most the one Tune had not saved
    df = results.load(str(storage / "resume"))
    assert len(df) == 5 * 1 * 2 * 2
    assert df.duplicated(["gamma2", "seed", "method", "domain", "split"]).sum() == 0
    assert count_teacher_trainings(Store(str(storage / "resume"))) == trainings  # the teacher was reused
    # no finished student was trained again (one whose training the kill interrupted left no event)
    assert count_student_trainings(Store(str(storage / "resume"))) == df["student_key"].nunique() == 5 * 2


def test_metakd_run_with_ray_train_workers(tmp_path):
    """`metakd run --ray`: the same loops as Ray Train workers on a local instance, no Tune."""
    raw = {"name": "ray_run", **TINY, "seeds": [0], "methods": ["metakd", "student_ft"],
           "output_dir": str(tmp_path / "runs")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "metakd.cli", "run", str(path), "--ray"], capture_output=True,
                          text=True, timeout=420, env=sweep_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(RayTrainWorker" in proc.stdout + proc.stderr  # the loops really ran as Train workers
    df = results.load(str(tmp_path / "runs" / "ray_run"))
    assert len(df) == 2 * 2 * 2  # methods x domains x splits
    assert "average" in proc.stdout and "metakd" in proc.stdout


def test_optuna_sweep_with_asha_keeps_rows_of_stopped_trials(tmp_path):
    """Optuna (define-by-run, conditional parameter) + ASHA through Tune; every trial leaves rows.
    Students are DDP runs of 2 ranks here (student_ddp)."""
    path = write_sweep(tmp_path, "optuna", {
        "algorithm": "optuna", "num_samples": 3, "metric": "dev_accuracy", "mode": "max",
        "params": {"gamma1": {"type": "uniform", "low": 0.0, "high": 1.0},
                   "distill.pred_loss": {"type": "choice", "values": ["kl", "js"]},
                   "distill.temperature": {"type": "loguniform", "low": 0.5, "high": 4.0,
                                           "when": {"distill.pred_loss": "kl"}}},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        # each student trained by 2 DDP ranks (student_ddp), one job at a time
        "resources": {"max_concurrent_trials": 1, "student_workers": 2, "student_ddp": True},
    }, seeds=[0])
    storage = tmp_path / "store"
    out = run_sweep(path, storage)
    root = str(storage / "optuna")
    df = results.load(root)
    params = [json.loads(p) for p in df.drop_duplicates("trial_id")["search_params"]]
    assert len(params) == 3 and all(0.0 <= p["gamma1"] <= 1.0 for p in params)
    assert all(("distill.temperature" in p) == (p["distill.pred_loss"] == "kl") for p in params)
    assert df.groupby("trial_id").size().min() >= 2  # at least one student (dev + test) per trial
    assert count_teacher_trainings(Store(root)) == 3  # gamma1 differs per trial: 3 meta-teachers
    students = read_events(Store(root), STUDENT)
    assert students and all(e["world_size"] == 2 and e["rank"] == 0 for e in students)
    assert len({e["key"] for e in students}) == len(students) == df["student_key"].nunique()
    assert "best configuration" in out

    from metakd.report.analysis import search_summary

    best, importances = search_summary(df)
    assert len(best) == 3 and "gamma1" in set(importances["param"])

"""Sweeps that build on each other, on a local Ray instance (``metakd sweep`` in a subprocess):

- the smoke sweep, planned (``metakd plan``), run, planned again and costed (``metakd cost``): the
  plan's counts are what it trains, then all in the cache; the cost's total is the sum over the
  event files; a second sweep under another name with another gamma2 grid trains no teacher;
- an Optuna sweep extended by raising num_samples: the new trial joins the same study, which
  optuna and optuna-dashboard open.

Slow: four sweeps of about a minute each on 2 cores.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from metakd.jobs.events import STUDENT, TEACHER, read_events
from metakd.storage import Store

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def metakd(*args: str, timeout: int = 600) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "metakd.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def counts(out: str) -> dict[str, tuple[int, ...]]:
    from test_sweep_plan import counts as parse

    return parse(out)


def test_smoke_plan_run_cost_and_a_second_sweep_that_trains_no_teacher(tmp_path):
    storage = tmp_path / "storage"
    smoke = str(ROOT / "sweeps" / "smoke.yaml")
    planned = counts(metakd("plan", smoke, "--storage", str(storage)))
    assert planned == {"prepared data": (1, 0, 1), "teachers": (3, 0, 3), "student jobs": (6, 0, 6)}

    metakd("sweep", smoke, "--storage", str(storage))
    root = Store(str(storage / "smoke"))
    teachers, students = read_events(root, TEACHER), read_events(root, STUDENT)
    assert len(teachers) == planned["teachers"][2] and len(students) == planned["student jobs"][2]
    assert (storage / "cache" / "teachers").is_dir() and not (storage / "smoke" / "teachers").exists()
    assert counts(metakd("plan", smoke, "--storage", str(storage))) == {
        "prepared data": (1, 1, 0), "teachers": (3, 3, 0), "student jobs": (6, 6, 0)}

    table = pd.read_csv(io.StringIO(metakd("cost", str(storage / "smoke"), "--format", "csv")))
    total = table[(table["section"] == "by phase") & (table["phase"] == "total")]["device_hours"].item()
    direct = sum((e["end"] - e["start"]) * e["world_size"] * e["gpu_share"] for e in teachers + students) / 3600
    assert total == pytest.approx(direct, rel=1e-5)
    served = table[table["section"] == "served from the cache"].set_index("phase")
    assert served.loc["teachers", "from_cache"] == 0

    # another name, another gamma2 grid: its teachers (and the kd_single students) come from the cache
    raw = yaml.safe_load(Path(smoke).read_text())
    raw["search"]["params"]["gamma2"]["values"] = [1.0]
    other = tmp_path / "smoke_more.yaml"
    other.write_text(yaml.safe_dump(raw))
    assert counts(metakd("plan", str(other), "--storage", str(storage), "--name", "more"))["teachers"] == (3, 3, 0)
    metakd("sweep", str(other), "--storage", str(storage), "--name", "more")
    more = Store(str(storage / "more"))
    assert read_events(more, TEACHER) == []
    assert sorted(e["method"] for e in read_events(more, STUDENT)) == ["metakd", "metakd"]  # gamma2 1.0 only
    served = pd.read_csv(io.StringIO(metakd("cost", str(storage / "more"), "--format", "csv")))
    served = served[served["section"] == "served from the cache"].set_index("phase")
    assert served.loc["teachers", "share_from_cache"] == 1.0 and served.loc["students", "from_cache"] == 2


TINY = {
    "name": "opt", "methods": ["metakd"], "seeds": [0],
    "data": {"source": "synthetic", "domains": ["alpha", "beta"], "max_length": 16, "vocab_size": 200,
             "synthetic": {"num_domains": 2, "examples_per_domain": 60, "words_per_example": 8}},
    "teacher": {"preset": "tiny-teacher", "epochs": 1, "batch_size": 32},
    "student": {"preset": "tiny-student"},
    "distill": {"stage1_epochs": 0, "stage2_epochs": 1, "batch_size": 32},
    "students": {"keep": "none"},
    "search": {"algorithm": "optuna", "num_samples": 2, "metric": "dev_accuracy",
               "params": {"gamma2": {"type": "uniform", "low": 0.0, "high": 1.0}},
               "resources": {"max_concurrent_trials": 1}},
}


def test_raising_num_samples_adds_trials_to_the_same_study(tmp_path):
    import optuna
    from optuna_dashboard._storage_url import get_storage

    from metakd.report import results
    from metakd.sweep.study import load_study

    storage, path = tmp_path / "storage", tmp_path / "opt.yaml"
    path.write_text(yaml.safe_dump(TINY))
    metakd("sweep", str(path), "--storage", str(storage))
    root = storage / "opt"
    record = json.loads((root / "study.json").read_text())
    first = optuna.load_study(study_name=record["name"], storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(root / "study.journal"))))
    assert len(first.trials) == 2

    path.write_text(yaml.safe_dump({**TINY, "search": {**TINY["search"], "num_samples": 3}}))
    out = metakd("sweep", str(path), "--storage", str(storage))
    assert "extending sweep 'opt': search.num_samples 2 -> 3" in out
    assert (root / "tune-extensions" / "n3").is_dir()
    study = load_study(str(root))
    assert study.study_name == record["name"] and len(study.trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    dashboard = get_storage(str(root / "study.journal"))  # what `optuna-dashboard <journal>` opens
    assert [s.study_name for s in dashboard.get_all_studies()] == [record["name"]]
    df = results.load(str(root))
    assert df["trial_id"].nunique() == 3  # the extension's rows beside the first run's
    assert len(read_events(Store(str(root)), TEACHER)) == 1  # gamma2 only: one meta-teacher, trained once
    # the study is the sweep's own: its trials are the rows' configurations
    assert sorted(t.params["gamma2"] for t in study.trials) == pytest.approx(sorted(df["gamma2"].unique()))

"""The smoke sweep with all three trackers (``metakd sweep sweeps/smoke.yaml --tracking
mlflow,tensorboard,wandb``, as a user runs it): per trial the parameters and the metrics that the
Parquet results hold, the same values; per training a curve with one point per epoch, the Parquet
curve's; a shared teacher logged once and linked from every trial that used it; MLflow artifacts.
Read back with each tracker's own reader (tests/tracking_readers.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from metakd.jobs.events import STUDENT, TEACHER, read_events
from metakd.report import results
from metakd.storage import Store

from tracking_readers import mlflow_history, mlflow_runs, tensorboard_scalars, tensorboard_tags, wandb_offline_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    for module in ("mlflow", "tensorboard", "tensorboardX", "wandb"):  # the extras CI installs
        pytest.importorskip(module)
    storage = tmp_path_factory.mktemp("tracked-sweep")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "metakd.cli", "sweep", "sweeps/smoke.yaml", "--storage", str(storage),
                           "--tracking", "mlflow,tensorboard,wandb"], capture_output=True, text=True, timeout=900,
                          env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    root = storage / "smoke"
    df = results.load(str(root))
    store = Store(str(root))
    return {"root": root, "out": proc.stdout, "results": df, "curves": results.load_curves(str(root)),
            "trainings": read_events(store, TEACHER) + read_events(store, STUDENT)}


def _trial_metrics(df, trial_id: str) -> dict[str, float]:
    """What the Parquet results say of one trial: each method's accuracy on each domain and split (mean over seeds)."""
    rows = df[(df["trial_id"] == trial_id) & (df["status"] == "ok")]
    return {f"{m}/{d}/{split}_accuracy": g["accuracy"].mean()
            for (m, d, split), g in rows.groupby(["method", "domain", "split"])}


def _gamma2(df, trial_id: str) -> float:
    (value,) = df[df["trial_id"] == trial_id]["gamma2"].unique()
    return float(value)


def _curve(curves, trial_id: str, training: str, key: str, what: str, domain: str, seed: int, teacher_key: str):
    rows = curves[curves["trial_id"] == trial_id]
    if training == "teacher":
        return rows[(rows["teacher_key"] == key) & (rows["method"] == f"teacher:{what}")]
    return rows[(rows["method"] == what) & (rows["domain"] == domain) & (rows["seed"] == seed)
                & (rows["teacher_key"] == teacher_key)]


def _assert_same_curve(loss: list, dev: list, expected) -> None:
    assert len(expected) > 0
    assert [s for s, _ in loss] == list(range(1, len(expected) + 1))  # one point per epoch, stage after stage
    assert [v for _, v in loss] == pytest.approx(list(expected["train_loss"]), rel=1e-5)
    assert dev == [(i + 1, pytest.approx(v, rel=1e-5)) for i, v in enumerate(expected["dev_accuracy"])
                   if not math.isnan(v)]


def test_the_sweep_says_what_it_logged_to_mlflow(sweep):
    assert "tracking: 4 Parquet part(s) and 4 best student(s) logged to MLflow" in sweep["out"]


def test_mlflow_has_a_run_per_trial_with_the_parquet_values_and_a_nested_run_per_training(sweep):
    df, uri = sweep["results"], f"sqlite:///{sweep['root']}/mlflow.db"
    runs = mlflow_runs(uri, "smoke")
    trials = {r.data.tags["trial_id"]: r for r in runs if "training" not in r.data.tags}
    assert sorted(trials) == sorted(df["trial_id"].unique())
    for trial_id, run in trials.items():
        assert run.info.status == "FINISHED" and run.info.run_name == f"trial_driver_{trial_id}"
        assert float(run.data.params["gamma2"]) == _gamma2(df, trial_id)
        expected = _trial_metrics(df, trial_id)
        assert len(expected) == 2 * 2 * 2  # methods x domains x splits
        assert {k: run.data.metrics[k] for k in expected} == pytest.approx(expected)
    # one nested run per training, under the trial whose worker trained it
    nested = [r for r in runs if "training" in r.data.tags]
    assert sorted(r.data.tags["key"] for r in nested) == sorted(e["key"] for e in sweep["trainings"])
    for run in nested:
        t = run.data.tags
        assert t["mlflow.parentRunId"] == trials[t["trial_id"]].info.run_id
        expected = _curve(sweep["curves"], t["trial_id"], t["training"], t["key"], t.get("kind") or t["method"],
                          t["domain"], int(t["seed"]), t.get("teacher_key"))
        _assert_same_curve(mlflow_history(uri, run.info.run_id, "train_loss"),
                           mlflow_history(uri, run.info.run_id, "dev_accuracy"), expected)
    # the shared meta-teacher: logged once, and linked from both trials and from every metakd student
    (meta,) = [r for r in nested if r.data.tags.get("kind") == "meta"]
    key = meta.data.tags["key"]
    assert all(key in run.data.tags["teacher_keys"].split(",") for run in trials.values())
    students = [r for r in nested if r.data.tags.get("method") == "metakd"]
    assert {r.data.tags["trial_id"] for r in students} == set(trials)
    assert {r.data.tags["teacher_run_id"] for r in students} == {meta.info.run_id}


def test_mlflow_keeps_each_trials_parquet_parts_and_the_best_students(sweep):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{sweep['root']}/mlflow.db")
    trials = [r for r in mlflow_runs(f"sqlite:///{sweep['root']}/mlflow.db", "smoke") if "training" not in r.data.tags]
    best = []
    for run in trials:
        part = run.data.tags["part"]
        logged = [a.path for a in client.list_artifacts(run.info.run_id, "results")]
        assert logged == [f"results/{part}.parquet"]
        local = client.download_artifacts(run.info.run_id, f"results/{part}.parquet", str(sweep["root"] / "dl"))
        assert results.load(local).equals(results.load(str(sweep["root"] / "results" / f"{part}.parquet")))
        best += [a.path for a in client.list_artifacts(run.info.run_id, "best_student")]
    assert sorted(p.split("/")[1] for p in best) == ["kd_single-alpha", "kd_single-beta", "metakd-alpha", "metakd-beta"]
    for path in best:  # the exported directory: a model card and weights
        run = next(r for r in trials if client.list_artifacts(r.info.run_id, path))
        files = {os.path.basename(a.path) for a in client.list_artifacts(run.info.run_id, path)}
        assert "README.md" in files and files & {"model.safetensors", "model.onnx"}


def test_tensorboard_has_tunes_view_per_trial_and_a_curve_per_training(sweep):
    df, base = sweep["results"], sweep["root"] / "tensorboard" / "smoke"
    assert sorted(os.listdir(base)) == sorted(f"trial_driver_{t}" for t in df["trial_id"].unique())
    keys = []
    for trial_id in df["trial_id"].unique():
        trial_dir = base / f"trial_driver_{trial_id}"
        scalars = tensorboard_scalars(str(trial_dir))
        for k, v in _trial_metrics(df, trial_id).items():
            assert scalars[f"ray/tune/{k}"][-1][1] == pytest.approx(v, rel=1e-6)
        for name in (d for d in os.listdir(trial_dir) if (trial_dir / d).is_dir()):
            t = tensorboard_tags(str(trial_dir / name))
            assert t["trial_id"] == trial_id and name.startswith(f"{t['training']}-{t.get('kind') or t['method']}-")
            s = tensorboard_scalars(str(trial_dir / name))
            _assert_same_curve(s["train_loss"], s.get("dev_accuracy", []),
                               _curve(sweep["curves"], trial_id, t["training"], t["key"], t.get("kind") or t["method"],
                                      t["domain"], int(t["seed"]), t.get("teacher_key")))
            keys.append(t["key"])
    assert sorted(keys) == sorted(e["key"] for e in sweep["trainings"])


def test_wandb_offline_has_a_run_per_trial_and_per_training(sweep):
    df, runs = sweep["results"], wandb_offline_runs(str(sweep["root"]))
    assert {r["group"] for r in runs} == {"smoke"}
    trial_runs = [r for r in runs if r["job_type"] == "trial"]
    assert sorted(r["name"] for r in trial_runs) == sorted(f"trial_driver_{t}" for t in df["trial_id"].unique())
    trials = {r["name"]: r for r in trial_runs}
    for trial_id in df["trial_id"].unique():
        run = trials[f"trial_driver_{trial_id}"]
        assert run["config"]["gamma2"] == _gamma2(df, trial_id)
        last = {}
        for row in run["history"]:
            last.update(row)
        expected = _trial_metrics(df, trial_id)
        missing = [k for k in expected if k not in last]
        assert not missing, (missing, [h["_step"] for h in run["history"]], run["path"])
        assert {k: last[k] for k in expected} == pytest.approx(expected)
    trainings = [r for r in runs if r["job_type"] in ("teacher", "student")]
    assert sorted(r["config"]["key"] for r in trainings) == sorted(e["key"] for e in sweep["trainings"])
    for run in trainings:
        c = run["config"]
        expected = _curve(sweep["curves"], c["trial_id"], c["training"], c["key"], c.get("kind") or c["method"],
                          c["domain"], int(c["seed"]), c.get("teacher_key"))
        _assert_same_curve([(h["_step"], h["train_loss"]) for h in run["history"]],
                           [(h["_step"], h["dev_accuracy"]) for h in run["history"] if "dev_accuracy" in h], expected)

"""Experiment trackers (metakd/tracking.py) with the real components: an MLflow tracking store in
SQLite read through MLflow's client, TensorBoard event files read with TensorBoard's reader, W&B
offline run directories. `metakd run --tracking` in-process here; the Ray Tune sweep in
test_sweep_tracking.py."""

from __future__ import annotations

import math
import os

import pandas as pd
import pytest

from metakd import tracking
from metakd.config import ConfigError, TrackingConfig, from_dict, load_yaml, tracking_from_flag
from metakd.jobs.run import run_local
from metakd.report import results

from tracking_readers import mlflow_history, mlflow_runs, tensorboard_scalars, wandb_offline_runs

CFG = {
    "name": "tracked", "methods": ["kd_single"], "seeds": [0], "device": "cpu",
    "data": {"max_length": 16, "vocab_size": 300,
             "synthetic": {"num_domains": 2, "examples_per_domain": 60, "words_per_example": 10,
                           "shared_vocab": 30, "domain_vocab": 15}},
    "teacher": {"preset": "tiny-teacher", "epochs": 2, "lr": 2e-3, "batch_size": 16},
    "distill": {"stage1_epochs": 1, "stage1_lr": 3e-3, "stage2_epochs": 2, "stage2_lr": 3e-3, "batch_size": 16},
}


def _quiet(*_a, **_k):
    pass


# --------------------------------------------------------------------------- the YAML and the flag


def test_search_tracking_reads_the_list_form_with_settings():
    raw = load_yaml("sweeps/smoke.yaml")
    raw["search"]["tracking"] = ["tensorboard", {"mlflow": {"tracking_uri": "sqlite:////tmp/x.db"}},
                                 {"wandb": {"mode": "online", "project": "p"}}]
    t = from_dict(raw, require_search=True).search.tracking
    assert list(t.chosen()) == ["mlflow", "tensorboard", "wandb"]
    assert t.mlflow.tracking_uri == "sqlite:////tmp/x.db" and t.mlflow.experiment is None
    assert t.wandb.mode == "online" and t.tensorboard.dir is None
    del raw["search"]["tracking"]
    assert from_dict(raw, require_search=True).search.tracking.chosen() == {}


@pytest.mark.parametrize("value, message", [
    (["neptune"], "search.tracking.neptune: unknown key; allowed keys here: mlflow, tensorboard, wandb"),
    ([{"wandb": {"mode": "sometimes"}}], "search.tracking.wandb.mode: 'sometimes' is not allowed"),
    ([{"mlflow": {"uri": "x"}}], "search.tracking.mlflow.uri: unknown key"),
    (["mlflow", "mlflow"], "search.tracking[1]: 'mlflow' is listed twice"),
    ("mlflow", "search.tracking: expected a list of trackers"),
])
def test_search_tracking_refuses_what_it_cannot_use(value, message):
    raw = load_yaml("sweeps/smoke.yaml")
    raw["search"]["tracking"] = value
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict(raw, require_search=True)


def test_tracking_flag_replaces_the_yaml_list_keeping_its_settings():
    yaml_list = TrackingConfig(mlflow=tracking.MLflowSettings(tracking_uri="http://mlflow:5000"))
    flag = tracking_from_flag("mlflow,tensorboard", yaml_list)
    assert flag.mlflow.tracking_uri == "http://mlflow:5000" and flag.tensorboard is not None and flag.wandb is None
    assert tracking_from_flag("none", yaml_list).chosen() == {}
    with pytest.raises(ConfigError, match="--tracking.comet: unknown key"):
        tracking_from_flag("comet")


def test_a_tracker_not_installed_fails_before_any_work_with_the_install_command(monkeypatch, tmp_path):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError, match=r'search.tracking.wandb: wandb is not installed here; install it with '
                                          r'pip install "metakd\[wandb\]"'):
        tracking.resolve(TrackingConfig(wandb=tracking.WandbSettings()), "s", str(tmp_path))
    assert not os.listdir(tmp_path)


def test_a_remote_storage_needs_the_tracker_locations_set():
    with pytest.raises(ConfigError, match="search.tracking.tensorboard.dir: the storage is not a local path"):
        tracking.resolve(TrackingConfig(tensorboard=tracking.TensorBoardSettings()), "s", None)


def test_training_names_say_kind_method_domain_seed_and_teacher():
    t = tracking.Training("student", "job1", "metakd", "alpha", 0, "0123456789abcdef")
    assert t.name == "student-metakd-alpha-seed0-teacher-01234567"
    assert tracking.Training("teacher", "fedcba9876543210", "meta", None, 1, "fedcba9876543210").name \
        == "teacher-meta-all-seed1-fedcba98"


# --------------------------------------------------------------------------- metakd run --tracking


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, single_thread_torch):
    for module in ("mlflow", "tensorboard", "tensorboardX", "wandb"):  # the extras CI installs
        pytest.importorskip(module)
    root = tmp_path_factory.mktemp("tracked") / "tracked"
    trackers = TrackingConfig(mlflow=tracking.MLflowSettings(), tensorboard=tracking.TensorBoardSettings(),
                              wandb=tracking.WandbSettings(mode="offline"))
    out = run_local(from_dict(CFG), root=str(root), log=_quiet, trackers=trackers)
    curves = results.load_curves(str(root))
    return root, out, curves


def _points(curves: pd.DataFrame, **where) -> pd.DataFrame:
    rows = curves
    for k, v in where.items():
        rows = rows[rows[k] == v]
    return rows


def _expected(curves: pd.DataFrame, tags: dict) -> pd.DataFrame:
    """The Parquet curve of the training a tracker run is tagged with."""
    if tags["training"] == "teacher":
        return _points(curves, teacher_key=tags["key"], method=f"teacher:{tags['kind']}")
    return _points(curves, method=tags["method"], domain=tags["domain"], seed=int(tags["seed"]),
                   teacher_key=tags["teacher_key"])


def _assert_same_curve(got_loss: list, got_dev: list, expected: pd.DataFrame) -> None:
    assert len(expected) > 0
    assert [s for s, _ in got_loss] == list(range(1, len(expected) + 1))  # one point per epoch, stages in turn
    assert [v for _, v in got_loss] == pytest.approx(list(expected["train_loss"]), rel=1e-5)
    dev = [(i + 1, v) for i, v in enumerate(expected["dev_accuracy"]) if not math.isnan(v)]
    assert got_dev == [(s, pytest.approx(v, rel=1e-5)) for s, v in dev]


@pytest.mark.slow
def test_mlflow_has_the_run_and_one_nested_run_per_training_with_its_curve(tracked_run):
    root, out, curves = tracked_run
    runs = mlflow_runs(f"sqlite:///{root}/mlflow.db", "tracked")
    parent = [r for r in runs if r.data.tags.get("training") == "run"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.metrics["kd_single/alpha/test_accuracy"] == pytest.approx(
        next(s["test_accuracy"] for s in out["students"] if s["domain"] == "alpha"))
    trainings = [r for r in runs if r.data.tags.get("training") in ("teacher", "student")]
    assert sorted(r.data.tags["training"] for r in trainings) == ["student"] * 2 + ["teacher"] * 2
    uri = f"sqlite:///{root}/mlflow.db"
    for run in trainings:
        assert run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        _assert_same_curve(mlflow_history(uri, run.info.run_id, "train_loss"),
                           mlflow_history(uri, run.info.run_id, "dev_accuracy"), _expected(curves, run.data.tags))
    students = [r for r in trainings if r.data.tags["training"] == "student"]
    teachers = {r.data.tags["key"]: r.info.run_id for r in trainings if r.data.tags["training"] == "teacher"}
    for s in students:  # linked to the run that trained its teacher
        assert s.data.tags["teacher_run_id"] == teachers[s.data.tags["teacher_key"]]
        assert s.info.run_name.startswith("cfg-") and "-teacher-" in s.info.run_name


@pytest.mark.slow
def test_tensorboard_has_one_event_directory_per_training_with_its_curve(tracked_run):
    root, out, curves = tracked_run
    run_dir = root / "tensorboard" / "tracked"
    (part,) = os.listdir(run_dir)
    trainings = sorted(d for d in os.listdir(run_dir / part) if d != "run")
    assert len(trainings) == 4 and sum(d.startswith("teacher-single-") for d in trainings) == 2
    for name in trainings:
        scalars = tensorboard_scalars(str(run_dir / part / name))
        kind, what, domain, seed = name.split("-")[:4]
        if kind == "teacher":
            expected = curves[(curves["method"] == "teacher:single") & (curves["domain"] == domain)]
        else:
            expected = _points(curves, method=what, domain=domain, seed=int(seed[4:]))
        _assert_same_curve(scalars["train_loss"], scalars.get("dev_accuracy", []), expected)
    final = tensorboard_scalars(str(run_dir / part / "run"))
    assert final["kd_single/beta/dev_accuracy"][0][1] == pytest.approx(
        next(s["dev_accuracy"] for s in out["students"] if s["domain"] == "beta"))


@pytest.mark.slow
def test_wandb_offline_writes_one_run_directory_per_training_with_its_curve(tracked_run):
    root, out, curves = tracked_run
    runs = wandb_offline_runs(str(root))
    assert sorted(r["job_type"] for r in runs) == ["run", "student", "student", "teacher", "teacher"]
    assert {r["group"] for r in runs} == {"tracked"}
    for run in runs:
        if run["job_type"] == "run":
            continue
        history = run["history"]
        _assert_same_curve([(h["_step"], h["train_loss"]) for h in history],
                           [(h["_step"], h["dev_accuracy"]) for h in history if "dev_accuracy" in h],
                           _expected(curves, run["config"]))
        assert run["summary"]["final/dev_accuracy"] > 0

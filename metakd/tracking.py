"""Experiment trackers: MLflow, TensorBoard, Weights & Biases; one row each in :data:`TRACKERS`.

Each shows a sweep two ways:

- per trial, through Ray Tune's own logger callback on the sweep driver (``MLflowLoggerCallback``;
  ``TBXLoggerCallback`` writing beside the trainings, :func:`_trial_event_files`;
  ``WandbLoggerCallback`` whose logging actor waits for W&B to write the run out, :func:`_wandb_trial_runs`): the trial's searched parameters and every metric
  it reports to Tune: after each student the running accuracies, at its end the dev / test accuracy
  of each method and of each (method, domain) (``metakd.report.rows.running_metrics``);
- per training, written by the worker that trains it as each epoch ends (:func:`track_training`,
  fed by ``train_stage`` through ``runtime.track``): ``train_loss`` and ``dev_accuracy``, one point
  per epoch (stages follow each other: a student's stage 2 goes on after stage 1's epochs), and at
  its end the training's ``final/dev_accuracy`` (and ``final/test_accuracy``). A run is named ``<trial>/<training>``
  (:attr:`Training.name`: teacher kind or method, domain, seed, teacher key) and tagged with each of
  them. A shared teacher is logged once, by the trial whose worker trained it; its key is the
  ``teacher_key`` tag of every student distilled from it, in whichever trial, and the trial's run
  lists the keys of all its teachers (``teacher_keys``).

MLflow nests the trainings under the trial's run (``mlflow.parentRunId``) and, at the end of a sweep,
stores each trial's results and curves Parquet parts and the exported best student of each
(method, domain) (``metakd export``) as artifacts of the trial runs. TensorBoard writes
``<dir>/<sweep>/<trial>/`` (Tune's view) with one sub-directory per training; W&B groups every run
of a sweep (``group``) and tells trials and trainings apart by ``job_type``.

A tracker that fails while a training runs is reported once in the worker's log and dropped for
that training: tracking never fails a training.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from .config import ConfigError, MLflowSettings, TensorBoardSettings, TrackingConfig, WandbSettings

# --------------------------------------------------------------------------- what crosses to the workers


@dataclass(frozen=True)
class Tracking:
    """What a worker needs to log its trainings: the chosen trackers (settings resolved on the driver
    by :func:`resolve`), the sweep, the trial, and the trial's own run where a tracker nests trainings."""

    trackers: dict[str, Any]  # name -> MLflowSettings | TensorBoardSettings | WandbSettings, defaults filled
    sweep: str
    trial: str  # Tune's trial name (trial_driver_<id>), or the part of a `metakd run`
    trial_id: str  # the results table's trial_id
    parent: dict[str, str] = field(default_factory=dict)  # tracker -> the trial's run (MLflow: its run id)


@dataclass(frozen=True)
class Training:
    """One teacher or student training (or, kind ``run``, a whole `metakd run`) as the trackers name it."""

    kind: str  # teacher | student | run
    key: str  # the teacher's or the student job's key
    what: str  # the teacher kind, or the student's method
    domain: str | None
    seed: int | None
    teacher_key: str | None = None

    @classmethod
    def of_teacher(cls, spec) -> "Training":
        return cls("teacher", spec.key, spec.kind, spec.domain, spec.seed, spec.key)

    @classmethod
    def of_student(cls, job) -> "Training":
        return cls("student", job.key, job.method, job.domain, job.seed, job.teacher_key)

    @property
    def name(self) -> str:
        """``teacher-meta-all-seed0-<key>`` / ``student-metakd-alpha-seed0-teacher-<key>`` (8 characters of each key)."""
        if self.kind == "run":
            return "run"
        parts = [self.kind, self.what, self.domain or "all", f"seed{self.seed}"]
        if self.kind == "teacher":
            parts.append(self.key[:8])
        elif self.teacher_key:
            parts.append(f"teacher-{self.teacher_key[:8]}")
        return "-".join(parts)

    def tags(self, tracking: Tracking) -> dict[str, str]:
        tags = {"sweep": tracking.sweep, "trial": tracking.trial, "trial_id": tracking.trial_id,
                "training": self.kind, "key": self.key,
                ("kind" if self.kind == "teacher" else "method"): self.what,
                "domain": self.domain or "all", "seed": str(self.seed), "teacher_key": self.teacher_key or ""}
        return {k: v for k, v in tags.items() if v not in ("", "None")}


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Tracker:
    """One experiment tracker: what it needs installed, its defaults, Ray Tune's callback for the per-trial
    view, and the writer of one training's curve (``epoch(step, values)``, ``close(final, ok)``)."""

    name: str
    modules: tuple[str, ...]  # imported by the tracker; missing: the install command is the error
    resolve: Callable[[Any, str, str | None], Any]  # (settings, sweep, local sweep root or None) -> settings
    callback: Callable[[Any, str], Any]  # (resolved settings, sweep) -> a ray.tune LoggerCallback
    writer: Callable[[Any, Tracking, Training], Any]  # (resolved settings, tracking, training) -> writer


def install_command(name: str) -> str:
    return f'pip install "metakd[{name}]" (from a checkout: pip install -e ".[{name}]")'


def resolve(config: TrackingConfig, sweep: str, root: str | None, where: str = "search.tracking") -> dict[str, Any]:
    """The chosen trackers with their defaults filled in (``root``: the sweep's local directory, None when
    the storage is remote), checked to be installed here: run on the driver before any work starts."""
    chosen = config.chosen()
    for name in chosen:
        missing = [m for m in TRACKERS[name].modules if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"{where}.{name}: {', '.join(missing)} is not installed here; install it with "
                              f"{install_command(name)}")
    return {name: TRACKERS[name].resolve(settings, sweep, root) for name, settings in chosen.items()}


def tune_callbacks(trackers: dict[str, Any], sweep: str) -> list:
    """Ray Tune's logger callbacks of the chosen trackers (the per-trial view)."""
    return [TRACKERS[name].callback(settings, sweep) for name, settings in trackers.items()]


def _need_root(root: str | None, what: str) -> str:
    if root is None:
        raise ConfigError(f"search.tracking.{what}: the storage is not a local path, so there is no default; "
                          f"set it (a path or URI every node reaches)")
    return root


# --------------------------------------------------------------------------- MLflow


def _mlflow_resolve(s: MLflowSettings, sweep: str, root: str | None) -> MLflowSettings:
    uri = s.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") \
        or f"sqlite:///{_need_root(root, 'mlflow.tracking_uri')}/mlflow.db"
    s = replace(s, tracking_uri=uri, experiment=s.experiment or sweep)
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
    client = MlflowClient(uri)
    if client.get_experiment_by_name(s.experiment) is None:
        # a local store keeps its artifacts beside the sweep, not in ./mlruns of whoever created it
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        location = f"{root}/mlflow-artifacts" if local and root is not None else None
        try:
            client.create_experiment(s.experiment, artifact_location=location)
        except Exception:  # created meanwhile by another driver
            if client.get_experiment_by_name(s.experiment) is None:
                raise
    return s


def _mlflow_callback(s: MLflowSettings, sweep: str):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(tracking_uri=s.tracking_uri, experiment_name=s.experiment, tags={"sweep": sweep})


class MLflowCurve:
    """One training as an MLflow run, nested under the trial's run."""

    def __init__(self, s: MLflowSettings, tracking: Tracking, training: Training):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(s.tracking_uri)
        experiment = self.client.get_experiment_by_name(s.experiment)
        tags = training.tags(tracking)
        if tracking.parent.get("mlflow"):
            tags["mlflow.parentRunId"] = tracking.parent["mlflow"]
        if training.kind == "student" and training.teacher_key:
            teacher = find_runs(self.client, experiment.experiment_id, tracking.sweep, training="teacher",
                                key=training.teacher_key)
            if teacher:  # the run that trained it, in whichever trial
                tags["teacher_run_id"] = teacher[0].info.run_id
        self.run_id = self.client.create_run(experiment.experiment_id, run_name=f"{tracking.trial}/{training.name}",
                                             tags=tags).info.run_id

    def epoch(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, final: dict[str, float], ok: bool) -> None:
        for k, v in final.items():
            self.client.log_metric(self.run_id, k, v)
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def find_runs(client, experiment_id: str, sweep: str, **tags: str) -> list:
    """Runs of ``sweep`` with these tag values, newest first."""
    where = " and ".join([f"tags.sweep = '{sweep}'"] + [f"tags.{k} = '{v}'" for k, v in tags.items()])
    return client.search_runs([experiment_id], filter_string=where, order_by=["attributes.start_time DESC"])


def _mlflow_trial_run(s: MLflowSettings, sweep: str, trial: str, tags: dict[str, str], wait_s: float) -> str | None:
    """The run ``MLflowLoggerCallback`` opened for ``trial`` (it tags it ``trial_name``), tagged with
    ``tags``; None when it does not appear within ``wait_s`` (the callback starts it as the trial starts)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(s.tracking_uri)
    experiment = client.get_experiment_by_name(s.experiment)
    deadline = time.monotonic() + wait_s
    while True:
        runs = find_runs(client, experiment.experiment_id, sweep, trial_name=trial)
        if runs or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not runs:
        return None
    for k, v in tags.items():
        client.set_tag(runs[0].info.run_id, k, v)
    return runs[0].info.run_id


# --------------------------------------------------------------------------- TensorBoard


def _tensorboard_resolve(s: TensorBoardSettings, sweep: str, root: str | None) -> TensorBoardSettings:
    return replace(s, dir=os.path.abspath(os.path.expanduser(s.dir)) if s.dir
                   else f"{_need_root(root, 'tensorboard.dir')}/tensorboard")


def _tensorboard_callback(s: TensorBoardSettings, sweep: str):
    return __getattr__("TrialEventFiles")(os.path.join(s.dir, sweep))


def __getattr__(name: str):
    # The subclasses of Ray's callbacks below are made on first use (importing ray.tune takes seconds,
    # and workers never need them) and found here by name, as pickle (Tune's saved run config) looks them up.
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in globals():
        cls = _LAZY[name]()
        cls.__module__, cls.__qualname__ = __name__, name
        globals()[name] = cls
    return globals()[name]


def _trial_event_files():
    """Ray Tune's TBXLoggerCallback, writing each trial to <dir>/<sweep>/<trial>/ beside its trainings
    rather than into Tune's trial directory."""
    from ray.tune.logger import TBXLoggerCallback

    class TrialEventFiles(TBXLoggerCallback):
        def __init__(self, logdir: str):
            super().__init__()
            self.logdir = logdir

        def log_trial_start(self, trial) -> None:
            super().log_trial_start(trial)
            self._trial_writer[trial].close()
            self._trial_writer[trial] = self._summary_writer_cls(os.path.join(self.logdir, str(trial)), flush_secs=30)

    return TrialEventFiles


class TensorBoardCurve:
    """One training as an event-file directory ``<dir>/<sweep>/<trial>/<training>``, its tags as text."""

    def __init__(self, s: TensorBoardSettings, tracking: Tracking, training: Training):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(os.path.join(s.dir, tracking.sweep, tracking.trial, training.name), flush_secs=30)
        self.writer.add_text("training", "  \n".join(f"{k}: {v}" for k, v in training.tags(tracking).items()))

    def epoch(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # visible as the epoch ends, not 30 s later

    def close(self, final: dict[str, float], ok: bool) -> None:
        for k, v in final.items():
            self.writer.add_scalar(k, v, 0)
        self.writer.close()


# --------------------------------------------------------------------------- Weights & Biases


def _wandb_resolve(s: WandbSettings, sweep: str, root: str | None) -> WandbSettings:
    directory = os.path.abspath(os.path.expanduser(s.dir)) if s.dir else root
    if directory is None and s.mode == "offline":
        _need_root(root, "wandb.dir")
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    return replace(s, project=s.project or os.environ.get("WANDB_PROJECT") or "metakd", dir=directory)


def _wandb_callback(s: WandbSettings, sweep: str):
    # Ray asks for an API key on the driver unless WANDB_MODE says offline
    os.environ["WANDB_MODE"] = s.mode
    return __getattr__("WandbTrialRuns")(project=s.project, group=sweep, mode=s.mode, dir=s.dir, job_type="trial",
                                         tags=[sweep])


def _wandb_logging_actor():
    from ray.air.integrations.wandb import _WandbLoggingActor

    class WandbLoggingActor(_WandbLoggingActor):
        def run(self):
            super().run()
            # finish() returns before W&B's service process has written the run's last records, and Ray
            # kills this actor (the service with it) as soon as run() returns: wait for the service
            self._wandb.teardown()

    return WandbLoggingActor


def _wandb_trial_runs():
    """Ray Tune's WandbLoggerCallback, whose logging actors wait for W&B to write each run out."""
    from ray.air.integrations.wandb import WandbLoggerCallback

    class WandbTrialRuns(WandbLoggerCallback):
        _logger_actor_cls = __getattr__("WandbLoggingActor")

    return WandbTrialRuns


class WandbCurve:
    """One training as a W&B run in the sweep's group (``job_type`` teacher | student), its tags as config."""

    open_runs = 0  # in this process

    def __init__(self, s: WandbSettings, tracking: Tracking, training: Training):
        import wandb

        self.run = wandb.init(project=s.project, group=tracking.sweep, job_type=training.kind, dir=s.dir,
                              mode=s.mode, name=f"{tracking.trial}/{training.name}", config=training.tags(tracking),
                              tags=[tracking.sweep], reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        WandbCurve.open_runs += 1

    def epoch(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, final: dict[str, float], ok: bool) -> None:
        import wandb

        try:
            self.run.summary.update(final)
            self.run.finish(exit_code=0 if ok else 1)
        finally:
            WandbCurve.open_runs -= 1
        if WandbCurve.open_runs == 0:
            # finish() returns before W&B's service process has written the run out; a Ray worker is
            # killed when its work is done, before atexit would wait for it
            wandb.teardown()


_LAZY = {"TrialEventFiles": _trial_event_files, "WandbLoggingActor": _wandb_logging_actor,
         "WandbTrialRuns": _wandb_trial_runs}

TRACKERS: dict[str, Tracker] = {t.name: t for t in (
    Tracker("mlflow", ("mlflow",), _mlflow_resolve, _mlflow_callback, MLflowCurve),
    Tracker("tensorboard", ("tensorboardX", "tensorboard"), _tensorboard_resolve, _tensorboard_callback,
            TensorBoardCurve),
    Tracker("wandb", ("wandb",), _wandb_resolve, _wandb_callback, WandbCurve),
)}


# --------------------------------------------------------------------------- one training's curve


class Curves:
    """One training's curve in every chosen tracker (``runtime.tracker`` while it trains)."""

    def __init__(self, tracking: Tracking, training: Training, log=print):
        self.log, self.writers = log, {}
        self._offset, self._stage, self._last = 0, None, 0
        for name, settings in tracking.trackers.items():
            self._call(name, lambda: self.writers.__setitem__(name, TRACKERS[name].writer(settings, tracking, training)))

    def _call(self, name: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a tracker never fails a training
            self.writers.pop(name, None)
            self.log(f"tracking: {name} failed and is off for this training: {type(e).__name__}: {e}")

    def epoch(self, point: dict) -> None:
        """A ``train_stage`` curve point: train loss, and dev accuracy where the epoch was evaluated."""
        if point["stage"] != self._stage:
            self._offset, self._stage = self._offset + self._last, point["stage"]
        self._last = point["epoch"]
        values = {"train_loss": float(point["train_loss"])}
        if point.get("dev_accuracy") is not None and math.isfinite(point["dev_accuracy"]):
            values["dev_accuracy"] = float(point["dev_accuracy"])
        for name, writer in list(self.writers.items()):
            self._call(name, lambda: writer.epoch(self._offset + point["epoch"], values))

    def finish(self, summary: dict | None) -> None:
        """The training's result (a teacher's summary, a student's result): its accuracies as
        ``final/dev_accuracy`` (``final/test_accuracy``), then closed."""
        summary = summary or {}
        final = {f"final/{k}": float(summary[k]) for k in ("dev_accuracy", "test_accuracy")
                 if isinstance(summary.get(k), (int, float)) and math.isfinite(summary[k])}
        self.close(final, summary.get("status", "ok") == "ok")

    def close(self, final: dict[str, float] | None = None, ok: bool = False) -> None:
        for name, writer in list(self.writers.items()):
            self._call(name, lambda: writer.close(final or {}, ok))
        self.writers = {}


class _NoCurves:
    def finish(self, summary: dict | None) -> None:
        pass


@contextmanager
def track_training(tracking: Tracking | None, training: Training, runtime):
    """Log the training inside to ``tracking``'s trackers as it goes (rank 0 only: ``runtime.tracker``, which
    ``train_stage`` feeds each epoch); call ``finish(result)`` on what it yields once the training is done.
    A training that raises is closed as failed."""
    if tracking is None or not tracking.trackers or not runtime.is_main:
        yield _NoCurves()
        return
    curves = Curves(tracking, training, runtime.log)
    runtime.tracker = curves
    try:
        yield curves
    finally:
        runtime.tracker = None
        curves.close()  # a no-op after finish()


# --------------------------------------------------------------------------- trials, runs, artifacts


def for_trial(trackers: dict[str, Any], sweep: str, trial: str, trial_id: str, part: str,
              wait_s: float = 30.0) -> Tracking:
    """Inside a trial: its :class:`Tracking`, with the trial's MLflow run (opened by Tune's callback) as
    the parent of its trainings and tagged with its ``trial_id`` and results ``part``."""
    parent = {}
    if "mlflow" in trackers:
        run = _mlflow_trial_run(trackers["mlflow"], sweep, trial, {"trial_id": trial_id, "part": part}, wait_s)
        if run is not None:
            parent["mlflow"] = run
    return Tracking(trackers, sweep, trial, trial_id, parent)


def link_teachers(tracking: Tracking | None, teacher_keys: list[str]) -> None:
    """Tag the trial's MLflow run with the keys of every teacher its students used, trained here or reused."""
    if tracking is None or not tracking.parent.get("mlflow") or not teacher_keys:
        return
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking.trackers["mlflow"].tracking_uri).set_tag(tracking.parent["mlflow"], "teacher_keys",
                                                                   ",".join(teacher_keys))


def open_run(trackers: dict[str, Any], name: str, part: str, log=print) -> tuple[Tracking | None, Curves | None]:
    """`metakd run`: no Tune, so the run's own tracker runs (named ``part``) stand where a sweep has its
    trial runs; its trainings nest under the MLflow one. Returns the tracking and the run's writers
    (``finish`` them with the run's metrics)."""
    if not trackers:
        return None, None
    tracking = Tracking(trackers, name, part, part)
    run = Curves(tracking, Training("run", part, part, None, None), log)
    mlflow = run.writers.get("mlflow")
    return (replace(tracking, parent={"mlflow": mlflow.run_id}) if mlflow else tracking), run

"""``metakd sweep``: a Ray Tune ``Tuner`` whose trials run Ray Train ``TorchTrainer`` fits.

The three roles of Ray's Tune-over-Train pattern, under these names:
- per-worker functions: ``metakd.jobs.workers.teacher_worker`` / ``student_worker``, which
  pull teachers and student jobs from the sweep's registry;
- per-trial driver: :func:`trial_driver` (a Tune function trainable) that starts teacher and
  student runs as soon as there is work and room (``metakd.jobs.schedule``), writes the
  trial's rows after every finished student and reports them to Tune;
- the Tuner: :func:`run_sweep`, deterministic run name, resumed with ``Tuner.restore``.

Layout under ``<storage>/<name>/``: ``results/`` and ``curves/`` (Parquet, one part per trial),
``tune/`` (Tune's experiment state; ``tune-extensions/`` for runs that extend the search),
``train/`` (Ray Train run state), ``events/`` (one file per teacher or student training),
``study.journal`` / ``study.json`` (the Optuna study: ``metakd.sweep.study``), ``cache.json``,
``sweep_config.json``, ``_running.json`` and ``previous/`` (``metakd.sweep.identity``). The
content-addressed artifacts (``data/``, ``features/``, ``teachers/``, ``students/``) are in the
cache every sweep on the storage shares, ``<storage>/cache/`` (``metakd.jobs.cache``). With
``search.tracking`` and no location of their own: ``mlflow.db`` + ``mlflow-artifacts/``,
``tensorboard/`` and ``wandb/`` (``metakd.tracking``: Tune's logger callbacks for the trials, the
workers' per-epoch curves for the trainings).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from .. import tracking
from ..config import ConfigError, ExperimentConfig, ResourcesConfig, content_hash
from ..jobs import cache as artifact_cache
from ..jobs.events import count_student_trainings, count_teacher_trainings
from ..jobs.experiment import run_experiment
from ..jobs.ray_runner import RayRunner
from ..jobs.registry import sweep_registry
from ..report import analysis, results
from ..report.rows import curve_rows, result_rows, running_metrics
from ..storage import Store, is_uri
from . import study
from .identity import SweepLock, archive_run, check_config, study_name, tune_run
from .progress import SweepConsole
from .space import make_search, trial_config
from .tracked_artifacts import log_sweep_artifacts

DRIVER_RESOURCE = "trial_driver"


def sweep_root(storage: str, name: str) -> str:
    if is_uri(storage):
        return f"{storage.rstrip('/')}/{name}"
    return str(Path(os.path.expanduser(storage)).resolve() / name)


def trial_driver(params: dict, base: ExperimentConfig, sweep: str, root: str, trackers: dict | None = None,
                 cache: str | None = None) -> None:
    """Per-trial driver (Tune function trainable): one configuration, all its seeds and methods.
    ``trackers``: the experiment trackers its trainings log to (``metakd.tracking.resolve``);
    ``cache``: the root of the artifact cache (None: ``root`` itself)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    # Parts are named by the configuration, not the trial id: a configuration rerun after a
    # driver crash (even one Tune had not checkpointed yet) replaces its rows instead of adding.
    part = f"cfg-{content_hash(params)}"
    tracked = tracking.for_trial(trackers, sweep, tune.get_context().get_trial_name(), trial_id, part) \
        if trackers else None
    cfg = trial_config(base, params)
    resources = base.search.resources
    store, events = Store(cache or root), Store(root)
    registry = sweep_registry(sweep, owner=trial_id)
    runner = RayRunner(resources, storage_path=f"{root}/train", max_failures=base.search.max_failures)
    log = lambda msg: print(f"[{trial_id}] {msg}", flush=True)  # noqa: E731
    log("config: " + json.dumps(params, sort_keys=True))

    def on_students(new: list[dict], so_far: list[dict]) -> None:
        # rows after every student: an early-stopped (ASHA) or killed trial keeps what finished
        results.write_part(root, result_rows(cfg, sweep, trial_id, so_far, params), part)
        for _ in new:  # one report per finished student, as ASHA's time_attr counts them
            tune.report(running_metrics(so_far, cfg.methods))

    try:
        out = run_experiment(cfg, store, registry, runner, log, on_students=on_students,
                             source={"trial_id": trial_id, "part": part}, run_prefix=trial_id, tracking=tracked,
                             events=events)
    except Exception as e:
        why = f"trial {trial_id} failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        results.write_part(root, _finished_rows(root, part) + _failed_rows(cfg, sweep, trial_id, params, why), part)
        raise
    finally:
        registry.close()
    # the results part is already complete: on_students rewrote it after every student
    results.write_part(root, curve_rows(sweep, trial_id, out["students"], out["teachers_trained"]), part, "curves")
    tracking.link_teachers(tracked, out["teacher_keys"])
    final = running_metrics(out["students"], cfg.methods)
    tune.report({**final, "teachers_trained": len(out["teachers_trained"]), "done": True})


def _finished_rows(root: str, part: str) -> list[dict]:
    """Rows this trial's driver already wrote for this part (``on_students``: the students that
    finished before the failure)."""
    try:
        return results.load(f"{root}/results/{part}.parquet").to_dict("records")
    except (FileNotFoundError, ValueError):  # none yet, or unreadable: the failed rows replace it
        return []


def _failed_rows(cfg: ExperimentConfig, sweep: str, trial_id: str, params: dict, error: str) -> list[dict]:
    """One row per (seed, method) marking the trial failed with ``error``, so the table shows what is
    missing and why. (A student job that fails on its own is not this: it is a failed row of its own.)"""
    stub = [{"method": m, "domain": None, "seed": seed, "dev_accuracy": None, "test_accuracy": None,
             "dev_loss": None, "test_loss": None, "error": error} for seed in cfg.seeds for m in cfg.methods]
    return result_rows(cfg, sweep, trial_id, stub, params, status="failed")


def connect(address: str | None, resources: ResourcesConfig, verbose: bool = False) -> str:
    """Join the running cluster (inside ``ray job submit`` or with --address), else start a local one.

    Without ``verbose`` the workers' and trial drivers' output stays in Ray's log files and Ray
    logs warnings only: the console shows :class:`SweepConsole`'s lines instead.
    """
    import ray

    if ray.is_initialized():
        return "already connected"
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    if not verbose:  # said on every start, also when all is well; the "disabled" warning stays
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            lambda record: "Token authentication is enabled" not in record.getMessage())
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
        return f"connected to {address}"
    cpus = os.cpu_count() or 2
    # Trial drivers take a custom resource instead of a CPU: with 2 cores, drivers holding CPUs
    # would starve their own Train workers (WorkerGroupStartupTimeoutError, retried forever).
    ray.init(address="local", num_cpus=cpus, num_gpus=None, resources={DRIVER_RESOURCE: 1000},
             include_dashboard=True, dashboard_host="127.0.0.1", **quiet)
    return f"started a local Ray instance ({cpus} CPUs; dashboard http://127.0.0.1:8265)"


def driver_resources() -> dict:
    import ray

    if ray.cluster_resources().get(DRIVER_RESOURCE, 0) >= 1:
        return {DRIVER_RESOURCE: 1}
    print(f"warning: the cluster advertises no '{DRIVER_RESOURCE}' resource (start the head with "
          f"--resources='{{\"{DRIVER_RESOURCE}\": 1000}}'); each trial driver takes 1 CPU instead", flush=True)
    return {"CPU": 1}


def build_tuner(cfg: ExperimentConfig, sweep: str, root: str, verbose: bool = False, trackers: dict | None = None,
                cache: str | None = None):
    """The sweep's Tuner: its current Tune run restored, or a new one; None when a new one would have
    no trial to run (the study already holds ``search.num_samples`` trials)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    s = cfg.search
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, base=cfg, sweep=sweep, root=root, trackers=trackers, cache=cache),
        driver_resources())
    # verbose: Tune's own table and result blocks; else only SweepConsole's (Tune's reporter silent)
    console = SweepConsole(sweep, s.metric, list(s.params), table_every_s=float("inf") if verbose else 30.0)
    callbacks = [console, *tracking.tune_callbacks(trackers or {}, sweep)]
    store = Store(root)
    run_dir = tune_run(store)  # tune, or tune-extensions/n<num_samples> (metakd.sweep.identity)
    tune_dir = f"{root}/{run_dir}"
    if tune.Tuner.can_restore(tune_dir):
        print(f"resuming sweep '{sweep}' from {tune_dir}", flush=True)
        tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
        # the restored RunConfig is the first run's: take this run's console and verbosity
        run_config = getattr(getattr(tuner, "_local_tuner", None), "_run_config", None)
        if run_config is not None:
            run_config.callbacks, run_config.verbose = callbacks, int(verbose)
        return tuner
    storage, name = study.open_study(cfg, store, study_name(store, sweep))
    num_samples, known = s.num_samples, 0
    if storage is not None:  # a new Tune run adds the trials the study lacks (all of them, in a new sweep)
        known = len(study.trials_in(storage, name))
        num_samples -= known
        print(f"Optuna study '{name}': {study.without_password(study.storage_url(cfg, root))} "
              f"(optuna-dashboard opens it)", flush=True)
        if num_samples <= 0:
            return None
    elif s.algorithm != "grid":
        print(f"note: the Optuna study of a sweep on {root} lives in Tune's searcher state only (resumable, not "
              f"extendable; set search.study_storage to keep it in a database)", flush=True)
    # an extension's sampler is seeded anew (by the trials it finds): seeded as the first run was, its
    # random start-up draws would repeat the first run's configurations
    param_space, search_alg = make_search(cfg, seed=known, storage=storage, study_name=name)
    scheduler = None
    if s.scheduler is not None:
        # one report per finished student; max_t only caps the rungs
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=10_000,
                                  grace_period=s.scheduler.grace_period, reduction_factor=s.scheduler.reduction_factor)
    tune_config = tune.TuneConfig(
        metric=s.metric, mode=s.mode, search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
        max_concurrent_trials=s.resources.max_concurrent_trials,
    )
    parent, _, leaf = run_dir.rpartition("/")
    run_config = tune.RunConfig(name=leaf, storage_path=f"{root}/{parent}" if parent else root,
                                verbose=int(verbose), callbacks=callbacks,
                                # a trial's driver already launched its failed runs again (search.max_failures,
                                # lost nodes not counted): a trial that failed would fail the same way again.
                                # Tune restarts a driver whose node was preempted without counting it.
                                failure_config=tune.FailureConfig(max_failures=0))
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def run_sweep(cfg: ExperimentConfig, address: str | None = None, storage: str | None = None,
              name: str | None = None, yaml_path: str | None = None, verbose: bool = False,
              restart: bool = False) -> int:
    """Run (or resume) the sweep; refuses, before Ray starts, a second driver of the same sweep and a
    rerun whose configuration differs from the stored one (``restart``: move the old run aside)."""
    sweep = name or cfg.name
    storage = storage or cfg.search.storage
    if not is_uri(storage) and (address or os.environ.get("RAY_ADDRESS")) and not storage.startswith("/"):
        print(f"note: storage '{storage}' is a relative local path; on a multi-node cluster use shared "
              f"storage (s3://, gs://, or an NFS path mounted on every node)", flush=True)
    cfg.search.storage = storage
    root = sweep_root(storage, sweep)
    cache = artifact_cache.cache_root(storage, cfg.search.cache)
    if cache == root:
        raise ConfigError(f"sweep name '{sweep}' is the artifact cache's directory under {storage}; pick another --name")
    # before any work: a tracker that is not installed, or has no default for a remote storage, fails here
    trackers = tracking.resolve(cfg.search.tracking, sweep, None if is_uri(storage) else root)
    # Save Tune's experiment state often: a driver killed between saves reruns those trials.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    if not verbose:
        # Tune's reporter prints an experiment banner even when silent; the legacy one does not
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    start = time.perf_counter()
    print(f"metakd sweep '{sweep}' ({yaml_path or 'config'}): {cfg.search.algorithm} "
          f"(num_samples {cfg.search.num_samples}), "
          f"{len(cfg.search.params)} searched parameters {sorted(cfg.search.params)}, methods {cfg.methods}, "
          f"seeds {cfg.seeds}; storage {root}", flush=True)
    store = Store(root)
    with SweepLock(store, sweep):  # before the registry's reset: it would wipe a running driver's claims
        if restart:
            moved = archive_run(store)
            print(f"restart: the previous run moved to {moved}" if moved else "restart: no previous run", flush=True)
        print(check_config(store, cfg, sweep), flush=True)
        artifact_cache.link(store, Store(cache), lambda msg: print(msg, flush=True))
        print(f"artifact cache: {cache}", flush=True)
        print(connect(address, cfg.search.resources, verbose), flush=True)
        registry = sweep_registry(sweep, owner="sweep")
        registry.reset()
        tuner = build_tuner(cfg, sweep, root, verbose, trackers, cache)
        if tuner is None:
            print(f"sweep '{sweep}': its study already holds search.num_samples = {cfg.search.num_samples} trials; "
                  f"nothing to run (raise num_samples to extend it)", flush=True)
            return 0
        grid = tuner.fit()
    errors = [r for r in grid if r.error is not None]
    print_summary(cfg, sweep, root, grid, time.perf_counter() - start)
    log_sweep_artifacts(trackers, root, sweep, cfg.students.keep == "all")
    if errors:
        print(f"{len(errors)} trial(s) failed; rerun the same command to retry them (--verbose shows the "
              f"workers' output)", file=sys.stderr)
        return 1
    return 0


def print_summary(cfg: ExperimentConfig, sweep: str, root: str, grid, seconds: float) -> None:
    s = cfg.search
    print(f"\n=== sweep '{sweep}' finished in {seconds:.0f}s: {len(grid)} trials ===")
    try:
        best = grid.get_best_result(metric=s.metric, mode=s.mode, filter_nan_and_inf=True)
        print(f"best configuration ({s.metric} = {best.metrics.get(s.metric, float('nan')):.2%}): "
              f"{json.dumps(best.config, sort_keys=True)}")
    except (RuntimeError, KeyError, AttributeError) as e:
        print(f"no best configuration ({e})")
    try:
        df = results.load(root)
    except FileNotFoundError:
        print("no results written")
        return
    for split in ("dev", "test"):
        try:
            table = analysis.pivot_main_table(analysis.main_table(df, split=split))
            print(f"\nper-method {split} accuracy (%), mean ± std over trials and seeds:\n{table.to_string()}")
        except ValueError as e:
            print(f"no {split} table: {e}")
    print(analysis.describe_collapsed(df) or "no collapsed students")
    store = Store(root)
    students = df[(df["status"] == "ok") & (df["split"] == "test")]
    reused = int(students["reused_from"].notna().sum())
    print(f"\ntrainings so far in this sweep: {count_teacher_trainings(store)} teachers, "
          f"{count_student_trainings(store)} students ({len(students)} student rows, {reused} reused from "
          f"another trial); results: {root}/results/  (metakd results {root})")

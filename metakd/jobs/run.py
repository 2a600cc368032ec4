"""``metakd run``: one experiment in-process (or on a local Ray instance) and its accuracy table."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pandas as pd

from ..report import analysis, results
from ..config import ConfigError, ExperimentConfig, SearchConfig, TrackingConfig, content_hash
from ..storage import Store
from . import cache as artifact_cache
from .experiment import LocalRunner, run_experiment
from .registry import LocalRegistry
from ..report.rows import curve_rows, result_rows, running_metrics


def run_local(cfg: ExperimentConfig, root: str | None = None, use_ray: bool = False, log=print,
              trackers: TrackingConfig | None = None, cache: str | None = None) -> dict:
    """Run ``cfg``; returns the run dict. Results, curves and events go under ``root`` (default
    ``<output_dir>/<name>``), the artifacts (prepared data, teachers, students) into ``cache``: by
    default, with the default ``root``, the cache ``<output_dir>/cache`` that every run there shares
    (:mod:`metakd.jobs.cache`); with a ``root`` given, ``root`` itself (a self-contained directory).
    ``trackers``: the experiment trackers to log to (``metakd run --tracking``)."""
    from .. import tracking

    if root is None:
        if cfg.name == artifact_cache.DIR:
            raise ConfigError(f"name: '{cfg.name}' is the artifact cache's directory under output_dir; pick another")
        root = str(Path(cfg.output_dir) / cfg.name)
        cache = cache or artifact_cache.cache_root(cfg.output_dir)
    events = Store(root)
    store = Store(cache) if cache else events
    if cache:
        artifact_cache.link(events, store, log)
    config = run_part(cfg)
    resolved = tracking.resolve(trackers or TrackingConfig(), cfg.name, str(Path(root).resolve()), "--tracking")
    tracked, run_log = tracking.open_run(resolved, cfg.name, config, log)
    if use_ray:
        import ray

        from .ray_runner import RayRunner
        from .registry import ray_registry

        if not ray.is_initialized():
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
        search = cfg.search or SearchConfig()
        runner = RayRunner(search.resources, str(events.local_root / "ray"), search.max_failures)
        # Train workers are other processes: they reach the registry through a (run-scoped) actor
        registry = ray_registry(f"run-{cfg.name}-{uuid.uuid4().hex[:8]}", "run", detached=False)
    else:
        runner, registry = LocalRunner(), LocalRegistry()
    try:
        out = run_experiment(cfg, store, registry, runner, log, tracking=tracked, events=events)
    except BaseException:
        if run_log is not None:
            run_log.close(ok=False)
        raise
    finally:
        registry.close()
    if run_log is not None:
        run_log.close(running_metrics(out["students"], cfg.methods), ok=True)
    # One part per (configuration, seed), as a sweep has one per configuration: a rerun with another seed
    # or another setting under the same name adds its rows, a rerun of the same replaces only its own.
    out["rows"] = result_rows(cfg, cfg.name, config, out["students"])
    curves = curve_rows(cfg.name, config, out["students"], out["teachers_trained"])
    for seed in cfg.seeds:
        results.write_part(root, [r for r in out["rows"] if r["seed"] == seed], f"{config}-seed{seed}")
        results.write_part(root, [r for r in curves if r["seed"] == seed], f"{config}-seed{seed}", "curves")
    out["root"], out["cache"] = root, store.root
    out["parts"] = [f"{config}-seed{seed}" for seed in cfg.seeds]
    return out


def run_part(cfg: ExperimentConfig) -> str:
    """``cfg-<hash>`` of everything in ``cfg`` that shapes its rows (not its name, seeds or output_dir).

    Also the rows' ``trial_id``, as a sweep's rows carry their trial's: it tells the configurations
    run under one name apart in the results table.
    """
    identity = {k: v for k, v in cfg.to_dict().items() if k not in ("name", "seeds", "output_dir", "search")}
    return f"cfg-{content_hash(identity)}"


def format_table(rows: list[dict], split: str = "test") -> str:
    table = analysis.pivot_main_table(analysis.main_table(pd.DataFrame(rows), split=split))
    return f"{split} accuracy (%), mean ± std over seeds\n" + table.to_string()


def run_and_report(cfg: ExperimentConfig, use_ray: bool = False, trackers: TrackingConfig | None = None) -> int:
    start = time.perf_counter()
    print(f"metakd run '{cfg.name}': methods {', '.join(cfg.methods)}; seeds {cfg.seeds}; "
          f"teacher {cfg.teacher.label()}, student {cfg.student.label()}", flush=True)
    out = run_local(cfg, use_ray=use_ray, trackers=trackers)
    print()
    print(format_table(out["rows"], "dev"))
    print()
    print(format_table(out["rows"], "test"))
    collapsed = analysis.describe_collapsed(pd.DataFrame(out["rows"]))
    if collapsed:
        print(f"\n{collapsed}")
    print(f"\n{len(out['students'])} students, {len(out['teachers_trained'])} teachers trained, "
          f"{time.perf_counter() - start:.0f}s; results in {out['root']}/results/")
    return 0

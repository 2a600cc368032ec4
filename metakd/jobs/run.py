"""``metakd run``: one experiment in-process (or on a local Ray instance) and its accuracy table."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pandas as pd

from ..report import analysis, results
from ..config import ExperimentConfig
from ..storage import Store
from .experiment import LocalRegistry, LocalRunner, run_experiment
from ..report.rows import curve_rows, result_rows


def run_local(cfg: ExperimentConfig, root: str | None = None, use_ray: bool = False, log=print) -> dict:
    """Run ``cfg`` with its artifacts under ``root`` (default ``<output_dir>/<name>``); returns the run dict."""
    root = root or str(Path(cfg.output_dir) / cfg.name)
    store = Store(root)
    if use_ray:
        import ray

        from .ray_runner import RayRunner
        from .registry import ray_registry

        if not ray.is_initialized():
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
        runner = RayRunner(cfg.search.resources if cfg.search else _default_resources(), str(store.local_root / "ray"))
        # Train workers are other processes: they reach the registry through a (run-scoped) actor
        registry = ray_registry(f"run-{cfg.name}-{uuid.uuid4().hex[:8]}", "run", detached=False)
    else:
        runner, registry = LocalRunner(), LocalRegistry()
    try:
        out = run_experiment(cfg, store, registry, runner, log)
    finally:
        registry.close()
    out["rows"] = result_rows(cfg, cfg.name, "run", out["students"])
    results.write_part(root, out["rows"], "run")
    results.write_part(root, curve_rows(cfg.name, "run", out["students"], out["teachers_trained"]), "run", "curves")
    out["root"] = root
    return out


def _default_resources():
    from ..config import ResourcesConfig

    return ResourcesConfig()


def format_table(rows: list[dict], split: str = "test") -> str:
    table = analysis.pivot_main_table(analysis.main_table(pd.DataFrame(rows), split=split))
    return f"{split} accuracy (%), mean ± std over seeds\n" + table.to_string()


def run_and_report(cfg: ExperimentConfig, use_ray: bool = False) -> int:
    start = time.perf_counter()
    print(f"metakd run '{cfg.name}': methods {', '.join(cfg.methods)}; seeds {cfg.seeds}; "
          f"teacher {cfg.teacher.label()}, student {cfg.student.label()}", flush=True)
    out = run_local(cfg, use_ray=use_ray)
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

"""MLflow artifacts at the end of a sweep: each trial's results and curves Parquet parts, and the
exported best student of each (method, domain). Lives in the sweep layer because it exports students
(``metakd.export``), which the trackers' own module, imported by the workers, may not import."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from typing import Any

from ..export.cli import cmd_export
from ..export.select import choose
from ..report import results
from ..tracking import find_runs


def log_sweep_artifacts(trackers: dict[str, Any], root: str, sweep: str, students_kept: bool, log=print) -> None:
    """MLflow, at the end of a sweep: each trial's results and curves Parquet parts, and the exported best
    student of each (method, domain) (``metakd export --best``) when students are kept, as artifacts of
    the trial runs. What cannot be logged is said and skipped."""
    if "mlflow" not in trackers:
        return
    from mlflow.tracking import MlflowClient


    s = trackers["mlflow"]
    client = MlflowClient(s.tracking_uri)
    experiment = client.get_experiment_by_name(s.experiment)

    def trial_run(trial_id: str) -> str | None:
        runs = [r for r in find_runs(client, experiment.experiment_id, sweep, trial_id=trial_id)
                if "training" not in r.data.tags]
        return runs[0].info.run_id if runs else None

    try:
        df = results.load(root)
    except (FileNotFoundError, ValueError):
        log("tracking: no results to log to MLflow")
        return
    logged = 0
    for kind in ("results", "curves"):
        for path in sorted(_local_files(f"{root}/{kind}")):
            try:
                ids = results.load(path, table=kind)["trial_id"].dropna().astype(str).unique()
            except Exception:  # noqa: BLE001 - an unreadable part is left out
                continue
            for trial_id in ids:
                run = trial_run(trial_id)
                if run is not None:
                    client.log_artifact(run, path, kind)
                    logged += 1
    exported = 0
    if students_kept:
        ok = df[(df["status"] == "ok") & (df["split"] == "dev")]
        for method, domain in sorted(set(zip(ok["method"], ok["domain"]))):
            try:
                choice = choose(df, method, domain)
                run = trial_run(choice.trial_id)
                if run is None:
                    continue
                with tempfile.TemporaryDirectory(prefix="metakd-export-") as d:
                    out = f"{d}/{method}-{domain}"
                    _export(root, out, method, domain, choice.trial_id)
                    client.log_artifacts(run, out, f"best_student/{method}-{domain}")
                    exported += 1
            except Exception as e:  # noqa: BLE001 - the sweep's results stand without the artifact
                log(f"tracking: best {method} student for {domain} not logged to MLflow: {type(e).__name__}: {e}")
    log(f"tracking: {logged} Parquet part(s) and {exported} best student(s) logged to MLflow ({s.tracking_uri}, "
        f"experiment {s.experiment})")


def _local_files(directory: str) -> list[str]:
    return [os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".parquet") and ".tmp-" not in f] \
        if os.path.isdir(directory) else []


def _export(root: str, out: str, method: str, domain: str, trial_id: str) -> None:
    args = argparse.Namespace(path=root, out=out, method=method, domain=domain, trial=trial_id, best=False,
                              seed=None, teacher=None, write_split=None)
    with contextlib.redirect_stdout(io.StringIO()):
        cmd_export(args)

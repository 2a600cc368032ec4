"""``metakd cost PATH``: what a sweep (or a ``metakd run``) spent, from its event files
(``metakd.jobs.events``: the command reads them and hands them here), during the sweep or after it.

A training's device-hours are ``(end - start) x world_size x gpu_share`` / 3600: every DDP rank
holds a device (or a CPU worker) for the whole training, and a student on a quarter of a GPU
holds a quarter. (Events written before ``gpu_share`` was recorded count a whole device.)

- by phase (teachers, students), by method (a teacher counts for the method that distils from
  its kind) and by trial (a teacher for the trial whose run trained it);
- served from the cache: of the teachers and student jobs the sweep's results use, the share it
  did not train itself (another sweep or an earlier run had);
- utilisation: busy device-seconds / (slots x span from the first start to the last end), slots
  being ``--slots`` or else the most devices the sweep held at once;
- the meta-teacher's cost spread over the K target-domain students it serves, against the K
  single-domain teachers kd_single needs for the same K students (the compute-fair comparison).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pandas as pd

from ..methods import METHODS

# the method that distils from a teacher kind (one each)
KIND_METHOD = {m.teacher: m.name for m in METHODS.values() if m.teacher is not None}


def device_hours(event: dict) -> float:
    return (event["end"] - event["start"]) * event.get("world_size", 1) * event.get("gpu_share", 1.0) / 3600


def trial_of(event: dict) -> str:
    """The trial that trained it: a student's ``trial_id``, else its run id less ``-<phase>-<n>``."""
    if event.get("trial_id"):
        return str(event["trial_id"])
    run = str(event.get("run", "?"))
    parts = run.rsplit("-", 2)
    return parts[0] if len(parts) == 3 and parts[2].isdigit() else run


@dataclass
class Cost:
    tables: dict[str, pd.DataFrame]  # section -> table
    notes: list[str]


def events_frame(teachers: list[dict], students: list[dict]) -> pd.DataFrame:
    """One row per training event: phase, key, method, trial, device_hours, start, end, ..."""
    rows = []
    for phase, events in (("teachers", teachers), ("students", students)):
        for e in events:
            method = e.get("method") if phase == "students" else KIND_METHOD.get(e.get("kind"), e.get("kind"))
            rows.append({"phase": phase, "key": e["key"], "kind": e.get("kind"), "method": method,
                         "domain": e.get("domain"), "seed": e.get("seed"), "trial": trial_of(e),
                         "teacher_key": e.get("teacher_key"), "start": e["start"], "end": e["end"],
                         "devices": e.get("world_size", 1) * e.get("gpu_share", 1.0),
                         "device_hours": device_hours(e)})
    columns = ["phase", "key", "kind", "method", "domain", "seed", "trial", "teacher_key", "start", "end", "devices",
               "device_hours"]
    return pd.DataFrame(rows, columns=columns)


def peak_devices(df: pd.DataFrame) -> float:
    """The most devices held at once (a sweep over the trainings' intervals)."""
    points = sorted([(s, d) for s, d in zip(df["start"], df["devices"])]
                    + [(e, -d) for e, d in zip(df["end"], df["devices"])], key=lambda p: (p[0], p[1]))
    held = peak = 0.0
    for _, d in points:
        held += d
        peak = max(peak, held)
    return peak


def sweep_cost(teachers: list[dict], students: list[dict], rows: pd.DataFrame | None = None,
               slots: float | None = None) -> Cost:
    """The cost tables of a sweep (or run) from its ``teachers`` and ``students`` training events
    and its result ``rows`` (None: none written yet); see the module doc."""
    df = events_frame(teachers, students)
    if df.empty:
        raise FileNotFoundError("no training events (events/teacher_trained/, events/student_trained/)")
    notes: list[str] = []
    tables = {}

    def summary(by: list[str]) -> pd.DataFrame:
        g = df.groupby(by, dropna=False)
        return g.agg(trainings=("key", "size"), device_hours=("device_hours", "sum")).reset_index()

    phase = summary(["phase"]).set_index("phase").reindex(["teachers", "students"]).dropna().reset_index()
    phase["trainings"] = phase["trainings"].astype(int)
    phase = pd.concat([phase, pd.DataFrame([{"phase": "total", "trainings": len(df),
                                             "device_hours": df["device_hours"].sum()}])], ignore_index=True)
    tables["by phase"] = phase
    method = df.pivot_table(index="method", columns="phase", values="device_hours", aggfunc="sum", fill_value=0.0)
    method = method.reindex(columns=["teachers", "students"], fill_value=0.0)
    method["total"] = method.sum(axis=1)
    tables["by method (device-hours)"] = method.reset_index()
    trial = df.pivot_table(index="trial", columns="phase", values="device_hours", aggfunc="sum", fill_value=0.0)
    trial = trial.reindex(columns=["teachers", "students"], fill_value=0.0)
    trial["total"] = trial.sum(axis=1)
    tables["by trial (device-hours)"] = trial.reset_index()

    tables["served from the cache"] = _served(rows, df, notes)

    span = df["end"].max() - df["start"].min()
    busy = (df["device_hours"].sum() * 3600)
    peak = peak_devices(df)
    used_slots = slots or peak
    tables["utilisation"] = pd.DataFrame([{
        "span_hours": span / 3600, "busy_device_hours": busy / 3600, "mean_devices_busy": busy / span if span else 0.0,
        "peak_devices_busy": peak, "slots": used_slots,
        "utilisation": busy / (used_slots * span) if span and used_slots else float("nan")}])
    if slots is None:
        notes.append("slots: the most devices busy at once (give --slots for the cluster's)")

    meta = _meta_vs_single(df)
    if meta is not None:
        tables["meta-teacher vs single-domain teachers"] = meta
    return Cost(tables, notes)


def _served(rows: pd.DataFrame | None, df: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    if rows is None:
        notes.append("no results yet: the share served from the cache counts the trainings so far only")
        rows = pd.DataFrame(columns=["status", "teacher_key", "student_key"])
    ok = rows[rows["status"] == "ok"] if "status" in rows else rows
    out = []
    for phase, column in (("teachers", "teacher_key"), ("students", "student_key")):
        trained = set(df.loc[df["phase"] == phase, "key"])
        used = set(ok[column].dropna()) if column in ok else set()
        used |= trained
        served = used - trained
        out.append({"phase": phase, "needed": len(used), "trained_here": len(used & trained), "from_cache": len(served),
                    "share_from_cache": len(served) / len(used) if used else float("nan")})
    return pd.DataFrame(out)


def _meta_vs_single(df: pd.DataFrame) -> pd.DataFrame | None:
    """Per seed: the meta-teacher's device-hours over the K students it serves, against the K
    single-domain teachers (kd_single) of those K target domains."""
    teachers = df[df["phase"] == "teachers"]
    meta = teachers[teachers["kind"] == "meta"]
    if meta.empty:
        return None
    single = teachers[teachers["kind"] == "single"]
    students = df[df["phase"] == "students"]
    rows = []
    for seed, m in meta.groupby("seed"):
        k = int(students.loc[students["teacher_key"].isin(m["key"]), "domain"].nunique()) or None
        served = int(students["teacher_key"].isin(m["key"]).sum())
        s = single[single["seed"] == seed]
        meta_h = m["device_hours"].sum() / len(m)  # per meta-teacher (one per configuration of it)
        rows.append({"seed": seed, "meta_teachers": len(m), "meta_device_hours": meta_h, "K": k,
                     "meta_per_target_domain": meta_h / k if k else float("nan"),
                     "students_served": served,
                     "single_teachers": len(s), "single_device_hours": s["device_hours"].sum(),
                     "single_per_target_domain": s["device_hours"].mean() if len(s) else float("nan"),
                     "meta_over_single": meta_h / s["device_hours"].sum() if len(s) else float("nan")})
    return pd.DataFrame(rows)


def format_cost(cost: Cost, fmt: str = "markdown") -> str:
    """Markdown: one table per section; CSV: one long table (section, then the section's columns)."""
    if fmt == "csv":
        frames = [t.assign(section=name)[["section", *t.columns]] for name, t in cost.tables.items()]
        buf = io.StringIO()
        pd.concat(frames, ignore_index=True).to_csv(buf, index=False, float_format="%.6g")
        return buf.getvalue()
    from .cli import to_markdown

    parts = []
    for name, table in cost.tables.items():
        shown = table.map(lambda v: f"{v:.4g}" if isinstance(v, float) else v)
        parts.append(f"### {name}\n\n" + to_markdown(shown.set_index(shown.columns[0])).rstrip())
    parts += [f"note: {n}" for n in cost.notes]
    return "\n\n".join(parts) + "\n"

"""Rows of the result tables (``metakd.report.results`` schemas) from a trial's student and teacher summaries."""

from __future__ import annotations

import json

from ..config import ExperimentConfig

# Accuracies and majority rates are both count / n of the same split; this only absorbs rounding.
_COLLAPSE_TOLERANCE = 1e-9


def is_collapsed(student: dict) -> bool | None:
    """A student collapsed when its final dev accuracy is at or below its dev split's majority rate.

    ``None`` when the summary lacks either number (a failed job, or one from an older version).
    """
    acc, rate = student.get("dev_accuracy"), student.get("dev_majority_rate")
    if acc is None or rate is None:
        return None
    return bool(acc <= rate + _COLLAPSE_TOLERANCE)


def result_rows(cfg: ExperimentConfig, sweep: str, trial_id: str, students: list[dict],
                search_params: dict | None = None, status: str = "ok") -> list[dict]:
    """Rows of the results table (one per student and split) with the resolved config as flat columns."""
    t, s, mt, d = cfg.teacher, cfg.student, cfg.meta_teacher, cfg.distill
    common = {
        "sweep": sweep, "trial_id": trial_id, "status": status,
        "gamma1": mt.gamma1, "gamma2": d.gamma2, "sample_rate": cfg.data.sample_rate, "alpha": mt.alpha,
        "temperature": d.temperature, "prototype": mt.prototype, "tda_target": mt.tda_target,
        "schedule": d.schedule, "pred_loss": d.pred_loss,
        "student": s.label() if s.prune is not None else s.preset or s.checkpoint or "custom", "teacher": t.label(),
        "teacher_epochs": t.epochs, "teacher_lr": t.lr, "stage1_epochs": d.stage1_epochs,
        "stage2_epochs": d.stage2_epochs, "stage1_lr": d.stage1_lr, "stage2_lr": d.stage2_lr,
        "dataset": cfg.data.path or cfg.data.source,
        "search_params": json.dumps(search_params or {}, sort_keys=True, default=str),
        "config_json": json.dumps(cfg.to_dict(), sort_keys=True, default=str),
        **_prune_columns(s.prune),
    }
    copied = ("seed", "method", "domain", "teacher_key", "train_seconds", "student_params", "teacher_params",
              "student_layers", "student_hidden", "student_heads", "student_intermediate",
              "latency_ms_b1", "latency_ms_b32", "latency_precision", "latency_warmup", "latency_repeats_b1",
              "latency_repeats_b32", "latency_shared", "device", "student_key", "reused_from", "error",
              "prune_achieved", "encoder_remaining", "heads_kept", "ffn_kept")
    rows = []
    for r in students:
        for split in ("dev", "test"):
            # a job that failed on its own (out of memory) is a failed row among its trial's ok rows
            rows.append({**common, **{k: r.get(k) for k in copied}, "status": r.get("status") or status,
                         "split": split, "accuracy": r.get(f"{split}_accuracy"), "loss": r.get(f"{split}_loss"),
                         "majority_rate": r.get(f"{split}_majority_rate"), "collapsed": is_collapsed(r),
                         "latency_kind": r.get("latency_kind") or ("dense" if s.prune is None else None),
                         # a dense student's parameters are all nonzero: one x axis for dense and pruned
                         "student_nonzero_params": r.get("student_nonzero_params", r.get("student_params"))})
    return rows


def _prune_columns(prune) -> dict:
    """The configured prune block as flat columns (null for a dense student)."""
    if prune is None:
        return {}
    return {"prune_structure": prune.structure, "prune_criterion": prune.criterion, "prune_target": prune.sparsity,
            "prune_contrastive": "+".join(prune.contrastive) or "none"}


def curve_rows(sweep: str, trial_id: str, students: list[dict], teachers: list[dict]) -> list[dict]:
    rows = []
    for r in students:
        for p in r.get("curve", []):
            rows.append({"sweep": sweep, "trial_id": trial_id, "seed": r["seed"], "method": r["method"],
                         "domain": r["domain"], "teacher_key": r.get("teacher_key"), **p})
    for t in teachers:
        for p in t.get("curve", []):
            rows.append({"sweep": sweep, "trial_id": trial_id, "seed": t["seed"], "method": f"teacher:{t['kind']}",
                         "domain": t.get("domain") or "all", "teacher_key": t["key"], **p})
    return rows


def running_metrics(results: list[dict], methods: list[str]) -> dict:
    """Trial metrics so far: mean dev/test accuracy of the first method (all methods when it has none yet),
    of each method (``<method>/dev_accuracy``) and of each method on each domain
    (``<method>/<domain>/dev_accuracy``, mean over seeds), over the jobs that did not fail
    (``jobs_failed`` counts those)."""
    failed = [r for r in results if r.get("status", "ok") != "ok"]
    results = [r for r in results if r.get("status", "ok") == "ok"]
    primary = [r for r in results if r["method"] == methods[0]] or results
    out = {"jobs_done": len(results) + len(failed), "jobs_failed": len(failed)}
    for split in ("dev", "test"):
        out[f"{split}_accuracy"] = sum(r[f"{split}_accuracy"] for r in primary) / len(primary) if primary else 0.0
        for m in methods:
            rs = [r[f"{split}_accuracy"] for r in results if r["method"] == m]
            if rs:
                out[f"{m}/{split}_accuracy"] = sum(rs) / len(rs)
            for domain in sorted({r.get("domain") for r in results if r["method"] == m} - {None}):
                rs = [r[f"{split}_accuracy"] for r in results if r["method"] == m and r.get("domain") == domain]
                out[f"{m}/{domain}/{split}_accuracy"] = sum(rs) / len(rs)
    return out

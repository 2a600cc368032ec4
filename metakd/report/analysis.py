"""Tables of the paper from a sweep's results DataFrame (see ``metakd.report.results.load``).

Every function uses only ``status == "ok"`` rows of one split, averages accuracy over
everything that is not one of its keys within a seed (e.g. several trials with the same
seed and sample rate), and then reports over seeds: ``mean``, ``std`` (ddof=1, NaN for a
single seed) and ``count`` (number of seeds). Accuracies and improvement rates are
fractions; the plots and the CLI show them in %.

A student that several trials share (``student_key``; the copies carry ``reused_from``) is
one student: within each cell it counts once, however many trials list it.

The ``"average"`` domain is the mean over domains within each seed, then mean/std over
seeds. Only seeds that have every domain of their group enter it, so an unfinished seed
cannot pull the average towards the domains it happens to have.

Collapsed students (``collapsed`` column: dev accuracy at or below the majority-class rate
of the domain's dev split) are kept unless a function is called with
``exclude_collapsed=True``; either way its output's ``attrs`` say how many of the rows it
read were flagged (``collapsed``) and how many were left out (``excluded``).
"""

from __future__ import annotations

import json
import math
import numbers

import numpy as np
import pandas as pd

from ..methods import METHOD_NAMES as METHODS  # table order: the baselines, then Meta-KD

AVERAGE = "average"
COLLAPSED = "collapsed"
_BASE_COLUMNS = ("status", "split", "method", "domain", "seed", "accuracy")


# ---------------------------------------------------------------- selection and grouping


def _usable(
    df: pd.DataFrame, split: str, columns: tuple[str, ...], what: str, exclude_collapsed: bool = False
) -> tuple[pd.DataFrame, dict]:
    """The ``status == "ok"`` rows of ``split`` with an accuracy, and the collapse counts.

    Returns ``(rows, {"collapsed": flagged rows among them, "excluded": rows left out})``;
    ValueError naming what lacks.
    """
    missing = [c for c in (*_BASE_COLUMNS, *columns) if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: the results table lacks column(s) {missing}")
    ok = df[_equals(df["status"], "ok")]
    rows = ok[_equals(ok["split"], split) & ok["accuracy"].notna()]
    if rows.empty:
        present = sorted(ok["split"].dropna().astype(str).unique())
        raise ValueError(
            f"{what}: no status='ok' rows with an accuracy on split {split!r} (splits present: {present})"
        )
    if COLLAPSED not in rows.columns:
        if exclude_collapsed:
            raise ValueError(f"{what}: exclude_collapsed needs a {COLLAPSED!r} column, which the table lacks")
        return rows, {"collapsed": 0, "excluded": 0}
    flagged = _equals(rows[COLLAPSED], True)
    counts = {"collapsed": int(flagged.sum()), "excluded": int(flagged.sum()) if exclude_collapsed else 0}
    if exclude_collapsed:
        rows = rows[~flagged]
        if rows.empty:
            raise ValueError(f"{what}: every row on split {split!r} is a collapsed student (exclude_collapsed)")
    return rows, counts


def _equals(col: pd.Series, value) -> pd.Series:
    # Nullable string columns compare to <NA>; a mask must be plain bool.
    return (col == value).fillna(False).astype(bool)


def _method_rows(rows: pd.DataFrame, method: str, message: str) -> pd.DataFrame:
    out = rows[_equals(rows["method"], method)]
    if out.empty:
        present = sorted(rows["method"].dropna().astype(str).unique())
        raise ValueError(f"{message} (methods present: {present})")
    return out


def _require_values(rows: pd.DataFrame, column: str, method: str) -> None:
    n = int(rows[column].isna().sum())
    if n:
        raise ValueError(f"column {column!r} is null in {n} {method} row(s); it is needed as the x axis")


def _per_seed(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean accuracy per ``keys`` + seed (averaging over every other column) as ``value``;
    each trained student counts once per group (:func:`_one_row_per_student`)."""
    rows = _one_row_per_student(rows, [*keys, "seed"])
    g = rows.groupby([*keys, "seed"], dropna=False, sort=True)["accuracy"].mean()
    return g.rename("value").reset_index()


def _one_row_per_student(rows: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """Within each ``group``, one row per ``student_key``: a student that several trials share
    (a baseline in a sweep over gamma2, reused instead of retrained: ``reused_from``) counts
    once, not once per trial. Rows without a key (tables written before keys) all count."""
    if "student_key" not in rows.columns:
        return rows
    keyed = rows["student_key"].notna()
    first = rows[keyed].drop_duplicates([*group, "student_key"])
    return pd.concat([first, rows[~keyed]]) if (~keyed).any() else first


def _over_seeds(per_seed: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """mean / std (ddof=1) / count of ``value`` over seeds, per ``keys``."""
    out = (
        per_seed.groupby(keys, dropna=False, sort=True)["value"]
        .agg(mean="mean", std="std", count="count")
        .reset_index()
    )
    out["count"] = out["count"].astype("int64")
    return out


def _domain_average_per_seed(per_seed: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per ``keys`` + seed, the mean of ``value`` over domains (seeds with every domain only)."""
    per_seed = per_seed.assign(
        n_all=per_seed.groupby(keys, dropna=False)["domain"].transform("nunique")
    )
    per = (
        per_seed.groupby([*keys, "seed"], dropna=False, sort=True)
        .agg(value=("value", "mean"), n=("domain", "nunique"), n_all=("n_all", "first"))
        .reset_index()
    )
    return per[per["n"] == per["n_all"]].drop(columns=["n", "n_all"])


def _with_average(per_seed: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per ``keys`` + domain over seeds, plus domain ``"average"`` (see the module doc)."""
    by_domain = _over_seeds(per_seed, [*keys, "domain"])
    avg = _over_seeds(_domain_average_per_seed(per_seed, keys), keys)
    avg.insert(len(keys), "domain", AVERAGE)
    return _order(pd.concat([by_domain, avg], ignore_index=True), [*keys, "domain"])


def _order(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Sort with methods in the paper's order and the ``"average"`` domain last."""

    def key(col: pd.Series) -> pd.Series:
        if col.name == "method":
            return col.map(lambda m: f"{METHODS.index(m):02d}" if m in METHODS else f"99{m}")
        if col.name == "domain":
            return col.map(lambda d: f"1{d}" if d == AVERAGE else f"0{d}")
        return col

    return df.sort_values(by, key=key, kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------- the paper's tables


def main_table(df: pd.DataFrame, split: str = "test", exclude_collapsed: bool = False) -> pd.DataFrame:
    """Accuracy per method and domain, plus domain ``"average"``, as in the main tables.

    Long form: columns method, domain, mean, std, count. ``pivot_main_table`` makes it wide.
    """
    rows, flags = _usable(df, split, (), "main table", exclude_collapsed)
    per_seed = _per_seed(rows, ["method", "domain"])
    out = _with_average(per_seed, ["method"])
    out.attrs.update(split=split, **flags)
    return out


def pivot_main_table(
    long: pd.DataFrame, value: str = "cell", percent: bool = True, digits: int = 2
) -> pd.DataFrame:
    """Wide form of ``main_table``: one row per method, one column per domain + average.

    ``value`` is ``"mean"``, ``"std"``, ``"count"`` (numbers) or ``"cell"``: the text
    ``"mean ± std"`` (just ``"mean"`` for a single seed, ``"-"`` where a method lacks a domain).
    ``percent`` multiplies mean and std by 100.
    """
    if value not in ("cell", "mean", "std", "count"):
        raise ValueError(f"value must be 'cell', 'mean', 'std' or 'count', got {value!r}")
    missing = [c for c in ("method", "domain", "mean", "std", "count") if c not in long.columns]
    if missing:
        raise ValueError(f"pivot_main_table needs main_table's output; lacks column(s) {missing}")
    scale = 100.0 if percent else 1.0
    long = long.assign(mean=long["mean"] * scale, std=long["std"] * scale)
    if value == "cell":
        long = long.assign(cell=[_cell(m, s, digits) for m, s in zip(long["mean"], long["std"])])
    methods = list(dict.fromkeys(long["method"]))
    domains = list(dict.fromkeys(d for d in long["domain"] if d != AVERAGE))
    domains += [AVERAGE] if (long["domain"] == AVERAGE).any() else []
    wide = long.pivot(index="method", columns="domain", values=value).reindex(index=methods, columns=domains)
    wide.columns.name = None
    if value == "cell":
        wide = wide.astype(object).where(wide.notna(), "-")
    return wide


def _cell(mean: float, std: float, digits: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def improvement_vs_sample_rate(
    df: pd.DataFrame, method: str = "metakd", baseline: str = "kd_single", split: str = "test",
    exclude_collapsed: bool = False,
) -> pd.DataFrame:
    """Figure 3: improvement rate (acc_method - acc_baseline) / acc_baseline per sample rate.

    Paired by seed: per (sample_rate, domain, seed) each method's accuracy is averaged over
    all other columns, the rate is taken on that pair, and then mean/std/count over seeds
    (columns sample_rate, domain, mean, std, count; rates are fractions). Domain
    ``"average"`` averages the per-domain rates within each seed first.
    """
    what = f"improvement of {method} over {baseline}"
    rows, flags = _usable(df, split, ("sample_rate",), what, exclude_collapsed)
    ours = _method_rows(rows, method, f"no {method} rows (status='ok', split={split!r}) to compare")
    base = _method_rows(rows, baseline, f"no {baseline} rows (status='ok', split={split!r}) to compare with")
    _require_values(ours, "sample_rate", method)
    _require_values(base, "sample_rate", baseline)
    keys = ["sample_rate", "domain"]
    paired = _per_seed(ours, keys).merge(_per_seed(base, keys), on=[*keys, "seed"], suffixes=("_m", "_b"))
    if paired.empty:
        raise ValueError(f"{what}: no (sample_rate, domain, seed) has both {method} and {baseline} rows")
    paired["value"] = (paired["value_m"] - paired["value_b"]) / paired["value_b"]
    out = _with_average(paired[[*keys, "seed", "value"]], ["sample_rate"])
    out.attrs.update(method=method, baseline=baseline, split=split, **flags)
    return out


def accuracy_vs_gamma2(
    df: pd.DataFrame, method: str = "metakd", split: str = "test", exclude_collapsed: bool = False
) -> pd.DataFrame:
    """Figure 4: accuracy per gamma2 and domain plus ``"average"``.

    Columns gamma2, domain, mean, std, count (accuracy as a fraction).
    """
    rows, flags = _usable(df, split, ("gamma2",), "accuracy vs gamma2", exclude_collapsed)
    ours = _method_rows(
        rows, method, f"no {method} rows (status='ok', split={split!r}) to plot against gamma2"
    )
    _require_values(ours, "gamma2", method)
    out = _with_average(_per_seed(ours, ["gamma2", "domain"]), ["gamma2"])
    out.attrs.update(method=method, split=split, **flags)
    return out


_SIZE_KEYS = ["student", "student_layers", "student_hidden"]


def student_size_table(
    df: pd.DataFrame, method: str = "metakd", split: str = "test", exclude_collapsed: bool = False
) -> pd.DataFrame:
    """Accuracy (domain average, over seeds) and size/latency per student, sorted by nonzero parameters.

    Columns student, student_layers, student_hidden, label (e.g. "bert-mini (4L-256)", "pruned movement
    0.9 +prc+snc+fic (6L-384)"), mean, std, count, student_params, student_nonzero_params (a dense student's
    is its student_params), latency_ms_b1, latency_ms_b32 (latencies: mean over rows), kind (dense, or the
    prune structure), latency_kind. Dense and pruned students share the x axis student_nonzero_params.
    """
    extra = ("student_params", "latency_ms_b1", "latency_ms_b32")
    rows, flags = _usable(df, split, (*_SIZE_KEYS, *extra), "student size table", exclude_collapsed)
    ours = _method_rows(rows, method, f"no {method} rows (status='ok', split={split!r}) for the size table")
    nonzero = ours["student_nonzero_params"] if "student_nonzero_params" in ours else pd.Series(np.nan, ours.index)
    structure = ours["prune_structure"] if "prune_structure" in ours else pd.Series(None, ours.index, dtype=object)
    kind_of_latency = ours["latency_kind"] if "latency_kind" in ours else pd.Series(None, ours.index, dtype=object)
    ours = ours.assign(student_nonzero_params=nonzero.fillna(ours["student_params"]).astype(float),
                       kind=structure.astype(object).where(structure.notna(), "dense"),
                       latency_kind=kind_of_latency.astype(object).where(kind_of_latency.notna(), "dense"))
    per_seed = _per_seed(ours, [*_SIZE_KEYS, "domain"])
    acc = _over_seeds(_domain_average_per_seed(per_seed, _SIZE_KEYS), _SIZE_KEYS)
    sizes = (
        ours.groupby(_SIZE_KEYS, dropna=False)
        .agg(
            student_params=("student_params", "median"),
            student_nonzero_params=("student_nonzero_params", "median"),
            latency_ms_b1=("latency_ms_b1", "mean"),
            latency_ms_b32=("latency_ms_b32", "mean"),
            kind=("kind", "first"),
            latency_kind=("latency_kind", "first"),
        )
        .reset_index()
    )
    out = acc.merge(sizes, on=_SIZE_KEYS, how="left")
    out.insert(3, "label", [_student_label(*r) for r in out[_SIZE_KEYS].itertuples(index=False)])
    out = out.sort_values("student_nonzero_params", na_position="last", kind="stable").reset_index(drop=True)
    out.attrs.update(method=method, split=split, **flags)
    return out


def _student_label(name, layers, hidden) -> str:
    shape = f"{layers}L-{hidden}" if not (pd.isna(layers) or pd.isna(hidden)) else None
    name = None if pd.isna(name) else str(name)
    if name and shape:
        return f"{name} ({shape})"
    return name or shape or "?"


# ---------------------------------------------------------------- collapsed students


def collapsed_students(df: pd.DataFrame) -> pd.DataFrame:
    """The flagged students: ``status == "ok"`` dev rows with ``collapsed`` true.

    Columns trial_id, seed, method, domain, accuracy (dev), majority_rate (dev), as fractions.
    """
    if COLLAPSED not in df.columns:
        return pd.DataFrame(columns=["trial_id", "seed", "method", "domain", "accuracy", "majority_rate"])
    rows = df[_equals(df["status"], "ok") & _equals(df["split"], "dev") & _equals(df[COLLAPSED], True)]
    cols = [c for c in ("trial_id", "seed", "method", "domain", "accuracy", "majority_rate") if c in rows.columns]
    return _order(rows[cols].drop_duplicates(), [c for c in ("method", "domain", "seed") if c in cols])


def describe_collapsed(df: pd.DataFrame, limit: int = 8) -> str | None:
    """One line naming the collapsed students (None when there are none), for run / sweep summaries."""
    flagged = collapsed_students(df)
    if flagged.empty:
        return None
    names = [
        f"{r.method}/{r.domain} seed {r.seed} ({100 * r.accuracy:.1f}% <= {100 * r.majority_rate:.1f}%)"
        for r in flagged.head(limit).itertuples(index=False)
    ]
    more = f", and {len(flagged) - limit} more" if len(flagged) > limit else ""
    return (f"{len(flagged)} collapsed student(s) (dev accuracy at or below the dev majority-class rate, "
            f"column 'collapsed'): " + ", ".join(names) + more)


# ---------------------------------------------------------------- paired comparisons

# What makes two rows "the same configuration": every flat config column of the results
# schema except the method and what follows from it (teacher_key, sizes, timings). Not
# trial_id: a configuration run by two trials (or a student another trial reused) is one
# configuration, averaged within its cell before pairing, so it is never counted twice.
PAIR_COLUMNS = (
    "sweep", "dataset", "sample_rate", "gamma1", "gamma2", "alpha", "temperature", "prototype", "tda_target",
    "schedule", "pred_loss", "student", "student_layers", "student_hidden", "student_heads",
    "student_intermediate", "teacher", "teacher_epochs", "teacher_lr", "stage1_epochs", "stage2_epochs",
    "stage1_lr", "stage2_lr", "search_params",
)
_TIE = 1e-9  # accuracies are fractions of a shared test set; closer than this is the same count


def compare_methods(
    df: pd.DataFrame,
    method: str = "metakd",
    baseline: str = "kd_single",
    split: str = "test",
    by: tuple[str, ...] | list[str] = (),
    confidence: float = 0.95,
    exclude_collapsed: bool = False,
) -> pd.DataFrame:
    """Paired difference ``method - baseline`` in accuracy points, per domain and the average.

    Pairing: a ``method`` row and a ``baseline`` row pair when they share seed, domain and
    every configuration column present (``PAIR_COLUMNS``; the method is what differs).
    Rows of one cell (several trials with the same configuration) are averaged first. Per
    (``by``, domain, seed) the differences of the paired configurations are averaged, giving
    one difference d_s per seed; domain ``"average"`` averages d over domains within a seed
    first (seeds with every domain only). Over the n seeds:

        diff = mean(d),  CI = diff -/+ t_{(1+confidence)/2, n-1} * sd(d) / sqrt(n)  (sd: ddof=1),
        p_value = two-sided paired t-test (``scipy.stats.ttest_1samp(d, 0)``),
        wins / ties / losses = seeds with d > 0 / d == 0 / d < 0.

    With n < 2 the interval and p-value are NaN and ``note`` says so; with n >= 2 equal
    differences the interval is the point and p is 0 (1 if they are all ties).
    Columns: *by, domain, n, method_mean, baseline_mean, diff, diff_std, ci_low, ci_high,
    p_value, wins, ties, losses, note (accuracies and differences in points, i.e. %).
    ``attrs``: method, baseline, split, confidence, collapsed, excluded, unpaired
    (method and baseline cells without a partner).
    """
    by = list(by)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if method == baseline:
        raise ValueError(f"method and baseline are both {method!r}; compare two different methods")
    what = f"comparison of {method} with {baseline}"
    rows, flags = _usable(df, split, tuple(by), what, exclude_collapsed)
    ours = _method_rows(rows, method, f"no {method} rows (status='ok', split={split!r}) to compare")
    base = _method_rows(rows, baseline, f"no {baseline} rows (status='ok', split={split!r}) to compare with")
    config = [c for c in PAIR_COLUMNS if c in rows.columns and c not in by]
    keys = [*by, "domain", "seed", *config]
    cells_m = ours.groupby(keys, dropna=False, sort=False)["accuracy"].mean().rename("value_m").reset_index()
    cells_b = base.groupby(keys, dropna=False, sort=False)["accuracy"].mean().rename("value_b").reset_index()
    paired = cells_m.merge(cells_b, on=keys, how="inner")
    unpaired = {method: len(cells_m) - len(paired), baseline: len(cells_b) - len(paired)}
    if paired.empty:
        raise ValueError(
            f"{what}: no (seed, domain, configuration) has both {method} and {baseline} rows on split {split!r}"
        )
    per_seed = paired.groupby([*by, "domain", "seed"], dropna=False, sort=True)[["value_m", "value_b"]].mean()
    per_seed = per_seed.reset_index()
    per_seed["value"] = per_seed["value_m"] - per_seed["value_b"]
    group = by or ["_all"]  # the domain average needs a group key
    per_seed_g = per_seed.assign(_all=0)
    averages = [
        _domain_average_per_seed(per_seed_g[[*group, "domain", "seed", col]].rename(columns={col: "value"}), group)
        .rename(columns={"value": col})
        for col in ("value_m", "value_b", "value")
    ]
    avg = averages[0].merge(averages[1], on=[*group, "seed"]).merge(averages[2], on=[*group, "seed"])
    avg = avg.drop(columns=["_all"], errors="ignore")
    avg.insert(len(by), "domain", AVERAGE)
    cells = pd.concat([per_seed, avg], ignore_index=True)
    out = pd.DataFrame(
        [
            {**dict(zip([*by, "domain"], group if isinstance(group, tuple) else (group,))),
             **_paired_stats(g["value_m"].to_numpy(), g["value_b"].to_numpy(), confidence)}
            for group, g in cells.groupby([*by, "domain"], dropna=False, sort=False)
        ]
    )
    out = _order(out, [*by, "domain"])
    out.attrs.update(method=method, baseline=baseline, split=split, confidence=confidence,
                     unpaired=unpaired, **flags)
    return out


def _paired_stats(m, b, confidence: float) -> dict:
    """Over seeds: means, paired difference, its t-interval and t-test p-value, W/T/L (in points)."""
    from scipy import stats

    d = (np.asarray(m, dtype=float) - np.asarray(b, dtype=float))
    n = len(d)
    out = {
        "n": n, "method_mean": 100 * float(np.mean(m)), "baseline_mean": 100 * float(np.mean(b)),
        "diff": 100 * float(np.mean(d)), "diff_std": float("nan"), "ci_low": float("nan"),
        "ci_high": float("nan"), "p_value": float("nan"),
        "wins": int((d > _TIE).sum()), "ties": int((np.abs(d) <= _TIE).sum()), "losses": int((d < -_TIE).sum()),
        "note": "",
    }
    if n < 2:
        out["note"] = f"{n} paired seed: no interval (needs 2 or more)"
        return out
    sd = float(np.std(d, ddof=1))
    out["diff_std"] = 100 * sd
    if sd <= _TIE:  # identical differences: the t statistic is +-inf (or 0/0 for all ties)
        out["ci_low"] = out["ci_high"] = out["diff"]
        out["p_value"] = 1.0 if out["ties"] == n else 0.0
        out["note"] = "every seed has the same difference"
        return out
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    out["ci_low"], out["ci_high"] = out["diff"] - 100 * half, out["diff"] + 100 * half
    out["p_value"] = float(stats.ttest_1samp(d, 0.0).pvalue)
    return out


def difference_cell(row, digits: int = 2) -> str:
    """``"+1.23 [-0.45, +2.91]"`` for a ``compare_methods`` row; ``"+1.23 (n=1)"`` without an interval."""
    if math.isnan(row["ci_low"]):
        return f"{row['diff']:+.{digits}f} (n={row['n']})"
    return f"{row['diff']:+.{digits}f} [{row['ci_low']:+.{digits}f}, {row['ci_high']:+.{digits}f}]"


# ---------------------------------------------------------------- Optuna sweeps


def search_summary(
    df: pd.DataFrame, metric_split: str = "dev", method: str = "metakd", top: int = 5,
    exclude_collapsed: bool = False, study=None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Best configurations and parameter importances of a searched sweep.

    Each trial's objective is its mean ``method`` accuracy on ``metric_split`` over domains
    and seeds. Returns ``(best_configs, importances)``: the ``top`` trials best-first
    (trial_id, accuracy, count, then one column per searched parameter) and
    (param, importance) from Optuna's fANOVA evaluator (seed 0; mean decrease in impurity if
    fANOVA is unavailable) over the parameters that vary: on ``study``, the sweep's own Optuna
    study (``metakd.sweep.study.load_study``; its objective is the sweep's ``search.metric``),
    when given with at least 2 complete trials, else on a study rebuilt from the rows
    (``importances.attrs["source"]`` says which).
    """
    rows, flags = _usable(df, metric_split, ("trial_id", "search_params"), "search summary", exclude_collapsed)
    ours = _method_rows(
        rows, method, f"no {method} rows (status='ok', split={metric_split!r}) to rank trials by"
    )
    cells = ours.groupby(["trial_id", "domain", "seed"], dropna=False)["accuracy"].mean().reset_index()
    per_trial = cells.groupby("trial_id").agg(accuracy=("accuracy", "mean"), count=("accuracy", "count"))
    if len(per_trial) < 2:
        raise ValueError(f"search summary needs at least 2 trials with {method} rows, found {len(per_trial)}")

    params = {
        tid: _parse_params(tid, ours.loc[_equals(ours["trial_id"], tid), "search_params"])
        for tid in per_trial.index
    }
    names = list(dict.fromkeys(k for p in params.values() for k in p))
    varying = [n for n in names if len({_hashable(p[n]) for p in params.values() if n in p}) >= 2]
    if not varying:
        raise ValueError(
            f"search summary: no searched parameter varies across the trials (search_params keys: {names})"
        )

    best = per_trial.reset_index()
    for n in names:
        best[n] = [params[t].get(n) for t in best["trial_id"]]
    best = best.sort_values("accuracy", ascending=False, kind="stable").head(top).reset_index(drop=True)

    distributions = {n: _distribution([p[n] for p in params.values() if n in p]) for n in varying}
    complete = [] if study is None else [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    values = [t.value for t in complete] if len(complete) >= 2 else per_trial["accuracy"].tolist()
    if len(set(values)) < 2:
        raise ValueError("search summary: every trial has the same objective value, so parameter importances are "
                         "undefined")
    if len(complete) >= 2:
        (importances, evaluator), source = _evaluate(study), "study"
    else:
        (importances, evaluator), source = _importances(per_trial["accuracy"], params, distributions), "rows"
    table = pd.DataFrame(sorted(importances.items(), key=lambda kv: -kv[1]), columns=["param", "importance"])
    table.attrs.update(evaluator=evaluator, source=source)
    best.attrs.update(method=method, split=metric_split, **flags)
    return best, table


def _parse_params(trial_id, values: pd.Series) -> dict:
    values = values.dropna()
    if values.empty:
        return {}
    try:
        parsed = json.loads(values.iloc[0])
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"trial {trial_id!r}: search_params is not JSON ({e})") from None
    if not isinstance(parsed, dict):
        kind = type(parsed).__name__
        raise ValueError(f"trial {trial_id!r}: search_params must be a JSON object, got {kind}")
    return parsed


def _hashable(v):
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _distribution(values: list):
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if all(_is_number(v) for v in values):
        lo, hi = float(min(values)), float(max(values))
        return FloatDistribution(lo, hi, log=lo > 0 and hi / lo >= 100)
    return CategoricalDistribution(sorted({_as_choice(v) for v in values}))


def _as_choice(v) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)


def _evaluate(study) -> tuple[dict, str]:
    """Parameter importances on ``study`` (fANOVA, seed 0; mean decrease in impurity without it)."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, MeanDecreaseImpurityImportanceEvaluator

    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))), \
            "fanova"
    except ImportError:
        evaluator = MeanDecreaseImpurityImportanceEvaluator(seed=0)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), "mean_decrease_impurity"


def _importances(values: pd.Series, params: dict, distributions: dict) -> tuple[dict, str]:
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.importance import FanovaImportanceEvaluator, MeanDecreaseImpurityImportanceEvaluator

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" on stdout
    try:
        study = optuna.create_study(direction="maximize")
        for tid, value in values.items():
            p = {
                n: float(params[tid][n]) if isinstance(d, FloatDistribution) else _as_choice(params[tid][n])
                for n, d in distributions.items()
                if n in params[tid]
            }
            study.add_trial(
                optuna.trial.create_trial(
                    params=p, distributions={n: distributions[n] for n in p}, value=float(value)
                )
            )
        try:
            evaluator, name = FanovaImportanceEvaluator(seed=0), "fanova"
            result = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except ImportError:  # fANOVA needs scikit-learn
            evaluator, name = MeanDecreaseImpurityImportanceEvaluator(seed=0), "mean_decrease_impurity"
            result = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except ImportError as e:
        raise ImportError(f"parameter importances need scikit-learn: {e}") from None
    finally:
        optuna.logging.set_verbosity(verbosity)
    if not result:
        raise ValueError(
            "search summary: no varying parameter is present in every trial, so importances are undefined"
        )
    return dict(result), name

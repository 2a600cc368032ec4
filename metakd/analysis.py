"""Tables of the paper from a sweep's results DataFrame (see ``metakd.results.load``).

Every function uses only ``status == "ok"`` rows of one split, averages accuracy over
everything that is not one of its keys within a seed (e.g. several trials with the same
seed and sample rate), and then reports over seeds: ``mean``, ``std`` (ddof=1, NaN for a
single seed) and ``count`` (number of seeds). Accuracies and improvement rates are
fractions; the plots and the CLI show them in %.

The ``"average"`` domain is the mean over domains within each seed, then mean/std over
seeds. Only seeds that have every domain of their group enter it, so an unfinished seed
cannot pull the average towards the domains it happens to have.
"""

from __future__ import annotations

import json
import math
import numbers

import pandas as pd

METHODS = ("student_ft", "kd_single", "kd_mix", "kd_mtl", "metakd_no_target", "metakd")
AVERAGE = "average"
_BASE_COLUMNS = ("status", "split", "method", "domain", "seed", "accuracy")


# ---------------------------------------------------------------- selection and grouping


def _usable(df: pd.DataFrame, split: str, columns: tuple[str, ...], what: str) -> pd.DataFrame:
    """The ``status == "ok"`` rows of ``split`` with an accuracy; ValueError naming what lacks."""
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
    return rows


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
    """Mean accuracy per ``keys`` + seed (averaging over every other column) as ``value``."""
    g = rows.groupby([*keys, "seed"], dropna=False, sort=True)["accuracy"].mean()
    return g.rename("value").reset_index()


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


def main_table(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Accuracy per method and domain, plus domain ``"average"``, as in the main tables.

    Long form: columns method, domain, mean, std, count. ``pivot_main_table`` makes it wide.
    """
    rows = _usable(df, split, (), "main table")
    per_seed = _per_seed(rows, ["method", "domain"])
    out = _with_average(per_seed, ["method"])
    out.attrs.update(split=split)
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
    df: pd.DataFrame, method: str = "metakd", baseline: str = "kd_single", split: str = "test"
) -> pd.DataFrame:
    """Figure 3: improvement rate (acc_method - acc_baseline) / acc_baseline per sample rate.

    Paired by seed: per (sample_rate, domain, seed) each method's accuracy is averaged over
    all other columns, the rate is taken on that pair, and then mean/std/count over seeds
    (columns sample_rate, domain, mean, std, count; rates are fractions). Domain
    ``"average"`` averages the per-domain rates within each seed first.
    """
    what = f"improvement of {method} over {baseline}"
    rows = _usable(df, split, ("sample_rate",), what)
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
    out.attrs.update(method=method, baseline=baseline, split=split)
    return out


def accuracy_vs_gamma2(df: pd.DataFrame, method: str = "metakd", split: str = "test") -> pd.DataFrame:
    """Figure 4: accuracy per gamma2 and domain plus ``"average"``.

    Columns gamma2, domain, mean, std, count (accuracy as a fraction).
    """
    rows = _usable(df, split, ("gamma2",), "accuracy vs gamma2")
    ours = _method_rows(
        rows, method, f"no {method} rows (status='ok', split={split!r}) to plot against gamma2"
    )
    _require_values(ours, "gamma2", method)
    out = _with_average(_per_seed(ours, ["gamma2", "domain"]), ["gamma2"])
    out.attrs.update(method=method, split=split)
    return out


_SIZE_KEYS = ["student", "student_layers", "student_hidden"]


def student_size_table(df: pd.DataFrame, method: str = "metakd", split: str = "test") -> pd.DataFrame:
    """Accuracy (domain average, over seeds) and size/latency per student, sorted by params.

    Columns student, student_layers, student_hidden, label (e.g. "bert-mini (4L-256)"),
    mean, std, count, student_params, latency_ms_b1, latency_ms_b32 (latencies: mean over rows).
    """
    extra = ("student_params", "latency_ms_b1", "latency_ms_b32")
    rows = _usable(df, split, (*_SIZE_KEYS, *extra), "student size table")
    ours = _method_rows(rows, method, f"no {method} rows (status='ok', split={split!r}) for the size table")
    per_seed = _per_seed(ours, [*_SIZE_KEYS, "domain"])
    acc = _over_seeds(_domain_average_per_seed(per_seed, _SIZE_KEYS), _SIZE_KEYS)
    sizes = (
        ours.groupby(_SIZE_KEYS, dropna=False)
        .agg(
            student_params=("student_params", "median"),
            latency_ms_b1=("latency_ms_b1", "mean"),
            latency_ms_b32=("latency_ms_b32", "mean"),
        )
        .reset_index()
    )
    out = acc.merge(sizes, on=_SIZE_KEYS, how="left")
    out.insert(3, "label", [_student_label(*r) for r in out[_SIZE_KEYS].itertuples(index=False)])
    out = out.sort_values("student_params", na_position="last", kind="stable").reset_index(drop=True)
    out.attrs.update(method=method, split=split)
    return out


def _student_label(name, layers, hidden) -> str:
    shape = f"{layers}L-{hidden}" if not (pd.isna(layers) or pd.isna(hidden)) else None
    name = None if pd.isna(name) else str(name)
    if name and shape:
        return f"{name} ({shape})"
    return name or shape or "?"


# ---------------------------------------------------------------- Optuna sweeps


def search_summary(
    df: pd.DataFrame, metric_split: str = "dev", method: str = "metakd", top: int = 5
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Best configurations and parameter importances of a searched sweep.

    Each trial's objective is its mean ``method`` accuracy on ``metric_split`` over domains
    and seeds. Returns ``(best_configs, importances)``: the ``top`` trials best-first
    (trial_id, accuracy, count, then one column per searched parameter) and
    (param, importance) from Optuna's fANOVA evaluator (seed 0; mean decrease in impurity if
    fANOVA is unavailable) on a study rebuilt from the trials, over the parameters that vary.
    """
    rows = _usable(df, metric_split, ("trial_id", "search_params"), "search summary")
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
    importances, evaluator = _importances(per_trial["accuracy"], params, distributions)
    table = pd.DataFrame(sorted(importances.items(), key=lambda kv: -kv[1]), columns=["param", "importance"])
    table.attrs.update(evaluator=evaluator)
    best.attrs.update(method=method, split=metric_split)
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

"""Which student to export: one (method, target domain) of a results table, a configuration, a seed.

A *configuration* is one resolved config (the ``config_json`` column, less the run bookkeeping
that does not change a student: ``name``, ``seeds``, ``output_dir``; every trial of a sweep with
the same searched values shares it, as do ``metakd run`` s of one config with other seeds); each of its seeds trained one student per (method,
domain), named by ``student_key``. With ``trial`` the configuration is that trial's; otherwise
(``best``) it is the one with the highest mean dev accuracy over seeds,

    mean_dev(c) = (1/|S_c|) sum_{s in S_c} dev_accuracy(c, s),

ties broken by more seeds, then by the first trial id. The seed is ``seed`` when given, else the
one whose dev accuracy is closest to mean_dev(c) (ties: the smallest seed), so the exported
student is a typical one of its configuration rather than its luckiest. Only ``status == "ok"``
dev rows count; a student that several trials list counts once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from .artifacts import ExportError


@dataclass(frozen=True)
class Choice:
    student_key: str
    method: str
    domain: str
    seed: int
    trial_id: str  # a trial of the configuration that lists this student
    search_params: dict
    config_json: str  # the resolved config, as the results table holds it (of the chosen student's row)
    configuration: str  # its configuration (:func:`configuration_key`): the rows of its other seeds share it
    dev_by_seed: dict[int, float]  # the configuration's dev accuracy per seed
    reason: str  # one line: why this configuration and this seed

    @property
    def config(self) -> dict:
        return json.loads(self.config_json)

    @property
    def dev_mean(self) -> float:
        return sum(self.dev_by_seed.values()) / len(self.dev_by_seed)


def configurations(df: pd.DataFrame, method: str, domain: str) -> pd.DataFrame:
    """One row per configuration with dev rows for (method, domain): configuration, search_params,
    first_trial, seeds (n), dev_mean; best first (the order ``choose`` picks from)."""
    rows = _dev_rows(df, method, domain)
    per_seed = (rows.groupby(["configuration", "seed"], sort=False)
                .agg(accuracy=("accuracy", "mean"), trial=("trial_id", "min"), params=("search_params", "first"))
                .reset_index())
    conf = (per_seed.groupby("configuration", sort=False)
            .agg(dev_mean=("accuracy", "mean"), seeds=("seed", "nunique"), first_trial=("trial", "min"),
                 search_params=("params", "first"))
            .reset_index())
    return conf.sort_values(["dev_mean", "seeds", "first_trial"], ascending=[False, False, True],
                            kind="mergesort").reset_index(drop=True)


def choose(df: pd.DataFrame, method: str, domain: str, trial: str | None = None,
           seed: int | None = None) -> Choice:
    """The student of (method, domain) to export: ``trial``'s configuration, else the best one
    (module doc); ``seed``, else the seed closest to the configuration's mean dev accuracy."""
    rows = _dev_rows(df, method, domain)
    confs = configurations(df, method, domain)
    if trial is not None:
        mine = rows[rows["trial_id"].astype(str) == str(trial)]
        if mine.empty:
            trials = sorted(rows["trial_id"].dropna().astype(str).unique())
            raise ExportError(f"--trial {trial}: no {method} row for domain {domain!r} in that trial; "
                              f"trials with one: {', '.join(trials)}")
        configuration = mine["configuration"].iloc[0]
        why = f"trial {trial}'s configuration"
    else:
        configuration = confs["configuration"].iloc[0]
        why = _best_reason(confs)
    conf_rows = rows[rows["configuration"] == configuration]
    by_seed = conf_rows.groupby("seed")["accuracy"].mean().sort_index()
    dev_by_seed = {int(s): float(a) for s, a in by_seed.items()}
    mean = sum(dev_by_seed.values()) / len(dev_by_seed)
    if seed is not None:
        if seed not in dev_by_seed:
            raise ExportError(f"--seed {seed}: this configuration has no {method} student for {domain!r} with that "
                              f"seed; seeds: {sorted(dev_by_seed)}")
        chosen, seed_why = seed, f"seed {seed} as asked (dev {_pct(dev_by_seed[seed])})"
    else:
        chosen = min(dev_by_seed, key=lambda s: (abs(dev_by_seed[s] - mean), s))
        tied = [s for s in dev_by_seed if s != chosen and abs(dev_by_seed[s] - mean) == abs(dev_by_seed[chosen] - mean)]
        seed_why = (f"seed {chosen}: its dev accuracy {_pct(dev_by_seed[chosen])} is the closest to the mean "
                    f"{_pct(mean)} of seeds {sorted(dev_by_seed)}" + (" (a tie: the smallest seed)" if tied else ""))
    pick = conf_rows[conf_rows["seed"] == chosen].sort_values("trial_id", kind="mergesort")
    keyed = pick[pick["student_key"].notna()]
    if keyed.empty:
        raise ExportError(f"the {method} student for {domain!r}, seed {chosen} has no student_key in the results "
                          f"table (written before students were keyed): there is nothing to export")
    first = keyed.iloc[0]
    return Choice(student_key=str(first["student_key"]), method=method, domain=domain, seed=int(chosen),
                  trial_id=str(first["trial_id"]), search_params=_params(first["search_params"]),
                  config_json=str(first["config_json"]), configuration=configuration, dev_by_seed=dev_by_seed, reason=f"{why}; {seed_why}")


def _dev_rows(df: pd.DataFrame, method: str, domain: str) -> pd.DataFrame:
    missing = [c for c in ("status", "split", "method", "domain", "seed", "accuracy", "trial_id", "config_json",
                           "student_key", "search_params") if c not in df.columns]
    if missing:
        raise ExportError(f"the results table lacks column(s) {missing}")
    ok = df[(df["status"] == "ok").fillna(False) & (df["split"] == "dev").fillna(False) & df["accuracy"].notna()]
    rows = ok[(ok["method"] == method).fillna(False) & (ok["domain"] == domain).fillna(False)]
    if rows.empty:
        pairs = sorted({f"{m}/{d}" for m, d in zip(ok["method"], ok["domain"])})
        raise ExportError(f"no dev results for method {method!r} on domain {domain!r}; the table has "
                          f"{', '.join(pairs) or 'none'}")
    # a student that several trials list (reused_from) is one student: once per (configuration, seed, key)
    keyed = rows["student_key"].notna()
    once = rows[keyed].sort_values("trial_id", kind="mergesort").drop_duplicates(["config_json", "seed", "student_key"])
    rows = pd.concat([once, rows[~keyed]]) if (~keyed).any() else once
    return rows.assign(configuration=rows["config_json"].map(configuration_key))


_BOOKKEEPING = ("name", "seeds", "output_dir")  # what a config holds that no student's result depends on


def configuration_key(config_json: str) -> str:
    """``config_json`` without ``name``, ``seeds`` and ``output_dir``, canonical: one configuration's rows share it."""
    try:
        config = json.loads(config_json)
    except (TypeError, ValueError):
        return str(config_json)
    return json.dumps({k: v for k, v in config.items() if k not in _BOOKKEEPING}, sort_keys=True)


def _best_reason(confs: pd.DataFrame) -> str:
    top = confs.iloc[0]
    text = (f"best mean dev accuracy {_pct(top['dev_mean'])} over {top['seeds']} seed(s) "
            f"({_describe(top['search_params'])}, first trial {top['first_trial']})")
    if len(confs) == 1:
        return text + ", the only configuration"
    nxt = confs.iloc[1]
    tie = " (a tie, broken by seeds, then trial id)" if nxt["dev_mean"] == top["dev_mean"] else ""
    return text + f" of {len(confs)} configurations; next: {_describe(nxt['search_params'])} " \
                  f"{_pct(nxt['dev_mean'])}{tie}"


def _params(text) -> dict:
    try:
        return json.loads(text) if isinstance(text, str) and text else {}
    except ValueError:
        return {}


def _describe(text) -> str:
    params = _params(text)
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "no searched parameters"


def _pct(x: float) -> str:
    return f"{100 * float(x):.2f}%"

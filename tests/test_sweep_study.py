"""The persistent Optuna study of a searched sweep (metakd.sweep.study) and its extension: raising
only search.num_samples extends the stored sweep (its own Tune run, the same study); any other
difference, a grid's num_samples, a study kept in Tune's state only, or one with unfinished
trials is refused; the journal opens with optuna and optuna-dashboard, and the search summary
reads it. No Ray here: the sweeps that run are in tests/test_sweep_cache.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest

from metakd.config import ConfigError, from_dict
from metakd.sweep import study
from metakd.sweep.identity import CONFIG, archive_run, check_config, study_name, tune_run
from metakd.storage import Store

SEARCH = {"algorithm": "optuna", "num_samples": 2,
          "params": {"gamma2": {"type": "uniform", "low": 0.0, "high": 1.0}}}


def _cfg(**search):
    return from_dict({"name": "opt", "search": {**SEARCH, **search}}, require_search=True)


def _stored(root) -> dict:
    return json.loads((root / CONFIG).read_text())


def test_raising_num_samples_extends_the_sweep_and_nothing_else_does(tmp_path):
    store = Store(str(tmp_path))
    assert "stored" in check_config(store, _cfg(), "opt")
    assert tune_run(store) == "tune"
    saved = _stored(tmp_path)["saved"]
    line = check_config(store, _cfg(num_samples=5), "opt")
    assert "extending sweep 'opt': search.num_samples 2 -> 5" in line
    stored = _stored(tmp_path)
    assert stored["config"]["search"]["num_samples"] == 5 and stored["saved"] == saved  # same study name
    assert stored["extended"][0]["num_samples"] == [2, 5] and tune_run(store) == "tune-extensions/n5"
    assert check_config(store, _cfg(num_samples=5), "opt").startswith("same configuration")  # resumes the extension
    for other in ({"num_samples": 3}, {"num_samples": 8, "sampler": "random"}):  # fewer; more, and another change
        with pytest.raises(ConfigError, match="--restart"):
            check_config(store, _cfg(**other), "opt")


def test_a_grid_cannot_be_extended_by_num_samples(tmp_path):
    grid = {"algorithm": "grid", "params": {"gamma2": {"type": "grid", "values": [0.1]}}}
    store = Store(str(tmp_path))
    check_config(store, _cfg(**grid, num_samples=1), "g")
    with pytest.raises(ConfigError, match="search.num_samples: 1 -> 2"):
        check_config(store, _cfg(**grid, num_samples=2), "g")


def test_an_extension_is_refused_where_the_study_cannot_take_it(tmp_path):
    with pytest.raises(ConfigError, match="object store.*study_storage"):  # s3:// without search.study_storage
        study.check_extendable(_cfg(), SimpleNamespace(root="s3://bucket/metakd/opt"), "opt", "opt-x")
    legacy = Store(str(tmp_path / "legacy"))  # a Tune run from before studies were kept
    check_config(legacy, _cfg(), "opt")
    (tmp_path / "legacy" / "tune").mkdir()
    with pytest.raises(ConfigError, match="predates persistent Optuna studies"):
        check_config(legacy, _cfg(num_samples=4), "opt")
    store = Store(str(tmp_path))
    check_config(store, _cfg(), "opt")
    storage, name = study.open_study(_cfg(), store, study_name(store, "opt"))
    s = optuna.create_study(study_name=name, storage=storage)
    s.tell(s.ask({"gamma2": optuna.distributions.FloatDistribution(0, 1)}), 0.5)
    s.ask()  # a trial an interrupted run left open
    with pytest.raises(ConfigError, match=r"unfinished trials \[1\].*resume"):
        check_config(store, _cfg(num_samples=4), "opt")


def test_the_study_lives_in_the_sweep_directory_and_opens_with_optuna_and_the_dashboard(tmp_path):
    from optuna_dashboard._storage_url import get_storage

    store = Store(str(tmp_path))
    check_config(store, _cfg(), "opt")
    storage, name = study.open_study(_cfg(), store, study_name(store, "opt"))
    assert name.startswith("opt-") and json.loads((tmp_path / study.RECORD).read_text()) == {
        "name": name, "storage": study.JOURNAL}
    s = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    dist = {"gamma2": optuna.distributions.FloatDistribution(0, 1)}
    for value, g in ((0.7, 0.1), (0.9, 0.8), (0.8, 0.5)):
        t = s.ask(dist)
        assert t.params["gamma2"] >= 0
        s.tell(t, value)
    loaded = study.load_study(str(tmp_path))
    assert [t.value for t in loaded.trials] == [0.7, 0.9, 0.8]
    dashboard = get_storage(str(tmp_path / study.JOURNAL))  # what `optuna-dashboard <journal>` opens
    assert [st.study_name for st in dashboard.get_all_studies()] == [name]
    assert len(study.trials_in(dashboard, name)) == 3
    # --restart moves the study aside with the rest; the next one is new (a new name)
    archive_run(store)
    assert not (tmp_path / study.JOURNAL).exists() and study.load_study(str(tmp_path)) is None


def test_the_study_is_kept_in_a_database_when_study_storage_says_so(tmp_path):
    cfg = _cfg(study_storage=f"sqlite:///{tmp_path}/studies.db")
    store = Store(str(tmp_path / "opt"))
    check_config(store, cfg, "opt")
    storage, name = study.open_study(cfg, store, study_name(store, "opt"))
    optuna.create_study(study_name=name, storage=storage)
    assert json.loads((tmp_path / "opt" / study.RECORD).read_text())["storage"] == cfg.search.study_storage
    assert study.load_study(str(tmp_path / "opt")).study_name == name
    assert not (tmp_path / "opt" / study.JOURNAL).exists()


def test_a_database_password_is_neither_printed_nor_stored():
    assert study.without_password("postgresql://me:secret@db:5432/optuna") == "postgresql://me@db:5432/optuna"
    assert study.without_password("sqlite:////tmp/s.db") == "sqlite:////tmp/s.db"


def test_study_storage_is_refused_for_a_grid_and_for_an_unknown_scheme():
    with pytest.raises(ConfigError, match="search.study_storage"):
        _cfg(algorithm="grid", params={"gamma2": {"type": "grid", "values": [0.1]}}, study_storage="x.journal")
    with pytest.raises(ConfigError, match="search.study_storage"):
        _cfg(study_storage="redis://host/0")


def test_search_summary_reads_the_real_study(tmp_path):
    from metakd.report.analysis import search_summary

    rows = []
    for i, (g, acc) in enumerate(((0.1, 0.6), (0.5, 0.8), (0.9, 0.7))):
        for split in ("dev", "test"):
            rows.append({"trial_id": f"t{i}", "method": "metakd", "domain": "a", "seed": 0, "split": split,
                         "accuracy": acc, "status": "ok", "search_params": json.dumps({"gamma2": g, "gamma1": 0.5}),
                         "dev_majority_rate": 0.5})
    df = pd.DataFrame(rows)
    _, rebuilt = search_summary(df)
    assert rebuilt.attrs["source"] == "rows"
    s = optuna.create_study(direction="maximize")
    dists = {"gamma2": optuna.distributions.FloatDistribution(0, 1), "gamma1": optuna.distributions.FloatDistribution(0, 1)}
    for g1, g2, v in ((0.1, 0.1, 0.6), (0.9, 0.5, 0.8), (0.5, 0.9, 0.7), (0.3, 0.2, 0.65)):
        s.add_trial(optuna.trial.create_trial(params={"gamma1": g1, "gamma2": g2}, distributions=dists, value=v))
    _, real = search_summary(df, study=s)
    assert real.attrs["source"] == "study" and set(real["param"]) == {"gamma1", "gamma2"}  # the study's own params
    flat = optuna.create_study(direction="maximize")
    for g1, g2 in ((0.1, 0.1), (0.9, 0.5)):
        flat.add_trial(optuna.trial.create_trial(params={"gamma1": g1, "gamma2": g2}, distributions=dists, value=0.5))
    with pytest.raises(ValueError, match="same objective value"):
        search_summary(df, study=flat)

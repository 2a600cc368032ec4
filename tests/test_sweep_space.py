"""The search section -> a Tune search space (Optuna define-by-run, grid), and a trial's config."""

from __future__ import annotations

import json

import pytest

from metakd.config import ConfigError, from_dict
from metakd.sweep.space import DefineByRun, grid_space, trial_config


def _sweep(search: dict):
    return from_dict({"name": "space", "search": {"algorithm": "grid", "num_samples": 1, **search}},
                     require_search=True)


def test_search_space_grid_and_define_by_run():
    cfg = _sweep({
        "algorithm": "optuna", "num_samples": 4,
        "params": {
            "gamma1": {"type": "uniform", "low": 0.0, "high": 1.0},
            "student": {"type": "choice", "values": ["tiny-student",
                                                     {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64}]},
            "distill.pred_loss": {"type": "choice", "values": ["kl", "js"]},
            "distill.temperature": {"type": "loguniform", "low": 0.5, "high": 4.0, "when": {"distill.pred_loss": "kl"}},
        }})
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = DefineByRun(cfg.search.params)
    seen_conditional = set()
    for _ in range(12):
        trial = study.ask()
        space(trial)
        params = trial.params
        assert 0.0 <= params["gamma1"] <= 1.0
        assert ("distill.temperature" in params) == (params["distill.pred_loss"] == "kl")
        seen_conditional.add("distill.temperature" in params)
        resolved = trial_config(cfg, params)
        assert resolved.meta_teacher.gamma1 == params["gamma1"]
        assert resolved.student.layers in (None, 1)
        study.tell(trial, 0.5)
    assert seen_conditional == {True, False}

    grid = grid_space(_sweep({
        "params": {"gamma2": {"type": "grid", "values": [0.0, 0.5]},
                   "student": {"type": "grid", "values": ["tiny-student", {"layers": 1, "hidden": 32, "heads": 2,
                                                                           "intermediate": 64}]}}}).search.params)
    assert grid["gamma2"] == {"grid_search": [0.0, 0.5]}
    assert grid["student"]["grid_search"][1] == json.dumps({"heads": 2, "hidden": 32, "intermediate": 64, "layers": 1})


def test_a_trial_config_is_a_validated_copy_and_leaves_the_sweep_alone():
    cfg = _sweep({"params": {"gamma2": {"type": "grid", "values": [0.0, 0.5]}}})
    trial = trial_config(cfg, {"gamma2": 0.0, "distill.stage2_lr": 1e-4})
    assert trial.distill.gamma2 == 0.0 and trial.distill.stage2_lr == 1e-4 and trial.search is None
    assert cfg.distill.gamma2 == 0.5 and cfg.distill.stage2_lr != 1e-4 and cfg.search is not None
    with pytest.raises(ConfigError, match=r"distill\.gamma2: -1\.0 is not allowed"):
        trial_config(cfg, {"gamma2": -1.0})

"""The ``search`` section -> a Tune search: an Optuna define-by-run space, or a grid.

Trial configs hold the searched values under their YAML names (``gamma2``,
``distill.stage1_lr``, ...). Choice values that are not scalars (an explicit student
config) travel as JSON strings, because Optuna only stores scalar categories.
"""

from __future__ import annotations

import copy
import json

from ..config import ExperimentConfig, ParamSpec, resolve_param_path, set_path


def encode_value(value):
    return value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value, sort_keys=True)


def decode_value(value):
    if isinstance(value, str) and value[:1] in "{[":
        return json.loads(value)
    return value


def ordered_params(params: dict[str, ParamSpec]) -> list[str]:
    """Conditions first: a parameter is suggested after the one its ``when`` refers to."""
    order: list[str] = []

    def visit(name: str, seen: tuple = ()) -> None:
        if name in order:
            return
        if name in seen:
            raise ValueError(f"search.params.{name}.when: circular condition")
        spec = params[name]
        if spec.when:
            visit(next(iter(spec.when)), seen + (name,))
        order.append(name)

    for name in params:
        visit(name)
    return order


class DefineByRun:
    """Optuna define-by-run space: ``space(trial)`` suggests every (active) parameter."""

    def __init__(self, params: dict[str, ParamSpec]):
        self.params = params
        self.order = ordered_params(params)

    def __call__(self, trial) -> None:
        chosen: dict = {}
        for name in self.order:
            spec = self.params[name]
            if spec.when:
                (other, wanted), = spec.when.items()
                if other not in chosen or decode_value(chosen[other]) != wanted:
                    continue
            if spec.type == "uniform":
                chosen[name] = trial.suggest_float(name, spec.low, spec.high)
            elif spec.type == "loguniform":
                chosen[name] = trial.suggest_float(name, spec.low, spec.high, log=True)
            elif spec.type == "int":
                chosen[name] = trial.suggest_int(name, int(spec.low), int(spec.high))
            else:
                chosen[name] = trial.suggest_categorical(name, [encode_value(v) for v in spec.values])


def grid_space(params: dict[str, ParamSpec]) -> dict:
    from ray import tune

    return {name: tune.grid_search([encode_value(v) for v in spec.values]) for name, spec in params.items()}


def make_search(cfg: ExperimentConfig, seed: int = 0, storage=None, study_name: str | None = None):
    """(param_space, search_alg) for the Tuner. ``storage`` / ``study_name``: the Optuna study the
    search asks and tells (created, or loaded with its trials: :mod:`metakd.sweep.study`); None: in memory."""
    s = cfg.search
    if s.algorithm == "grid":
        return grid_space(s.params), None
    from ray.tune.search.optuna import OptunaSearch

    return {}, OptunaSearch(space=DefineByRun(s.params), metric=s.metric, mode=s.mode, sampler=make_sampler(cfg, seed),
                            storage=storage, study_name=study_name)


def make_sampler(cfg: ExperimentConfig, seed: int = 0):
    """The Optuna sampler of ``search.algorithm`` / ``search.sampler``."""
    import optuna

    s = cfg.search
    if s.algorithm == "optuna" and s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def trial_config(base: ExperimentConfig, searched: dict) -> ExperimentConfig:
    """The resolved experiment of one trial: a copy of the sweep's config with the searched values applied."""
    cfg = copy.deepcopy(base)
    for name, value in searched.items():
        set_path(cfg, resolve_param_path(name), decode_value(value))
    cfg.search = None
    return cfg.validate()

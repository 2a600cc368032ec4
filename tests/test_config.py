"""The experiment / sweep YAML schema: defaults, validation messages, search section, loaders."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from metakd.config import (
    PRESETS,
    ConfigError,
    DistillConfig,
    ExperimentConfig,
    StudentConfig,
    content_hash,
    field_docs,
    from_dict,
    load_experiment,
    load_sweep,
    set_path,
)

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
TINY_3L = {"layers": 3, "hidden": 32, "heads": 2, "intermediate": 64}


def _error(raw: dict, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        from_dict(raw, **kw)
    return str(e.value)


def _search(params: dict, **kw) -> dict:
    return {"search": {"params": params, **kw}}


# ----------------------------------------------------------------------------- defaults


def test_defaults_follow_the_spec():
    cfg = from_dict({})
    assert cfg.methods == ["metakd"] and cfg.seeds == [0] and cfg.search is None
    assert cfg.teacher.preset == "tiny-teacher" and cfg.student.preset == "tiny-student"
    assert cfg.meta_teacher.gamma1 == 0.5 and cfg.meta_teacher.alpha == 0.5
    assert cfg.meta_teacher.prototype == "class" and cfg.meta_teacher.tda_target == "uniform"
    assert cfg.meta_teacher.prototype_weighting is True
    d = cfg.distill
    assert (d.gamma2, d.schedule, d.pred_loss, d.layer_map, d.temperature) == (0.5, "two_stage", "kl", "exact", 1.0)
    assert (d.stage1_epochs, d.stage1_lr, d.stage2_epochs, d.stage2_lr) == (10, 5e-5, 3, 3e-5)
    assert (cfg.teacher.lr, cfg.teacher.epochs, cfg.teacher.batch_size) == (2e-5, 3, 32)
    assert cfg.data.source == "synthetic" and cfg.data.sample_rate == 1.0
    # from_dict({}) equals the dataclass defaults
    assert cfg == ExperimentConfig()


# ----------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_is_named_with_the_allowed_keys():
    msg = _error({"gamma2": 0.3})
    assert msg.startswith("gamma2: unknown key")
    for allowed in ("data", "distill", "meta_teacher", "methods", "search", "seeds", "student", "teacher"):
        assert allowed in msg


def test_unknown_nested_key_is_named_by_its_dotted_path():
    msg = _error({"distill": {"gama2": 0.3}})
    assert msg.startswith("distill.gama2: unknown key")
    assert "gamma2" in msg and "stage1_epochs" in msg and "pred_loss" in msg


def test_unknown_key_two_levels_down():
    msg = _error({"data": {"synthetic": {"num_domain": 3}}})
    assert msg.startswith("data.synthetic.num_domain: unknown key") and "num_domains" in msg


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("rate", [0, 1.5, -0.1])
def test_sample_rate_outside_0_1_names_field_and_value(rate):
    msg = _error({"data": {"sample_rate": rate}})
    assert msg.startswith("data.sample_rate:")
    assert str(float(rate)) in msg and "(0, 1]" in msg


def test_sample_rate_1_and_small_values_are_allowed():
    assert from_dict({"data": {"sample_rate": 1}}).data.sample_rate == 1.0
    assert from_dict({"data": {"sample_rate": 0.01}}).data.sample_rate == 0.01


def test_unknown_preset_lists_the_presets():
    msg = _error({"teacher": {"preset": "bert-huge"}})
    assert msg.startswith("teacher.preset:") and "'bert-huge'" in msg
    for name in PRESETS:
        assert name in msg


def test_unknown_method_lists_the_methods():
    msg = _error({"methods": ["metakd", "kd_magic"]})
    assert "methods" in msg and "'kd_magic'" in msg and "kd_single" in msg and "student_ft" in msg


@pytest.mark.parametrize("field,value,allowed", [
    ("pred_loss", "kld", "kl, rkl, js, tvd"),
    ("schedule", "three_stage", "two_stage, joint"),
    ("layer_map", "nearest", "exact, round"),
])
def test_choice_fields_name_field_value_and_choices(field, value, allowed):
    msg = _error({"distill": {field: value}})
    assert msg.startswith(f"distill.{field}:") and repr(value) in msg and allowed in msg


def test_meta_teacher_choices_are_checked():
    assert _error({"meta_teacher": {"tda_target": "reversed"}}).startswith("meta_teacher.tda_target:")
    assert _error({"meta_teacher": {"prototype": "instance"}}).startswith("meta_teacher.prototype:")
    assert _error({"meta_teacher": {"alpha": 1.5}}).startswith("meta_teacher.alpha: 1.5")


def test_wrong_types_are_named():
    assert _error({"teacher": {"epochs": 2.5}}) == "teacher.epochs: expected an integer, got 2.5"
    assert _error({"seeds": [0, "1"]}) == "seeds[1]: expected an integer, got '1'"
    assert _error({"teacher": {"lr": "fast"}}) == "teacher.lr: expected a number, got 'fast'"
    assert _error({"distill": "joint"}).startswith("distill: expected a mapping")
    assert _error({"meta_teacher": {"prototype_weighting": "no"}}).startswith("meta_teacher.prototype_weighting")


def test_teacher_epochs_must_be_positive_but_stage1_may_be_zero():
    assert _error({"teacher": {"epochs": 0}}).startswith("teacher.epochs: 0")
    assert _error({"distill": {"stage2_epochs": 0}}).startswith("distill.stage2_epochs: 0")
    assert from_dict({"distill": {"stage1_epochs": 0}}).distill.stage1_epochs == 0


# ----------------------------------------------------------------------------- layer mapping


def test_layers_that_do_not_map_exactly_are_refused_with_both_counts():
    msg = _error({"teacher": "tiny-teacher", "student": TINY_3L})
    assert "student" in msg and "(3)" in msg and "(4)" in msg and "layer_map: round" in msg


def test_layer_map_round_accepts_the_same_sizes():
    cfg = from_dict({"teacher": "tiny-teacher", "student": TINY_3L, "distill": {"layer_map": "round"}})
    assert cfg.student.sizes() == (3, 32, 2, 64)


def test_student_deeper_than_teacher_is_refused_even_with_round():
    for layer_map in ("exact", "round"):
        msg = _error({"teacher": "tiny-teacher", "student": "bert-base", "distill": {"layer_map": layer_map}})
        assert "12 layers" in msg and "only 4" in msg


def test_init_from_teacher_needs_equal_hidden_size():
    msg = _error({"teacher": "tiny-teacher", "student": {"preset": "tiny-student", "init_from_teacher": True}})
    assert msg.startswith("student.init_from_teacher:") and "32" in msg and "64" in msg
    ok = from_dict({"teacher": "tiny-teacher",
                    "student": {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128, "init_from_teacher": True}})
    assert ok.student.init_from_teacher


def test_teacher_cannot_be_initialised_from_itself():
    assert _error({"teacher": {"preset": "tiny-teacher", "init_from_teacher": True}}).startswith(
        "teacher.init_from_teacher")


def test_model_needs_exactly_one_source():
    assert "exactly one of" in _error({"student": {"preset": "tiny-student", "layers": 2}})
    msg = _error({"student": {"layers": 2, "hidden": 30, "heads": 4, "intermediate": 64}})
    assert msg.startswith("student.hidden: 30") and "heads (4)" in msg
    assert _error({"student": {"layers": 2, "hidden": 32}}).startswith("student.heads: None")


# ----------------------------------------------------------------------------- coercions and shorthands


def test_numeric_strings_are_accepted_for_floats():
    # YAML 1.1 reads 5e-5 (no dot) as a string
    raw = yaml.safe_load("distill:\n  stage1_lr: 5e-5\nteacher:\n  lr: 2e-5\n")
    assert raw["distill"]["stage1_lr"] == "5e-5"
    cfg = from_dict(raw)
    assert cfg.distill.stage1_lr == pytest.approx(5e-5) and isinstance(cfg.distill.stage1_lr, float)
    assert cfg.teacher.lr == pytest.approx(2e-5)


def test_integral_float_is_accepted_for_int_fields():
    assert from_dict({"teacher": {"epochs": 2.0}}).teacher.epochs == 2


def test_booleans_are_not_numbers():
    with pytest.raises(ConfigError):
        from_dict({"data": {"sample_rate": True}})


def test_model_shorthand_names_a_preset_or_a_checkpoint():
    cfg = from_dict({"teacher": "bert-base", "student": "tinybert-4l"})
    assert cfg.teacher.preset == "bert-base" and cfg.teacher.checkpoint is None
    assert cfg.teacher.epochs == 3  # training settings keep their defaults
    assert cfg.student.preset == "tinybert-4l"
    hub = from_dict({"teacher": "some-org/some-bert"})
    assert hub.teacher.checkpoint == "some-org/some-bert" and hub.teacher.preset is None


def test_section_with_only_training_settings_keeps_the_default_preset():
    cfg = from_dict({"teacher": {"epochs": 1, "lr": 1e-3}, "student": {"init_from_teacher": False}})
    assert cfg.teacher.preset == "tiny-teacher" and cfg.teacher.epochs == 1 and cfg.teacher.lr == 1e-3
    assert cfg.student.preset == "tiny-student"


def test_from_dict_does_not_mutate_its_input():
    raw = {"teacher": "bert-mini", "student": {"init_from_teacher": False}}
    from_dict(raw)
    assert raw == {"teacher": "bert-mini", "student": {"init_from_teacher": False}}


def test_set_path_sets_dotted_fields_and_student_values():
    cfg = ExperimentConfig()
    set_path(cfg, "distill.gamma2", "0.25")
    assert cfg.distill.gamma2 == 0.25
    set_path(cfg, "student", "bert-tiny")
    assert cfg.student == StudentConfig(preset="bert-tiny")
    set_path(cfg, "student", {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32})
    assert cfg.student.sizes() == (1, 16, 2, 32)
    with pytest.raises(ConfigError, match="distill.gama2: no such config field"):
        set_path(cfg, "distill.gama2", 1.0)


# ----------------------------------------------------------------------------- search section


def test_grid_type_needs_algorithm_grid():
    msg = _error(_search({"gamma2": {"type": "grid", "values": [0.0, 0.5]}}))
    assert msg.startswith("search.params.gamma2.type:") and "algorithm: grid" in msg
    cfg = from_dict(_search({"gamma2": {"type": "grid", "values": [0.0, 0.5]}}, algorithm="grid"))
    assert cfg.search.params["gamma2"].values == [0.0, 0.5]


def test_continuous_types_cannot_be_enumerated_by_grid():
    msg = _error(_search({"gamma2": {"type": "uniform", "low": 0, "high": 1}}, algorithm="grid"))
    assert "cannot be enumerated" in msg


@pytest.mark.parametrize("low", [0, -1e-3])
def test_loguniform_needs_a_positive_low(low):
    msg = _error(_search({"distill.stage1_lr": {"type": "loguniform", "low": low, "high": 1e-3}}))
    assert msg.startswith("search.params.distill.stage1_lr.low:") and "> 0" in msg


def test_bounds_must_be_ordered():
    msg = _error(_search({"gamma2": {"type": "uniform", "low": 0.8, "high": 0.2}}))
    assert msg.startswith("search.params.gamma2.high: 0.2")


def test_when_must_name_another_searched_param():
    msg = _error(_search({"gamma2": {"type": "choice", "values": [0.0, 1.0], "when": {"gamma1": 0.5}}}))
    assert msg.startswith("search.params.gamma2.when:") and "'gamma1'" in msg
    ok = from_dict(_search({"gamma1": {"type": "choice", "values": [0.0, 0.5]},
                            "gamma2": {"type": "choice", "values": [0.0, 1.0], "when": {"gamma1": 0.5}}}))
    assert ok.search.params["gamma2"].when == {"gamma1": 0.5}


def test_unknown_searchable_name_is_refused_with_the_aliases():
    msg = _error(_search({"gama2": {"type": "choice", "values": [0.1]}}))
    assert msg.startswith("search.params.gama2:") and "gamma2" in msg and "sample_rate" in msg
    assert "whole section" in _error(_search({"distill": {"type": "choice", "values": [1]}}))


def test_each_searched_value_must_make_a_valid_experiment():
    msg = _error(_search({"sample_rate": {"type": "choice", "values": [0.5, 2.0]}}))
    assert msg.startswith("search.params.sample_rate: value 2.0 is invalid") and "data.sample_rate" in msg
    msg = _error(_search({"distill.epochs": {"type": "int", "low": 0, "high": 3}}))
    assert "distill.epochs" in msg and "value 0" in msg
    msg = _error(_search({"distill.pred_loss": {"type": "choice", "values": ["kl", "kld"]}}))
    assert "'kld'" in msg


def test_student_choices_may_be_presets_or_sizes():
    sizes = {"layers": 2, "hidden": 48, "heads": 4, "intermediate": 96}
    cfg = from_dict(_search({"student": {"type": "choice", "values": ["tiny-student", "tiny-student-1l", sizes]}}))
    assert cfg.search.params["student"].values == ["tiny-student", "tiny-student-1l", sizes]
    bad = {"layers": 2, "hidden": 30, "heads": 4, "intermediate": 64}
    msg = _error(_search({"student": {"type": "choice", "values": ["tiny-student", bad]}}))
    assert "value {" in msg and "student.hidden: 30" in msg


def test_searched_student_must_map_onto_the_teacher():
    with pytest.raises(ConfigError):
        from_dict(_search({"student": {"type": "choice", "values": ["tiny-student", "bert-base"]}}))


def test_search_scheduler_and_resources_are_validated():
    msg = _error(_search({"gamma2": {"type": "choice", "values": [0.1]}}, resources={"workers_per_trial": 0}))
    assert msg.startswith("search.resources.workers_per_trial: 0")
    msg = _error(_search({"gamma2": {"type": "choice", "values": [0.1]}}, scheduler={"reduction_factor": 1}))
    assert msg.startswith("search.scheduler.reduction_factor: 1")
    assert _error({"search": {"params": {}}}).startswith("search.params: {}")


def test_search_max_failures_defaults_to_3_and_refuses_negatives():
    params = {"gamma2": {"type": "choice", "values": [0.1]}}
    assert from_dict(_search(params)).search.max_failures == 3
    assert from_dict(_search(params, max_failures=0)).search.max_failures == 0
    assert _error(_search(params, max_failures=-1)) == \
        "search.max_failures: -1 is not allowed; expected an integer >= 0"


# ----------------------------------------------------------------------------- files


def _write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_sweep_without_search_is_an_error(tmp_path):
    p = _write(tmp_path, "name: plain\nmethods: [metakd]\n")
    assert load_experiment(p).name == "plain"
    with pytest.raises(ConfigError, match="search: missing"):
        load_sweep(p)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_experiment(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(_write(tmp_path, "name: [unclosed\n", "bad.yaml"))
    with pytest.raises(ConfigError, match="the file is empty"):
        load_experiment(_write(tmp_path, "# only a comment\n", "empty.yaml"))
    with pytest.raises(ConfigError, match="expected a YAML mapping"):
        load_experiment(_write(tmp_path, "- a\n- b\n", "list.yaml"))
    p = _write(tmp_path, "distill:\n  gama2: 0.1\n", "typo.yaml")
    with pytest.raises(ConfigError) as e:
        load_experiment(p)
    assert str(p) in str(e.value) and "distill.gama2" in str(e.value)


def _sweep_files() -> list[Path]:
    return sorted(SWEEPS.glob("*.yaml")) + sorted(SWEEPS.glob("*.yml"))


def test_there_are_sweep_files():
    names = {p.name for p in _sweep_files()}
    assert {"smoke.yaml", "example_run.yaml"} <= names


@pytest.mark.parametrize("path", _sweep_files(), ids=lambda p: p.name)
def test_every_yaml_in_sweeps_loads(path):
    raw = yaml.safe_load(path.read_text())
    if "search" in raw:
        cfg = load_sweep(path)
        assert cfg.search is not None and cfg.search.params
    else:
        cfg = load_experiment(path)
        with pytest.raises(ConfigError, match="search"):
            load_sweep(path)
    assert cfg.name


# ----------------------------------------------------------------------------- hash and docs


def test_content_hash_is_stable_and_sensitive():
    a = from_dict({"distill": {"gamma2": 0.3}})
    b = from_dict({"distill": {"gamma2": 0.3}})
    assert content_hash(a) == content_hash(b) == content_hash(a.to_dict())
    assert len(content_hash(a)) == 16 and len(content_hash(a, 8)) == 8
    assert content_hash({"x": 1, "y": 2}) == content_hash({"y": 2, "x": 1})
    assert content_hash(from_dict({"distill": {"gamma2": 0.31}})) != content_hash(a)
    assert content_hash(from_dict({"student": "tiny-student-1l"})) != content_hash(from_dict({}))
    # sha256 of the sorted-key JSON: the same in every process (teachers are looked up by it)
    expected = hashlib.sha256(b'{"a": [1, 2], "b": "x"}').hexdigest()[:16]
    assert content_hash({"b": "x", "a": [1, 2]}) == expected


def test_field_docs_cover_every_nested_field_with_help():
    rows = {name: (default, help_) for name, default, help_ in field_docs(ExperimentConfig)}
    assert rows["distill.gamma2"][0] == "0.5" and "L_TKD" in rows["distill.gamma2"][1]
    assert rows["meta_teacher.gamma1"][0] == "0.5"
    assert rows["data.synthetic.num_domains"][0] == "4"
    assert "search.params" in rows and "search.resources.workers_per_trial" in rows
    assert rows["distill.pred_loss"][0] == "'kl'"
    # every leaf field of DistillConfig is documented
    for f in DistillConfig.__dataclass_fields__:
        assert rows[f"distill.{f}"][1], f


def test_mistyped_preset_is_refused_not_tried_as_a_hub_id():
    with pytest.raises(ConfigError, match="did you mean the preset 'tiny-teacher'"):
        from_dict({"teacher": "tiny-teachr"})
    with pytest.raises(ConfigError, match="student.checkpoint: 'bert-mnii'"):
        from_dict({"student": {"checkpoint": "bert-mnii"}})
    # a real hub id (no preset close to it) stays a checkpoint
    assert from_dict({"teacher": {"checkpoint": "bert-base-uncased", "epochs": 1}}).teacher.checkpoint == "bert-base-uncased"


def test_student_workers_share_jobs_unless_student_ddp_makes_them_ranks_of_one_student():
    def sweep(**resources):
        return from_dict({"distill": {"batch_size": 16}, "search": {
            "algorithm": "grid", "params": {"gamma2": {"type": "grid", "values": [0.5]}}, "resources": resources}})

    # independent workers: each takes the whole batch of its own job, any GPU fraction
    cfg = sweep(student_workers=3, student_gpus_per_worker=0.25, gpus_per_worker=1)
    assert cfg.search.resources.student_gpus() == 0.25 and not cfg.search.resources.student_ddp
    with pytest.raises(ConfigError, match=r"distill\.batch_size: 16 .*student_workers \(3\)"):
        sweep(student_workers=3, student_ddp=True)  # DDP ranks split the global batch
    with pytest.raises(ConfigError, match=r"search\.resources\.student_gpus_per_worker: 0\.25 is fractional"):
        sweep(student_workers=2, student_gpus_per_worker=0.25, student_ddp=True)
    sweep(student_workers=2, student_ddp=True)  # 16 splits over 2 ranks

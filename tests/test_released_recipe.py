"""The released code's options (issue 17): their defaults and validation, the keys they enter, the
stage-1 schedule by hand, and sweeps/released_recipe.yaml setting every one as released."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metakd.config import ConfigError, ExperimentConfig, from_dict, load_sweep
from metakd.jobs.experiment import student_identity
from metakd.train.loop import StageSettings, train_stage
from metakd.train.runtime import LocalRuntime
from metakd.train.teacher import teacher_spec

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {  # field: (default, the other choice)
    "distill.attention": ("scores", "probs"),
    "distill.pred_weighting": ("lambda", "none"),
    "distill.tkd": ("tanh", "pre_tanh_shared"),
    "distill.stage1_schedule": ("linear", "constant"),
    "meta_teacher.tda_weighting": ("none", "instance"),
}


def _cfg(path: str, value) -> ExperimentConfig:
    section, name = path.split(".")
    return from_dict({section: {name: value}})


def test_defaults_and_validation_name_the_field():
    cfg = ExperimentConfig()
    for path, (default, other) in OPTIONS.items():
        section, name = path.split(".")
        assert getattr(getattr(cfg, section), name) == default, path
        assert getattr(getattr(_cfg(path, other), section), name) == other
        with pytest.raises(ConfigError, match=rf"^{path}: 'bogus' is not allowed; expected one of {default}, {other}$"):
            _cfg(path, "bogus")


def test_student_keys_hold_each_option_exactly_for_the_methods_it_changes():
    def key(method, path, value):
        return student_identity(_cfg(path, value), method, "a", 0, None if method == "student_ft" else "t")

    # attention maps and the stage-1 schedule: every distilling student; lambda weighting and the TKD form: the
    # meta methods only (a baseline's lambda_i = 1 and it has no L_TKD); none of them: the fine-tuned student
    reads = {"distill.attention": {"metakd", "metakd_no_target", "kd_single", "kd_mix", "kd_mtl"},
             "distill.stage1_schedule": {"metakd", "metakd_no_target", "kd_single", "kd_mix", "kd_mtl"},
             "distill.pred_weighting": {"metakd", "metakd_no_target"},
             "distill.tkd": {"metakd", "metakd_no_target"},
             "meta_teacher.tda_weighting": set()}  # a teacher setting: through the teacher key
    for path, methods in reads.items():
        default, other = OPTIONS[path]
        for method in ("metakd", "metakd_no_target", "kd_single", "kd_mix", "kd_mtl", "student_ft"):
            differs = key(method, path, default) != key(method, path, other)
            assert differs == (method in methods), (path, method)


def test_teacher_keys_hold_tda_weighting_for_meta_teachers_only():
    def key(method, value):
        return teacher_spec(_cfg("meta_teacher.tda_weighting", value), method, "a", 0).key

    for method in ("metakd", "metakd_no_target"):
        assert key(method, "none") != key(method, "instance")
    for method in ("kd_single", "kd_mix", "kd_mtl"):
        assert key(method, "none") == key(method, "instance")
    # the student options never reach a teacher
    for path in ("distill.attention", "distill.pred_weighting", "distill.tkd", "distill.stage1_schedule"):
        default, other = OPTIONS[path]
        assert teacher_spec(_cfg(path, default), "metakd", "a", 0).key == \
            teacher_spec(_cfg(path, other), "metakd", "a", 0).key


@pytest.mark.parametrize("schedule, moved", [("constant", 2 * 0.1), ("linear", 0.1)])
def test_stage1_schedule_by_hand(schedule, moved):
    """Two AdamW steps on a constant gradient move a weight by lr per step (Adam normalises the step):
    constant keeps lr throughout (2 lr); linear warms up over ceil(0.1 * 2) = 1 step from 0 (0 + lr)."""
    model = torch.nn.Linear(1, 1, bias=False)
    start = float(model.weight.detach())
    loader = [{"labels": torch.zeros(1, dtype=torch.long)}] * 2
    settings = StageSettings("stage1", 1, 0.1, warmup_ratio=0.1, weight_decay=0.0, keep_best=False, schedule=schedule)
    runtime = LocalRuntime("cpu", log=lambda *_: None)
    train_stage(model, lambda m, b: m.weight.sum(), loader, None, ["a"], settings, runtime, "t")
    assert start - float(model.weight.detach()) == pytest.approx(moved, abs=1e-6)


def test_released_recipe_sets_every_option_as_released():
    cfg = load_sweep(ROOT / "sweeps" / "released_recipe.yaml")
    released = {"distill.attention": "scores", "distill.pred_weighting": "none", "distill.tkd": "pre_tanh_shared",
                "distill.stage1_schedule": "constant", "meta_teacher.tda_weighting": "instance"}
    for path, value in released.items():
        section, name = path.split(".")
        assert getattr(getattr(cfg, section), name) == value, path
    assert (cfg.meta_teacher.prototype, cfg.meta_teacher.tda_target) == ("domain", "shuffled")
    assert (cfg.teacher.epochs, cfg.teacher.lr, cfg.teacher.batch_size) == (3, 2e-5, 32)
    d = cfg.distill
    assert (d.stage1_epochs, d.stage1_lr, d.stage2_epochs, d.stage2_lr) == (10, 5e-5, 3, 3e-5)
    assert (d.temperature, d.batch_size, cfg.data.max_length, d.gamma2, cfg.meta_teacher.gamma1) == \
        (1.0, 32, 128, 0.5, 0.5)

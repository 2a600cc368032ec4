"""The student.prune block (cap-pruning spec §3, §5 item 4): round trip, refusals, searching, keys."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from metakd.config import ConfigError, ExperimentConfig, PruneConfig, content_hash, from_dict, get_path, set_path
from metakd.jobs.experiment import student_identity
from metakd.train.teacher import teacher_spec

BASE = {"name": "p", "methods": ["metakd", "kd_single"], "student": {"prune": {"sparsity": 0.5}}}


def _with(student: dict, **top) -> dict:
    return {**copy.deepcopy(BASE), "student": student, **top}


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        from_dict(raw)
    return str(e.value)


def _student_key(cfg, method="metakd"):
    teacher = teacher_spec(cfg, method, "alpha", 0)
    return content_hash(student_identity(cfg, method, "alpha", 0, teacher.key if teacher else None))


def test_round_trip_and_structure_defaults():
    cfg = from_dict(BASE)
    p = cfg.student.prune
    assert (p.criterion, p.w_unsup, p.w_sup, p.kd_temperature, p.lr, p.weight_decay) == ("movement", 0.1, 10.0, 2.0,
                                                                                        3e-5, 0.0)
    assert from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    f = from_dict(_with({"prune": {"structure": "heads_ffn", "sparsity": 0.5}})).student.prune
    assert (f.criterion, f.w_unsup, f.w_sup, f.kd_temperature, f.lr, f.weight_decay) == ("first_order", 0.3, 3.0, 1.0,
                                                                                        2e-5, 0.01)
    assert cfg.student.kind == "pruned" and cfg.student.label() == "pruned movement 0.5 +prc+snc+fic"
    assert from_dict(_with({"prune": {"base_loss": "cap"}})).student.kind == "pruned_cap"


@pytest.mark.parametrize("student, top, field", [
    ({"preset": "tiny-student", "prune": {}}, {}, "student.preset"),
    ({"checkpoint": "some/model", "prune": {}}, {}, "student.checkpoint"),
    ({"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64, "prune": {}}, {}, "student.layers"),
    ({"init_from_teacher": True, "prune": {}}, {}, "student.init_from_teacher"),
    ({"prune": {"criterion": "first_order"}}, {}, "student.prune.criterion"),
    ({"prune": {"structure": "heads_ffn", "criterion": "movement", "sparsity": 0.5}}, {}, "student.prune.criterion"),
    ({"prune": {"criterion": "soft_movement"}}, {}, "student.prune.soft_final_lambda"),
    ({"prune": {"structure": "heads_ffn", "sparsity": 0.55}}, {}, "student.prune.sparsity"),
    # tiny-teacher: 4 layers x 4 heads; 90 % would leave 1 head where min_heads_per_layer keeps 4
    ({"prune": {"structure": "heads_ffn", "sparsity": 0.9}}, {}, "student.prune.sparsity"),
    ({"prune": {"contrastive": ["fic"]}}, {"methods": ["student_ft"]}, "student.prune.contrastive"),
    ({"prune": {"init": "teacher", "contrastive": []}}, {"methods": ["student_ft"]}, "student.prune.init"),
    ({"prune": {"sparsity": 1.0}}, {}, "student.prune.sparsity"),
    ({"prune": {"contrastive": ["prc", "xyz"]}}, {}, "student.prune.contrastive"),
    ({"prune": {"dense_epochs": 5, "final_epochs": 6}}, {}, "student.prune.final_epochs"),
    ({"prune": {"normalize": "mean"}}, {}, "student.prune.normalize"),
])
def test_refusals_name_the_field(student, top, field):
    assert _error(_with(student, **top)).startswith(field + ":")


def test_fic_free_pruning_is_allowed_for_student_ft():
    cfg = from_dict(_with({"prune": {"contrastive": ["prc", "snc"]}}, methods=["student_ft"]))
    assert cfg.student.prune.contrastive == ["prc", "snc"]


def test_student_grid_mixes_presets_sizes_and_prune_blocks():
    raw = _with("tiny-student", search={"algorithm": "grid", "params": {"student": {"type": "grid", "values": [
        "tiny-student", {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64},
        {"prune": {"sparsity": 0.5}}, {"prune": {"structure": "heads_ffn", "sparsity": 0.5}}]}}})
    cfg = from_dict(raw)
    probe = copy.deepcopy(cfg)
    set_path(probe, "student", {"prune": {"structure": "heads_ffn", "sparsity": 0.5}})
    assert probe.student.prune.structure == "heads_ffn" and probe.student.preset is None
    bad = copy.deepcopy(raw)
    bad["search"]["params"]["student"]["values"].append({"prune": {"sparsity": 0.5}, "preset": "tiny-student"})
    assert "student.preset" in _error(bad)


def test_sparsity_is_a_searchable_dotted_path():
    assert get_path(ExperimentConfig(), "student.prune.sparsity") == PruneConfig().sparsity
    cfg = from_dict({**BASE, "search": {"algorithm": "grid", "params": {
        "student.prune.sparsity": {"type": "grid", "values": [0.5, 0.9]}}}})
    set_path(cfg, "student.prune.sparsity", 0.9)
    assert cfg.student.prune.sparsity == 0.9
    # over a dense base student the path creates a prune block, which the preset then refuses
    msg = _error({"name": "p", "search": {"algorithm": "grid", "params": {
        "student.prune.sparsity": {"type": "grid", "values": [0.5]}}}})
    assert "search.params.student.prune.sparsity" in msg and "student.preset" in msg


def _value_for(name, value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * 0.5 if isinstance(value, float) and value > 0 else value + 1
    return {"criterion": "magnitude", "contrastive": ["prc"], "init": "teacher", "base_loss": "cap",
            "normalize": "anchor_mean", "structure": None}[name]


def test_student_key_changes_with_every_field_it_reads_and_the_teacher_key_does_not():
    cfg = from_dict(BASE)
    key = _student_key(cfg)
    dense = from_dict({**BASE, "student": "tiny-student"})
    assert _student_key(dense) != key
    assert teacher_spec(cfg, "metakd", "alpha", 0).key == teacher_spec(dense, "metakd", "alpha", 0).key
    for name, value in cfg.student.prune.used().items():
        if name == "structure":
            continue  # heads_ffn: below
        changed = copy.deepcopy(cfg)
        setattr(changed.student.prune, name, _value_for(name, value))
        if name == "sparsity":
            changed.student.prune.sparsity = 0.25
        changed.validate()
        assert _student_key(changed) != key, name
        assert teacher_spec(changed, "metakd", "alpha", 0).key == teacher_spec(cfg, "metakd", "alpha", 0).key
    # a field this block does not read (heads_ffn's step) and the distill stages leave the key alone
    same = copy.deepcopy(cfg)
    same.student.prune.step = 0.25
    same.distill.stage2_epochs += 1
    same.distill.schedule = "joint"
    assert _student_key(same.validate()) == key
    heads = from_dict(_with({"prune": {"structure": "heads_ffn", "sparsity": 0.5}}))
    assert _student_key(heads) != key
    moved = copy.deepcopy(heads)
    moved.student.prune.step = 0.25
    assert _student_key(moved.validate()) != _student_key(heads)


def test_dense_student_keys_do_not_see_the_prune_field():
    dense = from_dict({**BASE, "student": "tiny-student"})
    ident = student_identity(dense, "metakd", "alpha", 0, "t")
    assert "prune" not in ident["student"]
    assert set(ident["student"]) == {f.name for f in dataclasses.fields(dense.student)} - {"prune"}


def test_cap_base_loss_leaves_the_method_loss_settings_out_of_the_key():
    cfg = from_dict(_with({"prune": {"base_loss": "cap"}}))
    key = _student_key(cfg)
    other = copy.deepcopy(cfg)
    other.distill.temperature, other.distill.gamma2 = 4.0, 0.1
    assert _student_key(other.validate()) == key
    method = from_dict(BASE)
    moved = copy.deepcopy(method)
    moved.distill.temperature = 4.0
    assert _student_key(moved.validate()) != _student_key(method)


def test_preflight_checks_heads_ffn_against_a_local_checkpoint(tmp_path):
    from transformers import BertConfig

    from metakd.preflight import check_layers

    BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64).save_pretrained(tmp_path)
    ok = from_dict({"teacher": {"checkpoint": str(tmp_path)},
                    "student": {"prune": {"structure": "heads_ffn", "sparsity": 0.75, "step": 0.25}}})
    check_layers(ok)  # 6 of 8 heads go, one per layer stays
    too_many = copy.deepcopy(ok)
    too_many.student.prune.sparsity, too_many.student.prune.step = 0.9, 0.3
    with pytest.raises(ConfigError, match=r"^student.prune.sparsity:.*min_heads_per_layer"):
        check_layers(too_many)  # floor(0.9 * 8) = 7 of 8 would go

"""The table of methods (metakd/methods.py): what each method trains and what its student key reads."""

import pytest

from metakd.config import ExperimentConfig
from metakd.jobs.experiment import student_identity
from metakd.methods import DISTILL_FIELDS, METHOD_NAMES, METHODS, TEACHER_KINDS, method
from metakd.report.analysis import METHODS as TABLE_ORDER
from metakd.train.teacher import teacher_spec


def test_every_method_names_a_known_teacher_kind_and_tables_share_one_order():
    assert set(METHOD_NAMES) == {"metakd", "metakd_no_target", "kd_single", "kd_mix", "kd_mtl", "student_ft"}
    assert tuple(TABLE_ORDER) == METHOD_NAMES and METHOD_NAMES[-1] == "metakd"
    for m in METHODS.values():
        assert m.teacher is None or m.teacher in TEACHER_KINDS


def test_teacher_kind_domains():
    domains = ["a", "b", "c"]
    assert TEACHER_KINDS["single"].domain_ids("b", domains) == [1]
    assert TEACHER_KINDS["meta_no_target"].domain_ids("b", domains) == [0, 2]
    assert TEACHER_KINDS["meta"].domain_ids(None, domains) == [0, 1, 2]
    assert [k for k, v in TEACHER_KINDS.items() if v.per_domain] == ["meta_no_target", "single"]
    assert [k for k, v in TEACHER_KINDS.items() if v.meta] == ["meta", "meta_no_target"]


def test_unknown_method_names_the_allowed_ones():
    with pytest.raises(KeyError, match="allowed: student_ft, kd_single"):
        method("kd_singel")


def test_teacher_specs_follow_the_table():
    cfg = ExperimentConfig()
    assert teacher_spec(cfg, "student_ft", "a", 0) is None
    assert teacher_spec(cfg, "kd_single", "a", 0).domain == "a"
    assert teacher_spec(cfg, "metakd", "a", 0).domain is None
    # one meta-teacher for every domain's student, one single-domain teacher per domain
    assert teacher_spec(cfg, "metakd", "a", 0).key == teacher_spec(cfg, "metakd", "b", 0).key
    assert teacher_spec(cfg, "kd_single", "a", 0).key != teacher_spec(cfg, "kd_single", "b", 0).key


@pytest.mark.parametrize("name, reads_gamma2, reads_stage1", [
    ("metakd", True, True), ("metakd_no_target", True, True), ("kd_single", False, True),
    ("kd_mix", False, True), ("kd_mtl", False, True), ("student_ft", False, False)])
def test_student_keys_read_only_the_settings_their_method_reads(name, reads_gamma2, reads_stage1):
    distill = student_identity(ExperimentConfig(), name, "a", 0, "t")["distill"]
    assert ("gamma2" in distill) == reads_gamma2
    assert ("stage1_epochs" in distill) == reads_stage1
    assert "epochs" in distill and "lr" in distill  # fine-tuning settings: every student reads them
    if name == "student_ft":
        assert not set(distill) & set(DISTILL_FIELDS)

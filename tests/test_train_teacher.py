"""Teachers: keys (what a teacher depends on) and prototype scores t_i."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metakd.config import ModelConfig, from_dict
from metakd.data import EncodedSplit
from metakd.models import build_teacher
from metakd.train.features import encoder_features
from metakd.train.runtime import LocalRuntime
from metakd.train.teacher import compute_prototype_scores, teacher_spec

pytestmark = pytest.mark.usefixtures("single_thread_torch")

VOCAB, SEQ = 80, 12


def _cfg(**over):
    return from_dict(over)


# ----------------------------------------------------------------------------- teacher keys


def test_teacher_keys_ignore_student_settings_but_not_teacher_settings():
    def key(method="metakd", domain="a", seed=0, **over):
        return teacher_spec(_cfg(**over), method, domain, seed).key

    base = key()
    assert key(domain="b") == base  # one meta-teacher for every target
    assert key(distill={"gamma2": 0.0}) == base
    assert key(distill={"schedule": "joint", "stage2_lr": 1e-4}) == base
    assert key(student="tiny-student-1l") == base
    assert key(methods=["metakd", "kd_single"]) == base
    assert key(meta_teacher={"gamma1": 0.1}) != base
    assert key(data={"sample_rate": 0.5}) != base
    assert key(seed=1) != base
    assert key(teacher={"epochs": 4}) != base
    # baseline teachers do not depend on the meta-teacher's loss settings, but on the target domain
    single = key("kd_single")
    assert key("kd_single", meta_teacher={"gamma1": 0.1}) == single
    assert key("kd_single", domain="b") != single
    assert key("metakd_no_target") != key("metakd_no_target", domain="b")


# ----------------------------------------------------------------------------- prototype scores


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_teacher(ModelConfig(preset="tiny-teacher"), VOCAB, SEQ, 2, 2).eval()


def _split(n_per_domain=4):
    n = 2 * n_per_domain
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)
    domains = torch.tensor([0] * n_per_domain + [1] * n_per_domain)
    return EncodedSplit(ids, torch.ones(n, SEQ, dtype=torch.long), torch.zeros(n, SEQ, dtype=torch.long),
                        labels=torch.tensor([0, 1] * n_per_domain), domains=domains)


def _features(model, split):
    """E(x) of the frozen model, rows by index (what metakd.train.features stores)."""
    return encoder_features(model, split, LocalRuntime("cpu"))


def test_prototype_weighting_false_gives_ones():
    cfg = _cfg(meta_teacher={"prototype_weighting": False})
    scores = compute_prototype_scores(torch.zeros(8, 0), _split(), [0, 1], cfg)
    assert torch.equal(scores, torch.ones(8))


def test_prototype_scores_for_a_subset_of_domains(teacher):
    split = _split()
    scores = compute_prototype_scores(_features(teacher, split), split, [0], _cfg())
    assert torch.equal(scores[4:], torch.ones(4))  # domain 1 is not among the teacher's domains
    teacher.eval()
    with torch.no_grad():
        feats = teacher(**split.for_domains([0]).to_dict()).features
    labels = split.labels[:4]
    # one domain: K' = 1, t_i = cos(E_i, p[d_i, y_i])
    for i in range(4):
        proto = feats[labels == labels[i]].mean(0)
        assert scores[i] == pytest.approx(float(F.cosine_similarity(feats[i], proto, dim=0)), abs=1e-5)

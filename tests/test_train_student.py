"""The Distiller's loss steps against the spec's formulas, computed by hand from a teacher and a student."""

from __future__ import annotations

import pytest
import torch

from metakd.config import ModelConfig, from_dict
from metakd.models import build_student, build_teacher
from metakd.train.distill import Distiller

pytestmark = pytest.mark.usefixtures("single_thread_torch")


VOCAB, SEQ = 80, 12


def _cfg(**over):
    return from_dict(over)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    teacher = build_teacher(ModelConfig(preset="tiny-teacher"), VOCAB, SEQ, 2, 2).eval()
    student = build_student(ModelConfig(preset="tiny-student"), teacher, VOCAB, SEQ).eval()  # eval: no dropout
    g = torch.Generator().manual_seed(1)
    n = 6
    ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[:2, 7:] = 0
    batch = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
             "labels": torch.tensor([0, 1, 1, 0, 1, 0]), "domains": torch.tensor([0, 1, 0, 1, 0, 1]),
             "index": torch.tensor([5, 0, 3, 1, 4, 2])}
    scores = torch.tensor([0.9, -0.2, 0.4, 0.1, 0.7, 0.3])  # t_i indexed by batch["index"]
    return teacher, student, batch, scores


def _lambda(teacher, batch, scores):
    p = teacher(**batch).logits.softmax(-1).gather(1, batch["labels"][:, None]).squeeze(1)
    t = scores[batch["index"]]
    return (1 + t) / (1 + torch.exp((1 - p) ** 2))


def _soft_ce(student, teacher, batch, temperature=1.0):
    zs, zt = student(**batch).logits / temperature, teacher(**batch).logits / temperature
    return -(zt.softmax(-1) * zs.log_softmax(-1)).sum(-1)


def _intermediate(student, teacher, batch, attention="scores"):
    """L_embd + sum_j (L_hidn + L_attn) by the spec's formulas, g(j) = 2j for 2 vs 4 layers; the maps are
    ``attention`` (pre-softmax scores, the default, or probabilities)."""
    s = student(**batch, output_states=True, attention=attention)
    t = teacher(**batch, output_states=True, attention=attention)
    m = batch["attention_mask"].float()
    n_tok = m.sum(1)

    def hid(a, b):
        return ((student.hidden_proj(a) - b) ** 2).sum(-1).mul(m).sum(1) / (n_tok * b.shape[-1])

    def att(a, b):  # 2 vs 4 heads: compare head-averaged maps
        pairs = m[:, :, None] * m[:, None, :]
        return ((a.mean(1) - b.mean(1)) ** 2).mul(pairs).sum((1, 2)) / pairs.sum((1, 2))

    per = hid(s.hidden_states[0], t.hidden_states[0])
    for j, g in ((1, 2), (2, 4)):
        per = per + hid(s.hidden_states[j], t.hidden_states[g]) + att(s.attentions[j - 1], t.attentions[g - 1])
    tkd = ((student.repr_proj(s.domain_repr) - t.domain_repr) ** 2).mean(-1)
    return per, tkd


@torch.no_grad()
def test_distiller_weights_are_ones_without_meta(pair):
    teacher, student, batch, scores = pair
    d = Distiller(teacher, student, _cfg(), meta=False, scores=None)
    assert d.gamma2 == 0.0 and d.layers == [2, 4]
    assert torch.allclose(d.stage2(student, batch), _soft_ce(student, teacher, batch).mean(), atol=1e-6)
    per, _ = _intermediate(student, teacher, batch)
    assert torch.allclose(d.stage1(student, batch), per.mean(), rtol=1e-5)


@torch.no_grad()
def test_distiller_weights_are_domain_expertise_with_meta(pair):
    teacher, student, batch, scores = pair
    d = Distiller(teacher, student, _cfg(distill={"gamma2": 0.7}), meta=True, scores=scores)
    assert d.gamma2 == 0.7
    lam = _lambda(teacher, batch, scores)
    assert torch.allclose(d.stage2(student, batch), (lam * _soft_ce(student, teacher, batch)).mean(), atol=1e-6)
    per, tkd = _intermediate(student, teacher, batch)
    assert torch.allclose(d.stage1(student, batch), (lam * (per + 0.7 * tkd)).mean(), rtol=1e-5)
    # joint = the whole L_KD at once: the same weights on the sum of both stages' terms
    assert torch.allclose(d.joint(student, batch), d.stage1(student, batch) + d.stage2(student, batch), rtol=1e-5)


@torch.no_grad()
def test_distiller_temperature_scales_the_prediction_loss(pair):
    teacher, student, batch, _ = pair
    d = Distiller(teacher, student, _cfg(distill={"temperature": 3.0}), meta=False, scores=None)
    assert torch.allclose(d.stage2(student, batch), _soft_ce(student, teacher, batch, 3.0).mean(), atol=1e-6)


def _divergence(kind, student, teacher, batch):
    log_p, log_q = teacher(**batch).logits.log_softmax(-1), student(**batch).logits.log_softmax(-1)
    p, q = log_p.exp(), log_q.exp()
    if kind == "rkl":
        return (q * (log_q - log_p)).sum(-1)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    m = (p + q) / 2
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


@pytest.mark.parametrize("kind", ["rkl", "js", "tvd"])
def test_distiller_pred_loss_variants(pair, kind):
    teacher, student, batch, scores = pair
    d = Distiller(teacher, student, _cfg(distill={"pred_loss": kind}), meta=True, scores=scores)
    loss = d.stage2(student, batch)
    with torch.no_grad():
        expected = (_lambda(teacher, batch, scores) * _divergence(kind, student, teacher, batch)).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()  # the student gets gradients, the frozen teacher none
    assert student.classifier.weight.grad is not None and student.classifier.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- the released code's forms


def _pre_tanh_tkd(student, teacher, batch):
    """MSE(W_h (W_r,S (E_S(x) + e_S[d]) + b_r,S), W_r,T (E_T(x) + e_T[d]) + b_r,T) per example: the released
    code's L_TKD on r(x) before its tanh, the student's mapped by the hidden-state map W_h, not W_d."""
    def pre(model):
        e = model(**batch).features  # mean_pool(H_last)
        return model.domain_proj(e + model.domain_embedding(batch["domains"]))
    return ((student.hidden_proj(pre(student)) - pre(teacher)) ** 2).mean(-1)


@torch.no_grad()
def test_pred_weighting_none_is_the_plain_batch_mean_for_meta_students(pair):
    teacher, student, batch, scores = pair
    d = Distiller(teacher, student, _cfg(distill={"pred_weighting": "none"}), meta=True, scores=scores)
    ce = _soft_ce(student, teacher, batch)
    assert torch.allclose(d.stage2(student, batch), ce.mean(), atol=1e-6)
    lam = _lambda(teacher, batch, scores)
    assert not torch.allclose(ce.mean(), (lam * ce).mean(), atol=1e-3)  # the option changes the loss
    # joint: the layer terms stay lambda-weighted, L_pred is added unweighted
    per, tkd = _intermediate(student, teacher, batch)
    assert torch.allclose(d.joint(student, batch), (lam * (per + 0.5 * tkd)).mean() + ce.mean(), rtol=1e-5)


@torch.no_grad()
def test_tkd_pre_tanh_shared_weights_the_batch_by_mean_lambda(pair):
    teacher, student, batch, scores = pair
    d = Distiller(teacher, student, _cfg(distill={"tkd": "pre_tanh_shared", "gamma2": 0.7}), meta=True,
                  scores=scores)
    lam = _lambda(teacher, batch, scores)
    per, tanh_tkd = _intermediate(student, teacher, batch)
    pre = _pre_tanh_tkd(student, teacher, batch)
    expected = (lam * per).mean() + 0.7 * lam.mean() * pre.mean()
    assert torch.allclose(d.stage1(student, batch), expected, rtol=1e-5)
    assert not torch.allclose(pre, tanh_tkd, rtol=1e-2)  # another quantity than the spec's tanh form
    assert student.hidden_proj is not student.repr_proj


@pytest.mark.parametrize("option", [{"pred_weighting": "none"}, {"tkd": "pre_tanh_shared"}])
@torch.no_grad()
def test_the_meta_only_options_leave_baseline_students_unchanged(pair, option):
    teacher, student, batch, _ = pair
    plain = Distiller(teacher, student, _cfg(), meta=False, scores=None)
    other = Distiller(teacher, student, _cfg(distill=option), meta=False, scores=None)
    for step in ("stage1", "stage2", "joint"):
        assert torch.equal(getattr(plain, step)(student, batch), getattr(other, step)(student, batch)), step


@torch.no_grad()
def test_stage1_fits_the_maps_distill_attention_names(pair):
    teacher, student, batch, _ = pair
    losses = {}
    for attention in ("scores", "probs"):
        d = Distiller(teacher, student, _cfg(distill={"attention": attention}), meta=False, scores=None)
        per, _ = _intermediate(student, teacher, batch, attention)
        losses[attention] = d.stage1(student, batch)
        assert torch.allclose(losses[attention], per.mean(), rtol=1e-5), attention
    assert losses["scores"] != losses["probs"]

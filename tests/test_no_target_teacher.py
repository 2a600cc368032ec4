"""The no-target meta-teacher never trains the target's domain embedding e[k]; its r_T for the
target uses the mean of the trained domains' rows (README, "Methods")."""

from __future__ import annotations

import json

import pytest
import torch

from metakd.config import from_dict
from metakd.data import prepare
from metakd.models import build_teacher, load_model
from metakd.train.runtime import LocalRuntime
from metakd.train.teacher import fill_unseen_domain_embeddings, teacher_spec, train_one_teacher

pytestmark = pytest.mark.usefixtures("single_thread_torch")

CFG = {
    "name": "nt", "methods": ["metakd_no_target"], "seeds": [0], "device": "cpu",
    "data": {"max_length": 16, "vocab_size": 200,
             "synthetic": {"num_domains": 3, "examples_per_domain": 60, "words_per_example": 10}},
    "teacher": {"preset": "tiny-teacher", "epochs": 1, "lr": 1e-3, "batch_size": 16},
}


def test_unseen_domains_get_the_mean_of_the_trained_rows_and_nothing_else_changes():
    cfg = from_dict(CFG)
    model = build_teacher(cfg.teacher, 50, 16, 2, 4)
    before = model.state_dict()["domain_embedding.weight"].clone()
    fill_unseen_domain_embeddings(model, [0, 2])
    after = model.domain_embedding.weight.detach()
    torch.testing.assert_close(after[1], (before[0] + before[2]) / 2)
    torch.testing.assert_close(after[3], (before[0] + before[2]) / 2)
    assert torch.equal(after[[0, 2]], before[[0, 2]])
    fill_unseen_domain_embeddings(model, [0, 1, 2, 3])  # every domain trained: unchanged
    assert torch.equal(model.domain_embedding.weight.detach(), after)


def test_no_target_teachers_r_for_the_target_uses_the_mean_trained_embedding(tmp_path):
    cfg = from_dict(CFG)
    prepared = prepare(cfg.data, 0, None, cache_dir=str(tmp_path / "data"))
    assert prepared.data.domains == ["alpha", "beta", "gamma"]
    spec = teacher_spec(cfg, "metakd_no_target", "alpha", 0)
    torch.manual_seed(0)  # the teacher's initial e[alpha], to tell it apart from the saved one
    initial = build_teacher(cfg.teacher, len(prepared.tokenizer), 16, 2, 3).domain_embedding.weight.detach().clone()
    summary = train_one_teacher(spec, cfg, prepared, LocalRuntime("cpu", log=lambda *a, **k: None), str(tmp_path / "t"))
    assert summary["trained_domains"] == ["beta", "gamma"]
    assert json.loads((tmp_path / "t" / "model.json").read_text())["trained_domains"] == ["beta", "gamma"]

    teacher = load_model(tmp_path / "t").eval()
    e = teacher.domain_embedding.weight.detach()
    assert not torch.allclose(e[1:], initial[1:])  # the trained rows moved (L_TDA)
    mean_e = (e[1] + e[2]) / 2
    torch.testing.assert_close(e[0], mean_e)
    assert not torch.allclose(e[0], initial[0])  # no longer its random initialisation

    target = prepared.train.for_domains([0])
    batch = {f: getattr(target, f)[:12] for f in ("input_ids", "attention_mask", "token_type_ids", "domains")}
    with torch.no_grad():
        r_t = teacher(**batch).domain_repr
        # r(x) = tanh(W_r (mean_pool(H_last(x)) + mean_{j trained} e[j]) + b_r), computed by hand
        h = teacher.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            token_type_ids=batch["token_type_ids"]).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1)
        expected = torch.tanh((pooled + mean_e) @ teacher.domain_proj.weight.T + teacher.domain_proj.bias)
    torch.testing.assert_close(r_t, expected, rtol=1e-5, atol=1e-6)

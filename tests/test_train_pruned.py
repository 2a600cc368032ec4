"""The pruned-student training path (cap-pruning spec §5 item 3): its banks, its start, its loss, a run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from metakd.config import ModelConfig, from_dict
from metakd.data import EncodedSplit
from metakd.losses import attention_mse
from metakd.models import build_teacher
from metakd.pruning.masks import HeadFFNGates
from metakd.train.features import encoder_features
from metakd.train.pruned import PrunedDistiller, PrunedStudent, bank_of
from metakd.train.runtime import LocalRuntime

VOCAB, SEQ, N = 90, 12, 10

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _split() -> EncodedSplit:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, VOCAB, (N, SEQ), generator=g)
    mask = (torch.arange(SEQ)[None] < torch.randint(3, SEQ + 1, (N,), generator=g)[:, None]).long()
    return EncodedSplit(ids * mask, mask, torch.zeros_like(ids), labels=torch.arange(N) % 2,
                        domains=torch.zeros(N, dtype=torch.long), index=torch.arange(N) * 3 + 1)


def _prepared():
    return SimpleNamespace(tokenizer=[None] * VOCAB, data=SimpleNamespace(num_labels=2, domains=["a", "b"]))


def _cfg(pooling="cls", **prune):
    return from_dict({"data": {"max_length": SEQ}, "student": {"pooling": pooling, "prune": {"sparsity": 0.5, **prune}}})


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_prc_bank_is_the_initial_teacher_encoder(pooling):
    cfg, runtime, split = _cfg(pooling), LocalRuntime("cpu"), _split()
    student = PrunedStudent(cfg, 3, 0, _prepared(), None, runtime).build()
    bank = bank_of(student, split, runtime)
    # what the seed-3 teacher job starts from (train_one_teacher: manual_seed, then build_teacher)
    torch.manual_seed(3)
    initial = build_teacher(cfg.teacher, VOCAB, SEQ, 2, 2).eval()
    if pooling == "mean":  # the meta-teacher's prototype features E(x), normalised
        want = encoder_features(initial, split, runtime)
    else:
        with torch.no_grad():
            want = initial.encoder(input_ids=split.input_ids, attention_mask=split.attention_mask,
                                   token_type_ids=split.token_type_ids).pooler_output
    torch.testing.assert_close(bank.vectors[:, 0], F.normalize(want, dim=-1), atol=1e-5, rtol=0)
    assert bank.rows(torch.tensor([28, 1])).tolist() == [9, 0]  # rows by the example's index
    assert bank.labels.tolist() == split.labels.tolist()


def test_fic_bank_is_the_trained_teacher():
    runtime, split = LocalRuntime("cpu"), _split()
    torch.manual_seed(5)
    teacher = build_teacher(ModelConfig(preset="tiny-teacher"), VOCAB, SEQ, 2, 2).eval()
    with torch.no_grad():
        for p in teacher.encoder.pooler.parameters():
            p.add_(0.1)  # not the initial weights of any seed
        pooled = teacher.encoder(input_ids=split.input_ids, attention_mask=split.attention_mask,
                                 token_type_ids=split.token_type_ids).pooler_output
    bank = bank_of(teacher, split, runtime)
    torch.testing.assert_close(bank.vectors[:, 0], F.normalize(pooled, dim=-1), atol=1e-5, rtol=0)


def test_init_teacher_copies_the_target_head_of_a_multitask_teacher():
    cfg = _cfg(init="teacher")
    torch.manual_seed(0)
    teacher = build_teacher(ModelConfig(preset="tiny-teacher"), VOCAB, SEQ, 2, 2, multitask=True).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = PrunedStudent(cfg, 0, 1, _prepared(), teacher, LocalRuntime("cpu")).build().eval()
    batch = {k: v for k, v in _split().to_dict().items() if k != "labels"}
    batch["domains"] = torch.ones(N, dtype=torch.long)  # the target domain, id 1
    torch.testing.assert_close(student(**batch).logits, teacher(**batch).logits)
    assert all(p.requires_grad for p in student.parameters())
    assert student.encoder is not teacher.encoder


def test_attention_loss_compares_only_the_kept_heads():
    cfg = from_dict({"distill": {"attention": "probs"}, "student": {"prune": {"structure": "heads_ffn",
                                                                               "sparsity": 0.5}}})
    torch.manual_seed(0)
    teacher = build_teacher(ModelConfig(preset="tiny-teacher"), VOCAB, SEQ, 2, 2).eval()
    student = PrunedStudent(cfg, 0, 0, _prepared(), teacher, LocalRuntime("cpu")).build().eval()
    d = PrunedDistiller(teacher, student, cfg, False, None)
    d.gates = gates = HeadFFNGates(student.encoder)
    gates.heads[0, 1:] = 0
    gates.heads[2, :2] = 0
    batch = _split().to_dict()
    with torch.no_grad():
        s_out = student(**batch, output_states=True, attention="probs")
        t = d._targets(batch, True)
        got = d._layers(student, s_out, t, batch["attention_mask"])
        hidden = d._layers(student, s_out, SimpleNamespace(**{**vars(t), "attentions": s_out.attentions}),
                           batch["attention_mask"])  # the same maps on both sides: hidden terms only
        kept = [[0], [0, 1, 2, 3], [2, 3], [0, 1, 2, 3]]
        attn = sum(attention_mse(s_out.attentions[j][:, kept[j]], t.attentions[j][:, kept[j]], batch["attention_mask"])
                   for j in range(4))
    torch.testing.assert_close(got, hidden + attn, atol=1e-6, rtol=1e-5)


SMALL = {
    "name": "prunetest", "methods": ["kd_single"], "seeds": [0], "device": "cpu",
    "data": {"domains": ["alpha"], "max_length": 16, "vocab_size": 300,
             "synthetic": {"num_domains": 2, "examples_per_domain": 60, "words_per_example": 10,
                           "shared_vocab": 30, "domain_vocab": 10, "label_noise": 0.0}},
    "teacher": {"preset": "tiny-teacher", "epochs": 1, "lr": 2e-3, "batch_size": 16},
    "distill": {"batch_size": 16},
}


@pytest.mark.parametrize("prune, snapshots", [
    ({"sparsity": 0.5, "epochs": 3, "dense_epochs": 1, "final_epochs": 1, "lr": 3e-3}, 2),  # E - 1
    ({"structure": "heads_ffn", "sparsity": 0.75, "step": 0.25, "retrain_epochs": 1, "lr": 3e-3}, 2),  # steps - 1
])
def test_a_pruned_student_trains_and_reports_its_sparsity(tmp_path, prune, snapshots):
    from metakd.jobs.run import run_local

    cfg = from_dict({**SMALL, "output_dir": str(tmp_path), "student": {"prune": prune}})
    out = run_local(cfg, log=lambda *a: None)
    (result,) = out["students"]
    assert result["snc_snapshots"] == snapshots
    assert result["student_nonzero_params"] < result["student_params"]
    target = prune["sparsity"]
    assert result["prune_achieved"] == pytest.approx(target, abs=1e-3)
    assert 1 - target < result["encoder_remaining"] < 1 - target + 0.03  # biases and LayerNorm stay
    assert result["latency_kind"] == ("physical" if "structure" in prune else "dense_masked")
    row = next(r for r in out["rows"] if r["split"] == "test")
    assert row["prune_structure"] == prune.get("structure", "unstructured") and row["prune_target"] == target
    assert row["prune_contrastive"] == "prc+snc+fic" and row["student"].startswith("pruned ")
    assert {c["stage"] for c in result["curve"]} == {"prune"}


def _stored_teacher(tmp_path, with_pooled=True):
    """A trained-looking teacher saved with its outputs on the split (as train_one_teacher publishes it)."""
    from metakd.train.teacher_cache import compute_outputs, save_outputs

    torch.manual_seed(5)
    teacher = build_teacher(ModelConfig(preset="tiny-teacher"), VOCAB, SEQ, 2, 2).eval()
    with torch.no_grad():
        for p in teacher.encoder.pooler.parameters():
            p.add_(0.1)  # not the initial weights of any seed
    for p in teacher.parameters():
        p.requires_grad_(False)
    outputs = compute_outputs(teacher, _split(), LocalRuntime("cpu"))
    if not with_pooled:  # a teacher published before z_T was stored
        outputs.pop("pooled")
    save_outputs(outputs, str(tmp_path), "data")
    return teacher


def _stored_prepared():
    return SimpleNamespace(**vars(_prepared()), key="data", train=_split())


def test_fic_bank_is_read_from_the_teacher_outputs(tmp_path, monkeypatch):
    from metakd.train import pruned
    from metakd.train.teacher_cache import stored_pooled

    split, runtime = _split(), LocalRuntime("cpu")
    teacher = _stored_teacher(tmp_path)
    with torch.no_grad():
        want = teacher.encoder(input_ids=split.input_ids, attention_mask=split.attention_mask,
                               token_type_ids=split.token_type_ids).pooler_output  # z_T: its cls pooling
    rows = stored_pooled(str(tmp_path), "data")
    assert rows.shape == (3 * (N - 1) + 2, 64)  # by index, as the other outputs
    torch.testing.assert_close(rows[split.index], want, atol=1e-5, rtol=0)
    assert stored_pooled(str(tmp_path), "other-data") is None and stored_pooled(None, "data") is None
    encoded = bank_of(teacher, split, runtime)
    job = PrunedStudent(_cfg(contrastive=["fic"]), 0, 0, _stored_prepared(), teacher, runtime)
    with monkeypatch.context() as m:
        m.setattr(pruned, "bank_of", lambda *a, **k: pytest.fail("FiC encoded although the teacher stores z_T"))
        job.fixed_banks(job.build(), str(tmp_path), split)
    torch.testing.assert_close(job.banks["fic"].vectors, encoded.vectors, atol=1e-6, rtol=0)
    assert job.banks["fic"].labels.tolist() == split.labels.tolist() and "prc" not in job.banks


def test_fic_bank_of_a_teacher_without_stored_rows_is_encoded(tmp_path):
    split, runtime = _split(), LocalRuntime("cpu")
    teacher = _stored_teacher(tmp_path, with_pooled=False)
    job = PrunedStudent(_cfg(contrastive=["fic"]), 0, 0, _stored_prepared(), teacher, runtime)
    job.fixed_banks(job.build(), str(tmp_path), split)
    torch.testing.assert_close(job.banks["fic"].vectors, bank_of(teacher, split, runtime).vectors, atol=1e-6, rtol=0)


def test_prc_rows_with_mean_pooling_are_the_stored_prototype_features(tmp_path, monkeypatch):
    from metakd.storage import Store
    from metakd.train import features, pruned
    from metakd.train.features import features_key, prototype_features

    store, runtime, split = Store(str(tmp_path)), LocalRuntime("cpu"), _split()
    cfg = _cfg("mean", contrastive=["prc"])
    first = PrunedStudent(cfg, 3, 0, _stored_prepared(), None, runtime, store)
    first.fixed_banks(first.build(), None, split)
    assert store.list_dirs("features") == [features_key(cfg, 3, "data", "cpu")]  # the prototype features' artifact
    # a meta-teacher of the same initial encoder loads them, and they are E(x) itself, not normalised
    torch.manual_seed(3)
    initial = build_teacher(cfg.teacher, VOCAB, SEQ, 2, 2).eval()
    monkeypatch.setattr(features, "encoder_features", lambda *a, **k: pytest.fail("features encoded again"))
    stored = prototype_features(initial, _stored_prepared(), cfg, 3, runtime, store)
    with torch.no_grad():
        direct = initial(**split.to_dict()).features
    torch.testing.assert_close(stored[split.index], direct, atol=1e-5, rtol=0)
    # another job (another method, another domain's student) reads the rows: nothing encoded
    monkeypatch.setattr(pruned, "pooled_rows", lambda *a, **k: pytest.fail("PrC encoded again"))
    again = PrunedStudent(cfg, 3, 1, _stored_prepared(), None, runtime, store)
    again.fixed_banks(again.build(), None, split)
    torch.testing.assert_close(again.banks["prc"].vectors, first.banks["prc"].vectors, atol=0, rtol=0)
    torch.testing.assert_close(first.banks["prc"].vectors[:, 0], F.normalize(direct, dim=-1), atol=1e-5, rtol=0)


def test_prc_rows_with_cls_pooling_have_their_own_key_per_seed(tmp_path):
    from metakd.storage import Store
    from metakd.train.features import features_key, pooled_key

    store, runtime, split = Store(str(tmp_path)), LocalRuntime("cpu"), _split()
    cfg = _cfg("cls", contrastive=["prc"])
    for seed in (3, 4):
        job = PrunedStudent(cfg, seed, 0, _stored_prepared(), None, runtime, store)
        student = job.build()
        job.fixed_banks(student, None, split)
        torch.testing.assert_close(job.banks["prc"].vectors, bank_of(student, split, runtime).vectors, atol=1e-6,
                                   rtol=0)
    keys = store.list_dirs("features")
    assert keys == sorted(pooled_key(cfg, s, "data", "cpu", "cls") for s in (3, 4))
    assert features_key(cfg, 3, "data", "cpu") not in keys
    assert pooled_key(cfg, 3, "data", "cpu", "mean") == features_key(cfg, 3, "data", "cpu")

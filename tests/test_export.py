"""Keeping every student, ``metakd export`` (standard transformers / ONNX directories, model card) and
``metakd predict``, on a tiny ``metakd run`` and on hand-built models; transformers loads from local files only."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from metakd.cli import main
from metakd.config import ConfigError, ModelConfig, from_dict
from metakd.data import TextSplit, build_tokenizer, encode, load_full
from metakd.export.hf import Packaging, export_model, route_of
from metakd.export.predict import load_exported
from metakd.export.select import choose
from metakd.jobs.cache import artifact_store
from metakd.models import EncoderClassifier, build_student, build_teacher, load_model, save_model
from metakd.report import results

pytestmark = pytest.mark.usefixtures("single_thread_torch")

TOLERANCE = 1e-5  # max |logit difference| asserted between an exported model and metakd's (fp32; measured 0 / ~1e-7)
TINY = {
    "methods": ["metakd", "kd_single"], "seeds": [0, 1], "device": "cpu",
    "data": {"max_length": 20, "vocab_size": 300,
             "synthetic": {"num_domains": 2, "examples_per_domain": 120, "words_per_example": 12,
                           "shared_vocab": 40, "domain_vocab": 20}},
    "teacher": {"preset": "tiny-teacher", "epochs": 4, "lr": 2e-3, "batch_size": 16},
    "student": {"preset": "tiny-student"},
    "distill": {"stage1_epochs": 1, "stage1_lr": 3e-3, "stage2_epochs": 4, "stage2_lr": 5e-3, "batch_size": 16},
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _run(tmp: Path, name: str, **over) -> Path:
    raw = {**TINY, "name": name, "output_dir": str(tmp / "runs"), **over}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 0
    return tmp / "runs" / name


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """metakd + kd_single on two domains, seeds 0 and 1, students kept (the default)."""
    return _run(tmp_path_factory.mktemp("export"), "kept")


@pytest.fixture(scope="module")
def table(run_root) -> pd.DataFrame:
    return results.load(str(run_root))


@pytest.fixture(scope="module")
def cache(run_root) -> Path:
    """Where the run's artifacts are: the cache of its output_dir (metakd.jobs.cache)."""
    return _cache(run_root)


def _cache(root: Path) -> Path:
    return Path(artifact_store(str(root)).local_root)


def _texts(df: pd.DataFrame, split: str, domain: str) -> TextSplit:
    cfg = from_dict(json.loads(df["config_json"].iloc[0]))
    data = load_full(cfg.data)
    return getattr(data, split).for_domains([data.domains.index(domain)])


def _metakd_logits(model: EncoderClassifier, batch: dict, domain: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            token_type_ids=batch["token_type_ids"],
                            domains=torch.full_like(batch["input_ids"][:, 0], domain)).logits


# ----------------------------------------------------------------------------- keeping students


def test_a_run_keeps_every_student_with_its_result(cache, table):
    keys = set(table["student_key"])
    assert len(keys) == 2 * 2 * 2  # methods x domains x seeds
    assert {p.name for p in (cache / "students").iterdir()} == keys
    for key in keys:
        d = cache / "students" / key
        assert {"_COMPLETE", "result.json", "model.json", "model.safetensors", "tokenizer"} <= {p.name for p in d.iterdir()}
        meta = json.loads((d / "model.json").read_text())
        assert meta["kind"] == "student" and meta["student_key"] == key and meta["max_length"] == 20
        result = json.loads((d / "result.json").read_text())
        assert (meta["method"], meta["domain"], meta["seed"]) == (result["method"], result["domain"], result["seed"])
    # the kept weights are the evaluated student: its test accuracy comes back from them
    row = table[(table["split"] == "test")].iloc[0]
    model = load_model(cache / "students" / row["student_key"])
    part = _texts(table, "test", row["domain"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(cache / "students" / row["student_key"] / "tokenizer"))
    enc = encode(part, tok, 20)
    pred = _metakd_logits(model, enc.to_dict()).argmax(-1)
    assert int((pred == enc.labels).sum()) / len(enc) == row["accuracy"]


def test_a_rerun_reuses_the_kept_students_without_copies(run_root, cache, table, tmp_path):
    weights = {p: p.stat().st_mtime_ns for p in (cache / "students").glob("*/model.safetensors")}
    raw = {**TINY, "name": "kept", "output_dir": str(run_root.parent)}
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (cache / "students").glob("*/model.safetensors")} == weights
    assert set(results.load(str(run_root))["student_key"]) == set(table["student_key"])


def test_students_keep_is_validated_and_part_of_the_student_key():
    from metakd.config import content_hash
    from metakd.jobs.experiment import student_identity

    with pytest.raises(ConfigError, match=r"students\.keep: 'some' is not allowed; expected one of all, none"):
        from_dict({"students": {"keep": "some"}})
    keys = {keep: content_hash(student_identity(from_dict({"students": {"keep": keep}}), "metakd", "a", 0, "t"))
            for keep in ("all", "none")}
    assert keys["all"] != keys["none"]  # a keep: all run never reuses a student stored without weights


# ----------------------------------------------------------------------------- export: cls BERT, from a run


def test_export_best_writes_a_bert_model_that_transformers_loads(run_root, cache, table, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "student"
    assert main(["export", str(run_root), "--method", "metakd", "--domain", "beta", "--best", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    choice = choose(table, "metakd", "beta")
    assert f"chose student {choice.student_key}" in printed and "closest to the mean" in printed
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= \
        {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "0", "1": "1"} and config["label2id"] == {"0": 0, "1": 1}
    weights = load_file(str(out / "model.safetensors"))
    assert not [k for k in weights if "domain" in k or "proj" in k]  # domain head, W_h, W_d dropped
    assert weights["classifier.weight"].shape == (2, 32) and "bert.pooler.dense.weight" in weights

    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    part = _texts(table, "dev", "beta")
    batch = tok(part.texts, truncation=True, padding=True, return_tensors="pt")  # padded to the longest text
    reference = encode(part, tok, 20).to_dict()  # metakd's encoding: padded to max_length
    n = batch["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"], reference["input_ids"][:, :n])
    with torch.no_grad():
        got = hf(**batch).logits
    student = load_model(cache / "students" / choice.student_key)
    want = _metakd_logits(student, reference)
    assert (got - want).abs().max() <= TOLERANCE


def test_model_card_states_what_the_table_holds(run_root, table, tmp_path):
    out = tmp_path / "card"
    assert main(["export", str(run_root), "--method", "metakd", "--domain", "beta", "-o", str(out)]) == 0
    card = (out / "README.md").read_text()
    choice = choose(table, "metakd", "beta")
    rows = table[(table["method"] == "metakd") & (table["domain"] == "beta")]
    for split in ("dev", "test"):
        acc = 100 * rows[rows["split"] == split].set_index("seed")["accuracy"]
        mean, sd = acc.mean(), acc.std(ddof=1)
        half = 12.706204736174707 * sd / np.sqrt(2)  # t_{0.975, 1}
        line = next(li for li in card.splitlines() if li.startswith(f"| {split} |"))
        assert line == (f"| {split} | {acc[choice.seed]:.2f} | {mean:.2f} | {sd:.2f} | "
                        f"[{mean - half:.2f}, {mean + half:.2f}] | 2 |")
    teacher_key = rows["teacher_key"].iloc[0]
    for fragment in ("`metakd`", "`beta`", f"key `{teacher_key}`", "| sample rate | 1.0", "| parameters | 44,322",
                     "ms per example at batch 1", "Paired difference against `kd_single` on `beta`",
                     "AutoModelForSequenceClassification.from_pretrained(DIR)", choice.student_key):
        assert fragment in card, fragment
    config = yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config == choice.config
    paired = rows[rows["split"] == "test"].set_index("seed")["accuracy"] - \
        table[(table["method"] == "kd_single") & (table["domain"] == "beta") & (table["split"] == "test")] \
        .set_index("seed")["accuracy"]
    assert f"**{100 * paired.mean():+.2f} [" in card


def test_export_a_teacher(run_root, cache, table, tmp_path):
    from transformers import AutoModelForSequenceClassification

    key = table.loc[table["method"] == "metakd", "teacher_key"].iloc[0]
    out = tmp_path / "teacher"
    assert main(["export", str(run_root), "--teacher", key, "-o", str(out)]) == 0
    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    teacher = load_model(cache / "teachers" / key)
    batch = encode(_texts(table, "test", "alpha"), load_exported(out).tokenizer, 20).to_dict()
    with torch.no_grad():
        got = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 token_type_ids=batch["token_type_ids"]).logits
    assert (got - _metakd_logits(teacher, batch)).abs().max() <= TOLERANCE
    assert "meta" in (out / "README.md").read_text()


# ----------------------------------------------------------------------------- predict


def test_predict_eval_reproduces_the_test_accuracy_of_the_table(run_root, cache, table, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["export", str(run_root), "--method", "metakd", "--domain", "beta", "--best", "-o", str(out),
                 "--write-split", "test"]) == 0
    choice = choose(table, "metakd", "beta")
    row = table[(table["student_key"] == choice.student_key) & (table["split"] == "test")].iloc[0]
    capsys.readouterr()
    for args in ([str(out)], [choice.student_key, "--sweep", str(run_root)],
                 [str(cache / "students" / choice.student_key)]):
        assert main(["predict", *args, "--file", str(out / "test.jsonl"), "--eval", "-o", str(tmp_path / "p.jsonl")]) == 0
        printed = capsys.readouterr().out
        correct, n = map(int, re.search(r"accuracy [\d.]+% \((\d+)/(\d+) labelled rows\)", printed).groups())
        assert correct / n == row["accuracy"], (args, printed)  # exactly: the same examples, the same predictions
    lines = [json.loads(li) for li in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(lines) == n and all(set(li["probabilities"]) == {"0", "1"} for li in lines)
    assert all(abs(sum(li["probabilities"].values()) - 1) < 1e-5 for li in lines)
    assert all(li["prediction"] == max(li["probabilities"], key=li["probabilities"].get) for li in lines)

    assert main(["predict", str(out), "--text", lines[0]["text"], "--text", "an unseen text"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].split("\t")[0] == lines[0]["prediction"]


# ----------------------------------------------------------------------------- refusals


def test_a_student_without_weights_is_refused_naming_it(run_root, cache, table, tmp_path, capsys):
    copy, copied_cache = tmp_path / "damaged", tmp_path / "damaged_cache"
    shutil.copytree(run_root, copy)
    shutil.copytree(cache, copied_cache)
    (copy / "cache.json").write_text(json.dumps({"cache": str(copied_cache)}))
    assert _cache(copy) == copied_cache
    key = choose(table, "metakd", "alpha").student_key
    (copied_cache / "students" / key / "model.safetensors").unlink()
    assert main(["export", str(copy), "--method", "metakd", "--domain", "alpha", "--best", "-o",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metakd: error: ") and f"students/{key}" in err and "model.safetensors" in err
    assert main(["predict", str(copied_cache / "students" / key), "--text", "a text"]) == 2
    assert f"students/{key}" in capsys.readouterr().err


def test_keep_none_stores_no_weights_and_export_says_so(tmp_path, capsys):
    root = _run(tmp_path, "nokeep", methods=["student_ft"], seeds=[0], students={"keep": "none"},
                distill={"epochs": 1, "lr": 1e-3, "batch_size": 16})
    kept = {p.name for d in (_cache(root) / "students").iterdir() for p in d.iterdir()}
    assert kept == {"_COMPLETE", "result.json"}
    capsys.readouterr()
    assert main(["export", str(root), "--method", "student_ft", "--domain", "alpha", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "students.keep: none" in err and "has no weights" in err
    assert not (tmp_path / "x").exists()


def test_export_needs_a_domain_and_a_known_method(run_root, tmp_path, capsys):
    assert main(["export", str(run_root), "--method", "kd_mix", "--domain", "alpha", "-o", str(tmp_path / "x")]) == 2
    assert "no dev results for method 'kd_mix'" in capsys.readouterr().err
    assert main(["export", str(run_root), "--trial", "nope", "--domain", "alpha", "-o", str(tmp_path / "x")]) == 2
    assert "--trial nope" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --best against pandas


def _random_table(rng: np.random.Generator) -> pd.DataFrame:
    """Configurations (gamma2) x seeds x methods x domains, accuracies in twentieths (ties happen), a seed
    missing from one configuration, a failed trial, and a student two trials share (listed twice)."""
    rows = []
    gammas = [0.0, 0.1, 0.5, 1.0]
    for t, g in enumerate(gammas):
        for seed in (0, 1, 2):
            if t == 3 and seed == 2:
                continue
            # odd configurations ran one seed at a time (metakd run): their config_json differs in seeds
            config = json.dumps({"distill": {"gamma2": g}, "seeds": [seed] if t % 2 else [0, 1, 2]}, sort_keys=True)
            for method in ("metakd", "kd_single"):
                for domain in ("alpha", "beta"):
                    key = f"{method}-{domain}-{seed}-{g if method == 'metakd' else 'shared'}"
                    for split in ("dev", "test"):
                        rows.append({"sweep": "s", "trial_id": f"t{t}", "status": "ok", "seed": seed,
                                     "method": method, "domain": domain, "split": split, "student_key": key,
                                     "accuracy": int(rng.integers(10, 21)) / 20, "config_json": config,
                                     "search_params": json.dumps({"gamma2": g})})
    rows.append({**rows[0], "trial_id": "t9", "status": "failed", "accuracy": 1.0, "student_key": None})
    df = pd.DataFrame(rows)
    df.loc[df["trial_id"] == "t1", "accuracy"] = df.loc[df["trial_id"] == "t0", "accuracy"].to_numpy()  # a tie
    return pd.concat([df, df[df["trial_id"] == "t2"].assign(trial_id="t5")], ignore_index=True)  # listed twice


def _pandas_best(df: pd.DataFrame, method: str, domain: str, seed: int | None = None) -> str:
    dev = df[(df["status"] == "ok") & (df["split"] == "dev") & (df["method"] == method) & (df["domain"] == domain)]
    dev = dev.assign(config_json=[json.dumps({k: v for k, v in json.loads(c).items() if k != "seeds"})
                                  for c in dev["config_json"]])
    per_seed = dev.drop_duplicates(["config_json", "seed", "student_key"]).groupby(["config_json", "seed"])["accuracy"].mean()
    conf = per_seed.groupby("config_json").agg(["mean", "count"])
    conf["first"] = dev.groupby("config_json")["trial_id"].min()
    best = min(conf.index, key=lambda c: (-conf.loc[c, "mean"], -conf.loc[c, "count"], conf.loc[c, "first"]))
    accs = per_seed.loc[best]
    if seed is None:
        seed = min(accs.index, key=lambda s: (abs(accs[s] - conf.loc[best, "mean"]), s))
    return dev[(dev["config_json"] == best) & (dev["seed"] == seed)]["student_key"].iloc[0]


@pytest.mark.parametrize("trial", range(12))
def test_best_picks_what_pandas_picks(trial):
    df = _random_table(np.random.default_rng(trial))
    for method in ("metakd", "kd_single"):
        for domain in ("alpha", "beta"):
            assert choose(df, method, domain).student_key == _pandas_best(df, method, domain)
            assert choose(df, method, domain, seed=1).student_key == _pandas_best(df, method, domain, seed=1)
    forced = choose(df, "metakd", "alpha", trial="t3", seed=0)
    assert forced.student_key == "metakd-alpha-0-1.0" and set(forced.dev_by_seed) == {0, 1}
    with pytest.raises(ValueError, match=r"--seed 2: .* seeds: \[0, 1\]"):
        choose(df, "metakd", "alpha", trial="t3", seed=2)


def test_best_on_the_run_matches_pandas(table):
    for domain in ("alpha", "beta"):
        assert choose(table, "metakd", domain).student_key == _pandas_best(table, "metakd", domain)


# ----------------------------------------------------------------------------- routes, on hand-built models


def _encoder(model_type: str):
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(model_type, vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64, embedding_size=32)
    return AutoModel.from_config(cfg)


@pytest.fixture(scope="module")
def tokenizer():
    words = [f"w{i} v{i % 7} u{i % 3}" for i in range(60)]
    return build_tokenizer(words * 3, None, 120)


def _texts_batch(tokenizer, max_length: int = 24) -> dict:
    part = TextSplit([f"w{i} v{i % 5} " * (1 + 2 * i) for i in range(12)], None, np.zeros(12), np.zeros(12))
    batch = encode(part, tokenizer, max_length).to_dict()
    assert (batch["attention_mask"].sum(1) < max_length).any() and batch["attention_mask"].all(1).any()
    return batch


def _perturbed(model):
    """``model`` moved away from its initialisation (zero biases, identity LayerNorms): every weight matters."""
    torch.manual_seed(1)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _export(model, tokenizer, out: Path, domain_index=None) -> dict:
    return export_model(model, tokenizer, out, Packaging({0: "neg", 1: "pos"}, 24, "head", domain_index))


@pytest.mark.parametrize("model_type, pooling, route, architecture", [
    ("bert", "cls", "transformers", "BertForSequenceClassification"),
    ("roberta", "cls", "transformers", "RobertaForSequenceClassification"),
    ("mpnet", "cls", "transformers", "MPNetForSequenceClassification"),
    ("bert", "mean", "onnx", None),
    ("electra", "cls", "onnx", None),  # no pooler; ELECTRA's own head adds a GELU layer
])
def test_each_route_reproduces_metakd_logits(model_type, pooling, route, architecture, tokenizer, tmp_path):
    model = _perturbed(EncoderClassifier(_encoder(model_type), 2, 3, pooling=pooling))
    assert route_of(model) == route
    meta = _export(model, tokenizer, tmp_path / "out", None)
    assert meta["route"] == route and meta["max_abs_diff"] <= TOLERANCE
    batch = _texts_batch(tokenizer)
    want = _metakd_logits(model, batch)
    if route == "transformers":
        from transformers import AutoModelForSequenceClassification

        hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
        assert type(hf).__name__ == architecture
        with torch.no_grad():
            got = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits
    else:
        import onnxruntime as ort

        assert not (tmp_path / "out" / "config.json").exists()  # AutoModelForSequenceClassification refuses it
        session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"))
        names = [i.name for i in session.get_inputs()]
        got = torch.from_numpy(session.run(["logits"], {n: batch[n].numpy() for n in names})[0])
        trimmed = {n: batch[n][:, :9] for n in names}  # another sequence length than the trace's
        got9 = session.run(["logits"], {n: trimmed[n].numpy() for n in names})[0]
        keep = batch["attention_mask"].sum(1) <= 9
        assert np.abs(got9[keep.numpy()] - want[keep].numpy()).max() <= TOLERANCE
    assert (got - want).abs().max() <= TOLERANCE, (got - want).abs().max()
    assert (load_exported(tmp_path / "out").logits(batch) - want).abs().max() <= TOLERANCE


def test_the_mean_route_ships_the_encoder_and_classifier_for_pytorch(tokenizer, tmp_path):
    from transformers import AutoModel

    teacher = build_teacher(ModelConfig(preset="tiny-teacher"), len(tokenizer), 24, 2, 2)
    student = build_student(ModelConfig(preset="tiny-student", pooling="mean"), teacher, len(tokenizer), 24)
    save_model(_perturbed(student), tmp_path / "kept")
    model = load_model(tmp_path / "kept")
    assert _export(model, tokenizer, tmp_path / "out")["route"] == "onnx"
    encoder = AutoModel.from_pretrained(str(tmp_path / "out" / "encoder")).eval()
    head = load_file(str(tmp_path / "out" / "encoder" / "classifier.safetensors"))
    batch = _texts_batch(tokenizer)
    with torch.no_grad():
        states = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    got = ((states * mask).sum(1) / mask.sum(1)) @ head["weight"].T + head["bias"]
    assert (got - _metakd_logits(model, batch)).abs().max() <= TOLERANCE


def test_a_multitask_teacher_exports_one_domains_head(tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = _perturbed(EncoderClassifier(_encoder("bert"), 2, 3, multitask=True))
    with pytest.raises(ValueError, match="multitask"):
        export_model(model, tokenizer, tmp_path / "none", Packaging({0: "a", 1: "b"}, 24, "head"))
    _export(model, tokenizer, tmp_path / "out", domain_index=2)
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
    batch = _texts_batch(tokenizer)
    with torch.no_grad():
        got = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 token_type_ids=batch["token_type_ids"]).logits
    assert (got - _metakd_logits(model, batch, domain=2)).abs().max() <= TOLERANCE
    assert (got - _metakd_logits(model, batch, domain=0)).abs().max() > 1e-3  # another head: other logits


def test_an_export_that_does_not_reproduce_the_logits_is_removed(tokenizer, tmp_path, monkeypatch):
    from metakd.export import hf
    from metakd.export.artifacts import ExportError

    monkeypatch.setattr(hf, "TOLERANCE", -1.0)  # any difference, even 0, is too much
    model = _perturbed(EncoderClassifier(_encoder("bert"), 2, 3))
    with pytest.raises(ExportError, match="differ from metakd's by .* nothing was exported"):
        _export(model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()

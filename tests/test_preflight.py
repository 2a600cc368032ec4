"""``metakd validate`` catches, before any training, what ``metakd run`` would later catch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from metakd.cli import main
from metakd.preflight import is_hub_id

AMAZON = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon_reviews"


def _write_yaml(tmp_path: Path, raw: dict) -> str:
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def _reviews(tmp_path: Path, lines: dict[str, list[str]]) -> Path:
    """A source: amazon directory with one <domain>.jsonl per entry (raw lines, written as given)."""
    d = tmp_path / "reviews"
    d.mkdir()
    for domain, rows in lines.items():
        (d / f"{domain}.jsonl").write_text("\n".join(rows) + "\n")
    return d


def _good_rows(n: int = 20) -> list[str]:
    return [json.dumps({"text": f"review number {i} was {'good' if i % 2 else 'bad'}", "label": i % 2})
            for i in range(n)]


def _validate(tmp_path, capsys, data: dict, extra: dict | None = None, args: tuple = ()) -> tuple[int, str]:
    raw = {"name": "pre", "methods": ["kd_single"], "data": data, **(extra or {})}
    code = main(["validate", _write_yaml(tmp_path, raw), *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_good_local_data_is_read_and_summarised(tmp_path, capsys):
    d = _reviews(tmp_path, {"books": _good_rows(), "dvd": _good_rows()})
    code, out = _validate(tmp_path, capsys, {"source": "amazon", "path": str(d)})
    assert code == 0, out
    # 20 rows per domain -> the paper's 81/9/10 split keeps 16 for training
    assert "training examples per domain {books: 16, dvd: 16}" in out and ": ok - experiment" in out


def test_missing_data_directory(tmp_path, capsys):
    code, out = _validate(tmp_path, capsys, {"source": "amazon", "path": str(tmp_path / "nowhere")})
    assert code == 2 and "data.path" in out and "nowhere" in out and "does not exist" in out


def test_unknown_domain(tmp_path, capsys):
    d = _reviews(tmp_path, {"books": _good_rows(), "dvd": _good_rows()})
    code, out = _validate(tmp_path, capsys, {"source": "amazon", "path": str(d), "domains": ["books", "toys"]})
    assert code == 2 and "data.domains" in out and "'toys'" in out and "['books', 'dvd']" in out


def test_label_out_of_range(tmp_path, capsys):
    rows = _good_rows()
    rows[5] = json.dumps({"text": "a review", "label": 7})
    d = _reviews(tmp_path, {"books": rows})
    code, out = _validate(tmp_path, capsys, {"source": "amazon", "path": str(d), "num_labels": 2})
    assert code == 2 and "books.jsonl" in out and "label 7" in out and "line 6" in out and "data.label_column" in out


def test_malformed_jsonl_line_names_file_and_line(tmp_path, capsys):
    rows = _good_rows()
    rows[11] = '{"text": "cut off in the middle'
    d = _reviews(tmp_path, {"books": _good_rows(), "dvd": rows})
    code, out = _validate(tmp_path, capsys, {"source": "amazon", "path": str(d)})
    assert code == 2 and "dvd.jsonl: line 12 is not valid JSON" in out


def test_missing_text_column(tmp_path, capsys):
    d = _reviews(tmp_path, {"books": _good_rows()})
    code, out = _validate(tmp_path, capsys, {"source": "amazon", "path": str(d), "text_column": "review"})
    assert code == 2 and "'review' (data.text_column) not found" in out and "['text', 'label']" in out


@pytest.mark.parametrize("section", ["teacher", "student"])
def test_malformed_checkpoint_names_the_field(tmp_path, capsys, section):
    other = {"student": {"preset": "tiny-student"}} if section == "teacher" else {}
    code, out = _validate(tmp_path, capsys, {"source": "synthetic"},
                          {section: {"checkpoint": "not a model/at all"}, **other})
    assert code == 2 and f"{section}.checkpoint" in out and "neither a local directory nor" in out
    assert "Repo id must be" not in out  # Hugging Face's own message names no field


def test_missing_checkpoint_path_is_refused_locally_and_noted_for_the_cluster(tmp_path, capsys):
    extra = {"teacher": {"checkpoint": "/models/bert-base-uncased"}, "student": {"preset": "tiny-student"}}
    code, out = _validate(tmp_path, capsys, {"source": "synthetic"}, extra)
    assert code == 2 and "teacher.checkpoint" in out
    code, out = _validate(tmp_path, capsys, {"source": "synthetic"}, extra, ("--remote",))
    assert code == 0 and "not on this machine" in out


def test_checkpoint_directory_without_config_is_refused(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    extra = {"teacher": {"checkpoint": str(tmp_path / "model")}, "student": {"preset": "tiny-student"}}
    code, out = _validate(tmp_path, capsys, {"source": "synthetic"}, extra)
    assert code == 2 and "teacher.checkpoint" in out and "config.json" in out


def test_remote_data_and_hub_ids_are_noted_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("metakd.preflight.hub_unreachable", lambda: None)  # as with network: not fetched here
    code, out = _validate(tmp_path, capsys, {"source": "hf", "path": "SetFit/mnli", "domain_column": "genre"},
                          {"teacher": {"checkpoint": "bert-base-uncased"}, "student": {"preset": "bert-mini"},
                           "distill": {"layer_map": "round"}})
    assert code == 0, out
    notes = [line for line in out.splitlines() if "not checked here" in line]
    assert len(notes) == 2 and any("data.path 'SetFit/mnli'" in n for n in notes)
    assert any("teacher.checkpoint 'bert-base-uncased'" in n for n in notes)
    code, out = _validate(tmp_path, capsys, {"source": "amazon", "path": "/cluster/data/amazon"}, {}, ("--remote",))
    assert code == 0 and "data.path '/cluster/data/amazon': not on this machine" in out


def test_checkpoint_layer_map_is_checked_from_its_local_config(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig(num_hidden_layers=6, hidden_size=32, num_attention_heads=2, intermediate_size=64
               ).save_pretrained(tmp_path / "six")
    (tmp_path / "six" / "model.safetensors").write_bytes(b"")  # only its presence is checked here
    extra = {"teacher": {"checkpoint": str(tmp_path / "six")}, "student": {"preset": "bert-mini"}}  # 4 layers
    code, out = _validate(tmp_path, capsys, {"source": "synthetic"}, extra)
    assert code == 2 and "student layers (4) do not map onto teacher layers (6)" in out


def test_hub_id_rule():
    assert is_hub_id("bert-base-uncased") and is_hub_id("huawei-noah/TinyBERT_General_4L_312D")
    assert not any(map(is_hub_id, ["/abs/path", "a/b/c", "two words", "x--y", "../up"]))


@pytest.mark.skipif(not AMAZON.is_dir(), reason="../shared/data/amazon_reviews is not beside this checkout")
def test_real_amazon_reviews_validate(tmp_path, capsys):
    code, out = _validate(tmp_path, capsys, {"source": "amazon", "path": str(AMAZON), "domains": ["books", "dvd"]})
    assert code == 0 and "books: 1620, dvd: 1620" in out  # 2000 reviews -> 81 % train

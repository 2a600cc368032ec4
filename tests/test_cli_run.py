"""``metakd validate`` and ``metakd run`` in-process: exit codes, messages, refusal before training."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from metakd.cli import main

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
TINY_DATA = {"max_length": 16, "vocab_size": 300,
             "synthetic": {"num_domains": 2, "examples_per_domain": 60, "words_per_example": 10}}

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _yaml(tmp_path: Path, raw: dict, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p




# ----------------------------------------------------------------------------- validate


def test_validate_smoke_sweep(capsys):
    assert main(["validate", str(SWEEPS / "smoke.yaml")]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "sweep (1 searched parameters)" in out and "'smoke'" in out


def test_validate_experiment_file(capsys):
    assert main(["validate", str(SWEEPS / "example_run.yaml")]) == 0
    out = capsys.readouterr().out
    assert "ok - experiment 'example_run'" in out and "metakd_no_target" in out


def test_validate_bad_file_names_the_field(tmp_path, capsys):
    p = _yaml(tmp_path, {"distill": {"gama2": 0.1}, "search": {"params": {"gamma2": {"values": [0.1]}}}})
    assert main(["validate", str(p)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("metakd: error: ") and "distill.gama2: unknown key" in captured.err


def test_validate_checks_an_experiment_file_without_search(tmp_path, capsys):
    assert main(["validate", str(_yaml(tmp_path, {"name": "plain"}))]) == 0
    assert "ok - experiment 'plain'" in capsys.readouterr().out
    bad = _yaml(tmp_path, {"name": "plain", "data": {"sample_rate": 1.5}}, "bad.yaml")
    assert main(["validate", str(bad)]) == 2
    assert "data.sample_rate: 1.5" in capsys.readouterr().err


def test_validate_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- run: refusals


def _labels_file(tmp_path: Path) -> str:
    rows = [{"text": f"text {i}", "label": 5 if i == 7 else i % 2, "domain": d} for d in ("a", "b") for i in range(10)]
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


BAD_RUNS = {
    "unknown_preset": ({"student": {"preset": "tiny-studnet"}}, ["student.preset", "'tiny-studnet'", "tiny-student"]),
    "layers_do_not_map": ({"student": {"layers": 3, "hidden": 32, "heads": 2, "intermediate": 64}},
                          ["(3)", "(4)", "layer_map"]),
    "domain_not_in_data": ({"data": {**TINY_DATA, "domains": ["nope"]}},
                           ["data.domains", "'nope'", "alpha", "beta"]),
    "sample_rate_zero": ({"data": {**TINY_DATA, "sample_rate": 0}}, ["data.sample_rate", "0.0", "(0, 1]"]),
    "sample_rate_above_one": ({"data": {**TINY_DATA, "sample_rate": 1.2}}, ["data.sample_rate", "1.2"]),
    "missing_data_file": (lambda tmp: {"data": {"source": "files", "path": str(tmp / "missing.jsonl")}},
                          ["data.path", "missing.jsonl", "does not exist"]),
    "missing_amazon_dir": (lambda tmp: {"data": {"source": "amazon", "path": str(tmp / "no_reviews")}},
                           ["data.path", "no_reviews"]),
    "label_out_of_range": (lambda tmp: {"data": {"source": "files", "path": _labels_file(tmp), "num_labels": 2}},
                           ["label 5", "outside [0, 2)", "line 8", "rows.jsonl"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_run_refuses_bad_input_before_training(case, tmp_path, capsys, no_training):
    over, fragments = BAD_RUNS[case]
    over = over(tmp_path) if callable(over) else over
    raw = {"name": "bad", "methods": ["metakd", "kd_single"], "device": "cpu", "data": TINY_DATA, **over}
    out_dir = tmp_path / "out"
    assert main(["run", str(_yaml(tmp_path, raw)), "--output-dir", str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metakd: error: ")
    for f in fragments:
        assert f in err, (f, err)
    assert not (out_dir / "bad" / "teachers").exists() and not (out_dir / "bad" / "results").exists()


# ----------------------------------------------------------------------------- run: success


def test_run_prints_the_table_and_writes_results(tmp_path, capsys):
    raw = {
        "name": "cli_tiny", "methods": ["metakd", "student_ft"], "device": "cpu",
        "output_dir": str(tmp_path / "runs"), "data": TINY_DATA,
        "teacher": {"preset": "tiny-teacher", "epochs": 1, "lr": 1e-3, "batch_size": 16},
        "student": {"preset": "tiny-student-1l"},
        "distill": {"stage1_epochs": 1, "stage1_lr": 1e-3, "stage2_epochs": 1, "stage2_lr": 1e-3,
                    "epochs": 1, "lr": 1e-3, "batch_size": 16},
    }
    assert main(["run", str(_yaml(tmp_path, raw))]) == 0
    out = capsys.readouterr().out
    assert "dev accuracy (%)" in out and "test accuracy (%)" in out
    table = out[out.index("test accuracy (%)"):].split("\n\n")[0].splitlines()
    assert table[1].split() == ["alpha", "beta", "average"]
    rows = {line.split()[0]: line.split()[1:] for line in table[2:]}
    for method in ("metakd", "student_ft"):
        cells = [float(c) for c in rows[method]]  # one seed: plain percentages
        assert len(cells) == 3 and all(0 <= c <= 100 for c in cells)
        assert cells[2] == pytest.approx((cells[0] + cells[1]) / 2, abs=0.011)
    assert "4 students, 1 teachers trained" in out
    df = pd.read_parquet(tmp_path / "runs" / "cli_tiny" / "results")  # one part: one configuration, one seed
    assert len(df) == 2 * 2 * 2 and set(df["method"]) == {"metakd", "student_ft"}

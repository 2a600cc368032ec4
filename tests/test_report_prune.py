"""Pruned students in the results (cap-pruning spec §4): their columns, the size plot beside dense
students, and the tables and paired comparisons on their rows."""

from __future__ import annotations

import pytest

from metakd.config import from_dict
from metakd.report import analysis, results
from metakd.report.rows import result_rows

DENSE = {"name": "s", "methods": ["metakd", "kd_single"], "student": "tiny-student"}
PRUNED = {**DENSE, "student": {"prune": {"sparsity": 0.5}}}
HEADS = {**DENSE, "student": {"prune": {"structure": "heads_ffn", "sparsity": 0.5, "contrastive": []}}}


def _summary(method, domain, seed, acc, params, **extra):
    return {"method": method, "domain": domain, "seed": seed, "dev_accuracy": acc, "test_accuracy": acc,
            "dev_loss": 0.5, "test_loss": 0.5, "dev_majority_rate": 0.5, "test_majority_rate": 0.5,
            "student_params": params, "student_layers": 4, "student_hidden": 64, "latency_ms_b1": 1.0,
            "student_key": f"{method}-{domain}-{seed}-{params}-{extra.get('latency_kind', 'dense')}"
                           f"-{extra.get('heads_kept')}", **extra}


def _rows(tmp_path):
    rows = []
    for raw, params, extra, base in (
            (DENSE, 50_000, {}, 0.80),
            (PRUNED, 194_306, {"student_nonzero_params": 128_770, "encoder_remaining": 0.51, "prune_achieved": 0.5,
                               "latency_kind": "dense_masked"}, 0.84),
            (HEADS, 194_306, {"student_nonzero_params": 128_130, "encoder_remaining": 0.506, "prune_achieved": 0.5,
                              "heads_kept": 8, "ffn_kept": 256, "latency_kind": "physical"}, 0.82)):
        cfg = from_dict(raw)
        students = [_summary(m, d, seed, base + (0.02 if m == "metakd" else 0.0) + 0.01 * seed, params, **extra)
                    for m in ("metakd", "kd_single") for d in ("alpha", "beta") for seed in (0, 1, 2)]
        rows += result_rows(cfg, "s", f"t-{params}-{extra.get('latency_kind', 'dense')}", students)
    results.write_part(str(tmp_path), rows, "part")
    return results.load(str(tmp_path))


def test_rows_carry_the_prune_columns(tmp_path):
    df = _rows(tmp_path)
    pruned = df[df["prune_structure"] == "unstructured"].iloc[0]
    assert (pruned["prune_criterion"], pruned["prune_target"], pruned["prune_contrastive"]) == ("movement", 0.5,
                                                                                                "prc+snc+fic")
    assert pruned["student"] == "pruned movement 0.5 +prc+snc+fic" and pruned["latency_kind"] == "dense_masked"
    heads = df[df["prune_structure"] == "heads_ffn"].iloc[0]
    assert heads["prune_contrastive"] == "none" and heads["heads_kept"] == 8 and heads["latency_kind"] == "physical"
    dense = df[df["prune_structure"].isna()].iloc[0]
    assert dense["student_nonzero_params"] == dense["student_params"] == 50_000 and dense["latency_kind"] == "dense"


def test_size_table_and_plot_put_dense_and_pruned_students_on_one_axis(tmp_path):
    table = analysis.student_size_table(_rows(tmp_path), "metakd")
    assert table["kind"].tolist() == ["dense", "heads_ffn", "unstructured"]  # sorted by nonzero parameters
    assert table["student_nonzero_params"].tolist() == [50_000, 128_130, 128_770]
    assert table["mean"].round(4).tolist() == [pytest.approx(0.83), pytest.approx(0.85), pytest.approx(0.87)]
    from metakd.report.plots import plot_sizes

    fig = plot_sizes(table, tmp_path / "sizes.png")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Student parameters, nonzero (millions)"
    labels = ax.get_legend_handles_labels()[1]
    assert any("dense" in x for x in labels) and any("unstructured" in x for x in labels)
    assert any("heads + FFN" in x for x in labels) and (tmp_path / "sizes.png").is_file()


def test_table_and_compare_work_on_pruned_rows(tmp_path):
    df = _rows(tmp_path)
    pruned = df[df["prune_structure"].notna()]
    long = analysis.main_table(pruned)
    assert set(long["method"]) == {"metakd", "kd_single"}
    cmp = analysis.compare_methods(pruned, "metakd", "kd_single", by=["student"])
    average = cmp[cmp["domain"] == "average"]
    assert len(average) == 2 and average["diff"].round(6).tolist() == [2.0, 2.0]  # points
    assert average["wins"].tolist() == [3, 3]

"""Paired comparisons (analysis.compare_methods, `metakd compare`, `table --compare`) and the
collapsed-student flag, against values computed independently here."""

import argparse
import io
import math
import tempfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from metakd.report import analysis, results
from metakd.report import cli as cli_report
from metakd.config import from_dict
from metakd.report.rows import is_collapsed, result_rows
from metakd.train.loop import majority_rate

T_975_DF2 = 4.302652729911275  # two-sided 95% Student t quantile, 2 degrees of freedom (printed tables: 4.303)


def _rows(method, domain, accs, trial="t", split="test", **config):
    """One row per seed (0, 1, ...) with the given accuracies, in trial ``<trial>-<seed>``."""
    return [
        dict(sweep="s", trial_id=f"{trial}-{seed}", status="ok", seed=seed, method=method, domain=domain,
             split=split, accuracy=acc, **config)
        for seed, acc in enumerate(accs) if acc is not None
    ]


def _frame(rows):
    with tempfile.TemporaryDirectory() as root:
        results.write_part(root, rows, "part-0")
        return results.load(root)


#                     seed 0  seed 1  seed 2
# metakd     books     0.80    0.85    0.83
# kd_single  books     0.78    0.80    0.84     d = +2, +5, -1 points
# metakd     dvd       0.70    0.72    0.75
# kd_single  dvd       0.70    0.70    0.71     d =  0, +2, +4 points
# average over domains within a seed:          d = +1, +3.5, +1.5
def _basic_rows(**config):
    rows = []
    rows += _rows("metakd", "books", [0.80, 0.85, 0.83], **config)
    rows += _rows("kd_single", "books", [0.78, 0.80, 0.84], **config)
    rows += _rows("metakd", "dvd", [0.70, 0.72, 0.75], **config)
    rows += _rows("kd_single", "dvd", [0.70, 0.70, 0.71], **config)
    rows += _rows("student_ft", "books", [0.5, 0.5, 0.5], **config)
    rows += _rows("metakd", "books", [0.1, 0.1, 0.1], split="dev", **config)  # other split: ignored
    return rows


@pytest.fixture
def basic():
    return _frame(_basic_rows(gamma2=0.5))


def _at(table, domain):
    sel = table[table["domain"] == domain]
    assert len(sel) == 1, domain
    return sel.iloc[0]


def _expected(d):
    """Mean, sd, t-interval and two-sided p of paired differences d, from the textbook formulas."""
    d = np.asarray(d, dtype=float)
    n, mean, sd = len(d), d.mean(), d.std(ddof=1)
    se = sd / math.sqrt(n)
    half = stats.t.ppf(0.975, n - 1) * se
    p = 2 * stats.t.sf(abs(mean / se), n - 1)
    return mean, sd, mean - half, mean + half, p


def test_paired_difference_interval_and_p_value(basic):
    t = analysis.compare_methods(basic, "metakd", "kd_single")
    assert list(t["domain"]) == ["books", "dvd", "average"]
    assert list(t.columns) == ["domain", "n", "method_mean", "baseline_mean", "diff", "diff_std", "ci_low",
                               "ci_high", "p_value", "wins", "ties", "losses", "note"]
    for domain, d in [("books", [2, 5, -1]), ("dvd", [0, 2, 4]), ("average", [1, 3.5, 1.5])]:
        row = _at(t, domain)
        mean, sd, lo, hi, p = _expected(d)
        assert row["n"] == 3
        assert row["diff"] == pytest.approx(mean) and row["diff_std"] == pytest.approx(sd)
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
        assert row["p_value"] == pytest.approx(p)
        assert row["note"] == ""
    books = _at(t, "books")
    # by hand: mean 2, sd 3, half-width t(0.975, 2) * 3 / sqrt(3) = 4.3027 * 1.7321 = 7.4524
    assert (books["ci_low"], books["ci_high"]) == (pytest.approx(2 - 7.45241, abs=1e-4),
                                                   pytest.approx(2 + 7.45241, abs=1e-4))
    assert books["ci_high"] - books["diff"] == pytest.approx(T_975_DF2 * 3 / math.sqrt(3), rel=1e-6)
    # the paired t-test on the raw accuracies gives the same p (another route through scipy)
    assert books["p_value"] == pytest.approx(stats.ttest_rel([0.80, 0.85, 0.83], [0.78, 0.80, 0.84]).pvalue)
    assert (books["method_mean"], books["baseline_mean"]) == (pytest.approx(82.666667), pytest.approx(80.666667))
    assert (books["wins"], books["ties"], books["losses"]) == (2, 0, 1)
    dvd = _at(t, "dvd")
    assert (dvd["wins"], dvd["ties"], dvd["losses"]) == (2, 1, 0)
    avg = _at(t, "average")
    assert (avg["wins"], avg["ties"], avg["losses"]) == (3, 0, 0)
    assert avg["method_mean"] == pytest.approx(77.5) and avg["baseline_mean"] == pytest.approx(75.5)
    assert t.attrs["method"] == "metakd" and t.attrs["baseline"] == "kd_single" and t.attrs["split"] == "test"
    assert t.attrs["unpaired"] == {"metakd": 0, "kd_single": 0}


def test_other_confidence_level(basic):
    t = analysis.compare_methods(basic, "metakd", "kd_single", confidence=0.90)
    books = _at(t, "books")
    assert books["ci_high"] - books["diff"] == pytest.approx(stats.t.ppf(0.95, 2) * 3 / math.sqrt(3))
    with pytest.raises(ValueError, match="confidence must be in"):
        analysis.compare_methods(basic, confidence=95)


def test_configurations_are_paired_then_averaged_within_a_seed_without_double_counting():
    rows = []
    # configuration gamma2=0.0 and gamma2=1.0, each in its own trial; kd_single does not depend on
    # gamma2, so each trial carries the same kd_single accuracies (as a reused student would)
    rows += _rows("metakd", "books", [0.80, 0.86], trial="g0", gamma2=0.0)
    rows += _rows("kd_single", "books", [0.78, 0.80], trial="g0", gamma2=0.0)
    rows += _rows("metakd", "books", [0.84, 0.82], trial="g1", gamma2=1.0)
    rows += _rows("kd_single", "books", [0.78, 0.80], trial="g1", gamma2=1.0)
    # the gamma2=1.0 configuration run a second time by another trial: one cell, averaged
    rows += _rows("metakd", "books", [0.86, 0.84], trial="g1-again", gamma2=1.0)
    rows += _rows("kd_single", "books", [0.78, 0.80], trial="g1-again", gamma2=1.0)
    # a configuration with no baseline: unpaired, left out and counted
    rows += _rows("metakd", "books", [0.99, 0.99], trial="g5", gamma2=0.5)
    t = analysis.compare_methods(_frame(rows), "metakd", "kd_single")
    books = _at(t, "books")
    # seed 0: gamma2=0 -> +2; gamma2=1 -> mean(0.84, 0.86) - 0.78 = +7   => (2 + 7) / 2 = 4.5
    # seed 1: gamma2=0 -> +6; gamma2=1 -> mean(0.82, 0.84) - 0.80 = +3   => (6 + 3) / 2 = 4.5
    assert books["n"] == 2  # seeds, not configurations x trials
    assert books["diff"] == pytest.approx(4.5)
    assert books["note"] == "every seed has the same difference"
    assert (books["ci_low"], books["ci_high"], books["p_value"]) == (pytest.approx(4.5), pytest.approx(4.5), 0.0)
    assert books["method_mean"] - books["baseline_mean"] == pytest.approx(4.5)
    assert t.attrs["unpaired"] == {"metakd": 2, "kd_single": 0}  # gamma2=0.5 for seeds 0 and 1

    by = analysis.compare_methods(_frame(rows[:-2]), "metakd", "kd_single", by=["gamma2"])
    assert list(zip(by["gamma2"], by["domain"])) == [(0.0, "books"), (0.0, "average"),
                                                    (1.0, "books"), (1.0, "average")]
    g0 = by[(by["gamma2"] == 0.0) & (by["domain"] == "books")].iloc[0]
    mean, sd, lo, hi, p = _expected([2, 6])
    assert (g0["diff"], g0["ci_low"], g0["ci_high"], g0["p_value"]) == (
        pytest.approx(mean), pytest.approx(lo), pytest.approx(hi), pytest.approx(p))


def test_average_uses_only_seeds_with_every_domain():
    rows = _basic_rows()
    rows = [r for r in rows if not (r["domain"] == "dvd" and r["seed"] == 2)]
    t = analysis.compare_methods(_frame(rows), "metakd", "kd_single")
    assert _at(t, "books")["n"] == 3 and _at(t, "dvd")["n"] == 2
    avg = _at(t, "average")
    assert avg["n"] == 2 and avg["diff"] == pytest.approx((1 + 3.5) / 2)


def test_one_seed_says_so_instead_of_an_interval(basic):
    t = analysis.compare_methods(basic[basic["seed"] == 1], "metakd", "kd_single")
    books = _at(t, "books")
    assert books["n"] == 1 and books["diff"] == pytest.approx(5.0)
    assert math.isnan(books["ci_low"]) and math.isnan(books["ci_high"]) and math.isnan(books["p_value"])
    assert "no interval" in books["note"]
    assert analysis.difference_cell(books) == "+5.00 (n=1)"
    assert analysis.difference_cell(_at(analysis.compare_methods(basic), "books")) == "+2.00 [-5.45, +9.45]"


def test_all_ties_have_p_one():
    rows = _rows("metakd", "books", [0.8, 0.7]) + _rows("kd_single", "books", [0.8, 0.7])
    books = _at(analysis.compare_methods(_frame(rows)), "books")
    assert (books["diff"], books["p_value"], books["ties"]) == (0.0, 1.0, 2)


def test_compare_errors(basic):
    with pytest.raises(ValueError, match="no kd_mix rows .* to compare with"):
        analysis.compare_methods(basic, "metakd", "kd_mix")
    with pytest.raises(ValueError, match="both 'metakd'"):
        analysis.compare_methods(basic, "metakd", "metakd")
    shifted = basic.assign(seed=np.where(basic["method"] == "kd_single", basic["seed"] + 10, basic["seed"]))
    with pytest.raises(ValueError, match="has both metakd and kd_single"):
        analysis.compare_methods(shifted)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['sample_rate'\]"):
        analysis.compare_methods(basic.drop(columns=["sample_rate"]), by=["sample_rate"])


# ---------------------------------------------------------------- collapsed students


@pytest.fixture
def flagged():
    rows = _basic_rows(gamma2=0.5)
    for r in rows:  # metakd/books seed 1 collapsed (its dev and test rows carry the flag)
        r["collapsed"] = r["method"] == "metakd" and r["domain"] == "books" and r["seed"] == 1
        if r["collapsed"] and r["split"] == "dev":
            r.update(accuracy=0.5, majority_rate=0.52)
    return _frame(rows)


def test_collapsed_rows_are_kept_by_default_and_counted(flagged, basic):
    t = analysis.main_table(flagged)
    assert t.attrs["collapsed"] == 1 and t.attrs["excluded"] == 0
    assert t.equals(analysis.main_table(basic))
    cmp = analysis.compare_methods(flagged)
    assert cmp.attrs["collapsed"] == 1 and _at(cmp, "books")["n"] == 3


def test_exclude_collapsed_drops_them_and_says_so(flagged):
    t = analysis.main_table(flagged, exclude_collapsed=True)
    assert t.attrs == {"split": "test", "collapsed": 1, "excluded": 1}
    books = t[(t["method"] == "metakd") & (t["domain"] == "books")].iloc[0]
    assert books["count"] == 2 and books["mean"] == pytest.approx((0.80 + 0.83) / 2)
    cmp = analysis.compare_methods(flagged, exclude_collapsed=True)
    books = _at(cmp, "books")  # the pair of seed 1 is gone: d = +2, -1
    mean, sd, lo, hi, p = _expected([2, -1])
    assert books["n"] == 2 and books["diff"] == pytest.approx(mean) and books["ci_low"] == pytest.approx(lo)
    assert _at(cmp, "average")["n"] == 2  # seed 1 no longer has every domain
    assert cmp.attrs["unpaired"] == {"metakd": 0, "kd_single": 1}
    fig3 = analysis.improvement_vs_sample_rate(flagged.assign(sample_rate=1.0), exclude_collapsed=True)
    assert fig3.attrs["excluded"] == 1
    with pytest.raises(ValueError, match="needs a 'collapsed' column"):
        analysis.main_table(flagged.drop(columns=["collapsed"]), exclude_collapsed=True)


def test_collapsed_students_are_listed(flagged):
    listed = analysis.collapsed_students(flagged)
    assert listed[["method", "domain", "seed"]].values.tolist() == [["metakd", "books", 1]]
    line = analysis.describe_collapsed(flagged)
    assert line.startswith("1 collapsed student(s)") and "metakd/books seed 1 (50.0% <= 52.0%)" in line
    assert analysis.describe_collapsed(flagged.assign(collapsed=False)) is None


def test_majority_rate_and_collapse_rule():
    assert majority_rate([1, 0, 1, 1]) == 0.75
    assert majority_rate(np.array([2, 2, 0, 1, 1, 2])) == 0.5
    assert majority_rate([]) == 0.0
    assert is_collapsed({"dev_accuracy": 0.75, "dev_majority_rate": 0.75}) is True  # at the rate
    assert is_collapsed({"dev_accuracy": 0.5, "dev_majority_rate": 0.75}) is True
    assert is_collapsed({"dev_accuracy": 0.76, "dev_majority_rate": 0.75}) is False
    assert is_collapsed({"dev_accuracy": None, "dev_majority_rate": 0.75}) is None
    assert is_collapsed({"dev_accuracy": 0.9}) is None


def test_result_rows_carry_the_flag_and_the_rates(tmp_path):
    cfg = from_dict({"name": "x"})
    student = {"method": "metakd", "domain": "books", "seed": 0, "dev_accuracy": 0.5, "dev_loss": 0.7,
               "test_accuracy": 0.55, "test_loss": 0.69, "dev_majority_rate": 0.5, "test_majority_rate": 0.6}
    ok = dict(student, domain="dvd", dev_accuracy=0.9)
    rows = result_rows(cfg, "s", "t", [student, ok])
    got = {(r["domain"], r["split"]): (r["majority_rate"], r["collapsed"]) for r in rows}
    assert got == {("books", "dev"): (0.5, True), ("books", "test"): (0.6, True),
                   ("dvd", "dev"): (0.5, False), ("dvd", "test"): (0.6, False)}
    results.write_part(str(tmp_path), rows, "p")
    df = results.load(str(tmp_path))
    assert str(df["collapsed"].dtype) == "boolean" and df["collapsed"].sum() == 2


def test_parts_written_before_the_flag_still_load(tmp_path):
    results.write_part(str(tmp_path), _rows("metakd", "books", [0.8]), "new")
    old = pq.read_table(tmp_path / "results" / "new.parquet").drop_columns(["collapsed", "majority_rate"])
    pq.write_table(old, tmp_path / "results" / "old.parquet")
    df = results.load(str(tmp_path))
    assert len(df) == 1 and df["collapsed"].isna().all()  # identical rows, deduplicated
    assert pa.types.is_boolean(results.RESULT_SCHEMA.field("collapsed").type)
    with pytest.raises(ValueError, match="expected true/false"):
        results.to_table([{"collapsed": "yes"}])


# ---------------------------------------------------------------- CLI


def _run(*argv):
    parser = argparse.ArgumentParser(prog="metakd")
    cli_report.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture
def sweep_dir(tmp_path):
    rows = _basic_rows(gamma2=0.5)
    for r in rows:
        r["collapsed"] = r["method"] == "kd_single" and r["domain"] == "dvd" and r["seed"] == 2
    results.write_part(str(tmp_path), rows, "part-0")
    return tmp_path


def test_cli_compare(sweep_dir, capsys):
    assert _run("compare", sweep_dir, "--baseline", "kd_single", "student_ft") == 0
    captured = capsys.readouterr()
    out = captured.out
    assert out.startswith("metakd - kd_single, test accuracy: paired difference in points")
    lines = out.splitlines()
    books = next(line for line in lines if line.split()[0] == "books")
    assert books.split() == ["books", "3", "82.67", "80.67", "+2.00", "[-5.45,", "+9.45]", "0.368", "2/0/1"]
    avg = next(line for line in lines if line.split()[0] == "average")
    assert avg.split()[4:7] == ["+2.00", "[-1.29,", "+5.29]"]
    assert "metakd - student_ft" in out  # a second baseline
    assert "1 collapsed student(s)" in captured.err and "included" in captured.err

    assert _run("compare", sweep_dir, "--exclude-collapsed") == 0
    captured = capsys.readouterr()
    dvd = next(line for line in captured.out.splitlines() if line.split()[0] == "dvd")
    assert dvd.split()[1] == "2"  # seed 2's pair is gone
    assert "1 collapsed student(s) excluded" in captured.err

    assert _run("compare", sweep_dir, "--baseline", "kd_mix") == 2
    assert "no kd_mix rows" in capsys.readouterr().err


def test_cli_compare_one_seed(tmp_path, capsys):
    results.write_part(str(tmp_path), [r for r in _basic_rows() if r["seed"] == 0], "p")
    assert _run("compare", tmp_path) == 0
    out = capsys.readouterr().out
    assert "+2.00 (n=1)" in out and "note: 1 paired seed: no interval (needs 2 or more)" in out


def test_cli_table_with_compare(sweep_dir, capsys):
    assert _run("table", sweep_dir, "--compare", "kd_single") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| method | books | dvd | average |"
    assert lines[-1] == "| metakd - kd_single | +2.00 [-5.45, +9.45] | +2.00 [-2.97, +6.97] | +2.00 [-1.29, +5.29] |"

    assert _run("table", sweep_dir, "--compare", "kd_single", "--format", "csv") == 0
    csv = pd.read_csv(io.StringIO(capsys.readouterr().out))
    diff = csv[csv["method"] == "metakd - kd_single"].set_index("domain")
    assert diff.loc["books", "diff_pct"] == pytest.approx(2.0) and diff.loc["books", "seeds"] == 3
    assert diff.loc["average", "ci_low_pct"] == pytest.approx(_expected([1, 3.5, 1.5])[2])

    assert _run("table", sweep_dir, "--compare", "kd_single", "--format", "latex") == 0
    assert r"metakd - kd\_single & +2.00 [-5.45, +9.45]" in capsys.readouterr().out


# ---------------------------------------------------------------- end to end (tiny, in-process)


def test_a_run_writes_majority_rates_and_flags(tmp_path, single_thread_torch):
    from metakd.data import load_multidomain
    from metakd.jobs.run import run_local

    cfg = from_dict({
        "name": "flags", "methods": ["student_ft"], "seeds": [0], "device": "cpu",
        "data": {"max_length": 16, "vocab_size": 200,
                 "synthetic": {"num_domains": 2, "examples_per_domain": 60, "words_per_example": 8}},
        "student": "tiny-student", "distill": {"epochs": 1, "batch_size": 16},
    })
    out = run_local(cfg, root=str(tmp_path), log=lambda *a, **k: None)
    data = load_multidomain(cfg.data, 0)
    df = results.load(str(tmp_path))
    assert len(df) == 4
    for r in df.itertuples():
        k = data.domains.index(r.domain)
        labels = getattr(data, r.split).labels[getattr(data, r.split).domains == k]
        assert r.majority_rate == pytest.approx(np.bincount(labels).max() / len(labels))
        dev = df[(df["domain"] == r.domain) & (df["split"] == "dev")].iloc[0]
        assert r.collapsed == (dev["accuracy"] <= dev["majority_rate"])
    assert all(s["dev_majority_rate"] > 0 for s in out["students"])

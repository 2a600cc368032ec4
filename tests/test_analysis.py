"""Analysis tables against hand-computed numbers; plots and the report CLI on small tables."""

import argparse
import io
import math
import tempfile

import pandas as pd
import pytest

from metakd.report import analysis, plots, results
from metakd.report import cli as cli_report

SQRT2 = math.sqrt(2)


def _rows(method, domain, accs, split="test", status="ok", **config):
    """One row per seed (0, 1, ...) with the given accuracies."""
    return [
        dict(sweep="s", trial_id=f"{method}-{domain}-{seed}", status=status, seed=seed, method=method,
             domain=domain, split=split, accuracy=acc, **config)
        for seed, acc in enumerate(accs)
    ]


def _frame(rows):
    # Through the real writer and reader, so the analysis sees the dtypes users get.
    with tempfile.TemporaryDirectory() as root:
        results.write_part(root, rows, "part-0")
        return results.load(root)


# ---------------------------------------------------------------- Figure 3 / Figure 4 data
#
# kd_single                    seed 0  seed 1
#   sample_rate 0.1  books      0.50    0.60
#                    dvd        0.40    0.80
#   sample_rate 1.0  books      0.80    0.80
#                    dvd        0.70    0.75
# metakd
#   sample_rate 0.1  books      0.55    0.69     gamma2 0.5
#                    dvd        0.44    0.80     gamma2 0.5
#   sample_rate 1.0  books      0.80    0.84     gamma2 0.0
#                    books      0.88    0.92     gamma2 1.0
#                    dvd        0.70    0.72     gamma2 0.0
#                    dvd        0.76    0.78     gamma2 1.0


def _sweep_rows():
    rows = []
    rows += _rows("kd_single", "books", [0.50, 0.60], sample_rate=0.1)
    rows += _rows("kd_single", "dvd", [0.40, 0.80], sample_rate=0.1)
    rows += _rows("kd_single", "books", [0.80, 0.80], sample_rate=1.0)
    rows += _rows("kd_single", "dvd", [0.70, 0.75], sample_rate=1.0)
    rows += _rows("metakd", "books", [0.55, 0.69], sample_rate=0.1, gamma2=0.5)
    rows += _rows("metakd", "dvd", [0.44, 0.80], sample_rate=0.1, gamma2=0.5)
    rows += _rows("metakd", "books", [0.80, 0.84], sample_rate=1.0, gamma2=0.0)
    rows += _rows("metakd", "books", [0.88, 0.92], sample_rate=1.0, gamma2=1.0)
    rows += _rows("metakd", "dvd", [0.70, 0.72], sample_rate=1.0, gamma2=0.0)
    rows += _rows("metakd", "dvd", [0.76, 0.78], sample_rate=1.0, gamma2=1.0)
    # rows that must not count: a failed trial, the dev split
    rows += _rows("metakd", "books", [0.0, 0.0], status="failed", sample_rate=0.1, gamma2=0.5)
    rows += _rows("kd_single", "books", [0.99, 0.99], split="dev", sample_rate=0.1)
    return rows


@pytest.fixture
def sweep_df():
    return _frame(_sweep_rows())


def _cell(table, **where):
    sel = table
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, where
    return sel.iloc[0]


def test_improvement_rate_is_paired_by_seed(sweep_df):
    t = analysis.improvement_vs_sample_rate(sweep_df)
    assert list(t.columns) == ["sample_rate", "domain", "mean", "std", "count"]
    assert list(zip(t["sample_rate"], t["domain"])) == [
        (0.1, "books"), (0.1, "dvd"), (0.1, "average"), (1.0, "books"), (1.0, "dvd"), (1.0, "average"),
    ]
    # sample rate 0.1: books rates 0.05/0.50 = 0.10 and 0.09/0.60 = 0.15; dvd 0.04/0.40 = 0.10 and 0
    books = _cell(t, sample_rate=0.1, domain="books")
    assert books["mean"] == pytest.approx(0.125)
    assert books["std"] == pytest.approx(0.05 / SQRT2)
    assert books["count"] == 2
    dvd = _cell(t, sample_rate=0.1, domain="dvd")
    assert dvd["mean"] == pytest.approx(0.05)
    assert dvd["std"] == pytest.approx(0.10 / SQRT2)
    # average: per seed (0.10 + 0.10) / 2 = 0.10 and (0.15 + 0) / 2 = 0.075
    avg = _cell(t, sample_rate=0.1, domain="average")
    assert avg["mean"] == pytest.approx(0.0875)
    assert avg["std"] == pytest.approx(0.025 / SQRT2)
    assert avg["count"] == 2
    # sample rate 1.0: metakd averaged over gamma2 within a seed first:
    # books 0.84 / 0.88 vs 0.80 / 0.80 -> 0.05, 0.10; dvd 0.73 / 0.75 vs 0.70 / 0.75 -> 3/70, 0
    books = _cell(t, sample_rate=1.0, domain="books")
    assert books["mean"] == pytest.approx(0.075)
    assert books["std"] == pytest.approx(0.05 / SQRT2)
    dvd = _cell(t, sample_rate=1.0, domain="dvd")
    assert dvd["mean"] == pytest.approx(3 / 70 / 2)
    assert dvd["std"] == pytest.approx(3 / 70 / SQRT2)
    avg = _cell(t, sample_rate=1.0, domain="average")
    seed0, seed1 = (0.05 + 3 / 70) / 2, (0.10 + 0.0) / 2
    assert avg["mean"] == pytest.approx((seed0 + seed1) / 2)
    assert avg["std"] == pytest.approx(abs(seed0 - seed1) / SQRT2)
    assert t.attrs == {"method": "metakd", "baseline": "kd_single", "split": "test", "collapsed": 0, "excluded": 0}


def test_improvement_with_one_seed_has_nan_std(sweep_df):
    t = analysis.improvement_vs_sample_rate(sweep_df[sweep_df["seed"] == 1])
    books = _cell(t, sample_rate=0.1, domain="books")
    assert books["mean"] == pytest.approx(0.15)
    assert books["count"] == 1
    assert math.isnan(books["std"])


def test_improvement_needs_baseline_rows(sweep_df):
    with pytest.raises(ValueError, match="no kd_single rows .* to compare with"):
        analysis.improvement_vs_sample_rate(sweep_df[sweep_df["method"] != "kd_single"])
    with pytest.raises(ValueError, match="no kd_mix rows"):
        analysis.improvement_vs_sample_rate(sweep_df, baseline="kd_mix")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['sample_rate'\]"):
        analysis.improvement_vs_sample_rate(sweep_df.drop(columns=["sample_rate"]))
    with pytest.raises(ValueError, match=r"no metakd rows \(status='ok', split='dev'\)"):
        analysis.improvement_vs_sample_rate(sweep_df, split="dev")  # dev has kd_single rows only
    with pytest.raises(ValueError, match=r"split 'dev'.*splits present: \['test'\]"):
        analysis.improvement_vs_sample_rate(sweep_df[sweep_df["split"] == "test"], split="dev")
    no_pairs = sweep_df[~((sweep_df["method"] == "kd_single") & (sweep_df["seed"] == 0))]
    no_pairs = no_pairs[~((no_pairs["method"] == "metakd") & (no_pairs["seed"] == 1))]
    with pytest.raises(ValueError, match="has both metakd and kd_single"):
        analysis.improvement_vs_sample_rate(no_pairs)


def test_accuracy_vs_gamma2(sweep_df):
    t = analysis.accuracy_vs_gamma2(sweep_df)
    assert list(t["gamma2"].unique()) == [0.0, 0.5, 1.0]
    books = _cell(t, gamma2=0.0, domain="books")
    assert (books["mean"], books["std"], books["count"]) == (
        pytest.approx(0.82), pytest.approx(0.04 / SQRT2), 2)
    avg = _cell(t, gamma2=0.0, domain="average")  # per seed (0.80+0.70)/2 = 0.75, (0.84+0.72)/2 = 0.78
    assert avg["mean"] == pytest.approx(0.765)
    assert avg["std"] == pytest.approx(0.03 / SQRT2)
    avg = _cell(t, gamma2=1.0, domain="average")  # 0.82, 0.85
    assert avg["mean"] == pytest.approx(0.835)
    dvd = _cell(t, gamma2=0.5, domain="dvd")
    assert dvd["mean"] == pytest.approx(0.62)
    assert dvd["std"] == pytest.approx(0.36 / SQRT2)


def test_accuracy_vs_gamma2_needs_gamma2_values(sweep_df):
    with pytest.raises(ValueError, match="no student_ft rows"):
        analysis.accuracy_vs_gamma2(sweep_df, method="student_ft")
    with pytest.raises(ValueError, match="'gamma2' is null in 8 kd_single row"):
        analysis.accuracy_vs_gamma2(sweep_df, method="kd_single")


# ---------------------------------------------------------------- main table


def _main_rows():
    rows = []
    rows += _rows("student_ft", "books", [0.70, 0.74])
    rows += _rows("student_ft", "dvd", [0.60, 0.62])
    rows += _rows("kd_single", "books", [0.80])  # one seed only
    rows += _rows("kd_single", "dvd", [0.70])
    rows += _rows("metakd", "books", [0.85, 0.87, 0.89])  # seed 2 has no dvd yet
    rows += _rows("metakd", "dvd", [0.75, 0.79])
    rows += _rows("metakd", "dvd", [0.10, 0.10], status="failed")
    rows += _rows("metakd", "dvd", [0.99, 0.99], split="dev")
    return rows


@pytest.fixture
def main_df():
    return _frame(_main_rows())


def test_main_table(main_df):
    t = analysis.main_table(main_df)
    assert list(t.columns) == ["method", "domain", "mean", "std", "count"]
    assert list(zip(t["method"], t["domain"])) == [
        ("student_ft", "books"), ("student_ft", "dvd"), ("student_ft", "average"),
        ("kd_single", "books"), ("kd_single", "dvd"), ("kd_single", "average"),
        ("metakd", "books"), ("metakd", "dvd"), ("metakd", "average"),
    ]
    m = _cell(t, method="metakd", domain="books")
    assert (m["mean"], m["std"], m["count"]) == (pytest.approx(0.87), pytest.approx(0.02), 3)
    m = _cell(t, method="metakd", domain="dvd")  # the failed and dev rows do not count
    assert (m["mean"], m["std"], m["count"]) == (pytest.approx(0.77), pytest.approx(0.04 / SQRT2), 2)
    # average over seeds 0 and 1 only (seed 2 lacks dvd): (0.85+0.75)/2 = 0.80, (0.87+0.79)/2 = 0.83
    m = _cell(t, method="metakd", domain="average")
    assert (m["mean"], m["std"], m["count"]) == (pytest.approx(0.815), pytest.approx(0.03 / SQRT2), 2)
    k = _cell(t, method="kd_single", domain="average")
    assert k["mean"] == pytest.approx(0.75) and k["count"] == 1 and math.isnan(k["std"])


def test_pivot_main_table(main_df):
    long = analysis.main_table(main_df)
    wide = analysis.pivot_main_table(long)
    assert list(wide.index) == ["student_ft", "kd_single", "metakd"]
    assert list(wide.columns) == ["books", "dvd", "average"]
    assert wide.loc["metakd", "books"] == "87.00 ± 2.00"
    assert wide.loc["kd_single", "dvd"] == "70.00"  # one seed: no spread
    means = analysis.pivot_main_table(long, value="mean", percent=False)
    assert means.loc["student_ft", "average"] == pytest.approx(0.665)
    with pytest.raises(ValueError, match="value must be"):
        analysis.pivot_main_table(long, value="median")


def test_main_table_errors(main_df):
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['domain'\]"):
        analysis.main_table(main_df.drop(columns=["domain"]))
    failed_only = main_df.assign(status="failed")
    with pytest.raises(ValueError, match="no status='ok' rows"):
        analysis.main_table(failed_only)


# ---------------------------------------------------------------- student sizes


@pytest.fixture
def sizes_df():
    rows = []
    big = dict(student="tinybert", student_layers=4, student_hidden=312, student_params=14_500_000)
    small = dict(student="bert-tiny", student_layers=2, student_hidden=128, student_params=4_400_000)
    rows += _rows("metakd", "books", [0.84, 0.86], latency_ms_b1=2.0, latency_ms_b32=20.0, **big)
    rows += _rows("metakd", "dvd", [0.80, 0.78], latency_ms_b1=4.0, latency_ms_b32=30.0, **big)
    rows += _rows("metakd", "books", [0.70, 0.74], latency_ms_b1=1.0, latency_ms_b32=8.0, **small)
    rows += _rows("metakd", "dvd", [0.66, 0.70], latency_ms_b1=1.0, latency_ms_b32=8.0, **small)
    rows += _rows("kd_single", "books", [0.10, 0.10], latency_ms_b1=9.0, **small)
    return _frame(rows)


def test_student_size_table(sizes_df):
    t = analysis.student_size_table(sizes_df)
    assert t["label"].tolist() == ["bert-tiny (2L-128)", "tinybert (4L-312)"]
    small, big = t.iloc[0], t.iloc[1]
    # per seed domain averages: small 0.68, 0.72; big 0.82, 0.82
    assert small["mean"] == pytest.approx(0.70)
    assert small["std"] == pytest.approx(0.04 / SQRT2)
    assert small["count"] == 2
    assert (big["mean"], big["std"]) == (pytest.approx(0.82), pytest.approx(0.0))
    assert small["student_params"] == 4_400_000
    assert big["latency_ms_b1"] == pytest.approx(3.0)
    assert big["latency_ms_b32"] == pytest.approx(25.0)
    assert small["latency_ms_b1"] == pytest.approx(1.0)  # kd_single rows are not mixed in


# ---------------------------------------------------------------- Optuna search summary


def _search_df():
    # dev accuracy per trial = mean over 2 domains x 2 seeds; gamma2 matters, student barely
    trials = {
        "t0": ({"gamma2": 0.1, "student": "bert-mini", "lr": 5e-5}, [0.60, 0.62, 0.64, 0.66]),
        "t1": ({"gamma2": 0.3, "student": "bert-small", "lr": 5e-5}, [0.70, 0.72, 0.74, 0.76]),
        "t2": ({"gamma2": 0.5, "student": "bert-mini", "lr": 5e-5}, [0.80, 0.82, 0.84, 0.86]),
        "t3": ({"gamma2": 0.7, "student": "bert-small", "lr": 5e-5}, [0.78, 0.80, 0.82, 0.84]),
        "t4": ({"gamma2": 0.9, "student": "bert-mini", "lr": 5e-5}, [0.68, 0.70, 0.72, 0.74]),
    }
    rows = []
    for tid, (params, accs) in trials.items():
        cells = [(d, s) for d in ("books", "dvd") for s in (0, 1)]
        for (domain, seed), acc in zip(cells, accs):
            rows.append(dict(trial_id=tid, status="ok", seed=seed, method="metakd", domain=domain,
                             split="dev", accuracy=acc, search_params=params))
        rows.append(dict(trial_id=tid, status="ok", seed=0, method="metakd", domain="books",
                         split="test", accuracy=0.0, search_params=params))  # not the metric split
    return _frame(rows)


def test_search_summary_best_configs_and_importances():
    best, importances = analysis.search_summary(_search_df(), top=3)
    assert best["trial_id"].tolist() == ["t2", "t3", "t1"]
    assert best["accuracy"].tolist() == pytest.approx([0.83, 0.81, 0.73])
    assert best["count"].tolist() == [4, 4, 4]
    assert best.loc[0, "gamma2"] == 0.5 and best.loc[0, "student"] == "bert-mini"
    assert best.loc[0, "lr"] == 5e-5
    assert list(importances.columns) == ["param", "importance"]
    assert set(importances["param"]) == {"gamma2", "student"}  # lr does not vary
    assert importances["importance"].sum() == pytest.approx(1.0)
    assert importances["importance"].is_monotonic_decreasing
    assert importances.attrs["evaluator"] in ("fanova", "mean_decrease_impurity")


def test_search_summary_errors():
    df = _search_df()
    with pytest.raises(ValueError, match="at least 2 trials"):
        analysis.search_summary(df[df["trial_id"] == "t0"])
    constant = df.assign(search_params='{"gamma2": 0.5}')
    with pytest.raises(ValueError, match="no searched parameter varies"):
        analysis.search_summary(constant)
    with pytest.raises(ValueError, match="not JSON"):
        analysis.search_summary(df.assign(search_params="gamma2=0.5"))
    with pytest.raises(ValueError, match="search_params"):
        analysis.search_summary(df.drop(columns=["search_params"]))


def test_distribution_inference():
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    d = analysis._distribution([0.01, 0.1, 1.0])
    assert isinstance(d, FloatDistribution) and d.log and (d.low, d.high) == (0.01, 1.0)
    d = analysis._distribution([0.0, 0.5, 1.0])
    assert isinstance(d, FloatDistribution) and not d.log
    d = analysis._distribution(["bert-mini", 4, True])
    assert isinstance(d, CategoricalDistribution) and set(d.choices) == {"bert-mini", "4", "True"}


# ---------------------------------------------------------------- plots


def _assert_written(out):
    png, pdf = plots.output_paths(out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_plot_fig3(sweep_df, tmp_path):
    fig = plots.plot_fig3(analysis.improvement_vs_sample_rate(sweep_df), tmp_path / "fig3.png")
    _assert_written(tmp_path / "fig3.png")
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "Sample rate (fraction of training data)"
    assert ax.get_ylabel() == "Improvement over kd_single (%)"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["average"].get_linewidth() > lines["books"].get_linewidth()
    assert lines["average"].get_ydata().tolist() == pytest.approx([8.75, 100 * (0.05 + 3 / 70 + 0.10) / 4])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["books", "dvd", "average"]


def test_plot_fig4(sweep_df, tmp_path):
    fig = plots.plot_fig4(analysis.accuracy_vs_gamma2(sweep_df), tmp_path / "fig4.pdf")
    _assert_written(tmp_path / "fig4.png")
    (ax,) = fig.axes
    assert "gamma_2" in ax.get_xlabel()
    assert ax.get_ylabel() == "Accuracy (%)"
    assert ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["books", "dvd", "average"]


def test_plot_sizes(sizes_df, tmp_path):
    fig = plots.plot_sizes(analysis.student_size_table(sizes_df), tmp_path / "sub" / "sizes.png")
    _assert_written(tmp_path / "sub" / "sizes.png")
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "Student parameters (millions)"
    assert ax.get_ylabel() == "Accuracy (%)"
    notes = [t.get_text() for t in ax.texts]
    assert notes[0].startswith("bert-tiny (2L-128)") and notes[1].startswith("tinybert (4L-312)")


def test_output_paths():
    assert [p.name for p in plots.output_paths("out/fig3.png")] == ["fig3.png", "fig3.pdf"]
    assert [p.name for p in plots.output_paths("fig3.pdf")] == ["fig3.png", "fig3.pdf"]
    assert [p.name for p in plots.output_paths("fig.v2")] == ["fig.v2.png", "fig.v2.pdf"]


# ---------------------------------------------------------------- CLI


@pytest.fixture
def sweep_dir(tmp_path):
    results.write_part(str(tmp_path / "main"), _main_rows(), "part-0")
    results.write_part(str(tmp_path / "fig"), _sweep_rows()[:20], "part-0")
    results.write_part(str(tmp_path / "fig"), _sweep_rows()[20:], "part-1")
    return tmp_path


def _run(*argv):
    parser = argparse.ArgumentParser(prog="metakd")
    cli_report.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_cli_results_prints_the_table(sweep_dir, capsys):
    assert _run("results", sweep_dir / "main") == 0
    out = capsys.readouterr().out
    assert "Accuracy (%) on the test split" in out
    metakd_line = next(line for line in out.splitlines() if line.startswith("metakd"))
    assert metakd_line.split()[1:] == ["87.00", "±", "2.00", "77.00", "±", "2.83", "81.50", "±", "2.12"]


def test_cli_table_formats(sweep_dir, capsys, tmp_path):
    assert _run("table", sweep_dir / "main", "--format", "csv") == 0
    csv = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(csv.columns) == ["method", "domain", "accuracy_mean_pct", "accuracy_std_pct", "seeds"]
    row = csv[(csv["method"] == "metakd") & (csv["domain"] == "average")].iloc[0]
    assert row["accuracy_mean_pct"] == pytest.approx(81.5) and row["seeds"] == 2

    assert _run("table", sweep_dir / "main", "--format", "markdown") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| method | books | dvd | average |"
    assert lines[1] == "| --- | ---: | ---: | ---: |"
    assert lines[-1] == "| metakd | 87.00 ± 2.00 | 77.00 ± 2.83 | 81.50 ± 2.12 |"

    out = tmp_path / "tables" / "main.tex"
    assert _run("table", sweep_dir / "main", "--format", "latex", "-o", out) == 0
    tex = out.read_text()
    assert r"\begin{tabular}{lrrr}" in tex and r"\bottomrule" in tex
    assert r"kd\_single & 80.00 & 70.00 & 75.00 \\" in tex
    assert r"metakd & 87.00 $\pm$ 2.00" in tex


def test_cli_plot_writes_png_and_pdf(sweep_dir, capsys, tmp_path):
    out = tmp_path / "plots" / "fig3.png"
    assert _run("plot", "fig3", sweep_dir / "fig", "-o", out) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out), str(out.with_suffix(".pdf"))]
    _assert_written(out)
    assert _run("plot", "fig4", sweep_dir / "fig", "-o", tmp_path / "fig4.png") == 0
    _assert_written(tmp_path / "fig4.png")


def test_cli_errors_return_2(sweep_dir, capsys, tmp_path):
    assert _run("plot", "fig3", sweep_dir / "main", "--baseline", "kd_mix", "-o", tmp_path / "x.png") == 2
    assert "error: no kd_mix rows" in capsys.readouterr().err
    assert _run("results", tmp_path / "missing") == 2
    assert "error: no results parquet parts" in capsys.readouterr().err
    assert _run("plot", "sizes", sweep_dir / "fig", "-o", tmp_path / "s.png") == 2
    assert "error: plot_sizes: student_params is missing" in capsys.readouterr().err

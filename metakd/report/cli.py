"""``metakd results | plot | table | compare``: read a sweep's results and print, plot or export them.

``register(subparsers)`` adds these subcommands to the main ``metakd`` parser; each sets
``func(args) -> exit code``. Analysis errors (a missing method, split or column, a path
with no results) print ``error: ...`` to stderr and return 2. Collapsed students (see
``metakd.report.analysis``) are counted in, and named on stderr, unless ``--exclude-collapsed``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from pathlib import Path

import pandas as pd

from metakd.report import analysis, results

_SPLITS = ("dev", "test")


def _exclude_flag(p) -> None:
    p.add_argument(
        "--exclude-collapsed", action="store_true",
        help="leave out students whose dev accuracy ended at or below the dev majority-class rate "
        "(default: keep them and say how many there are)",
    )
    p.add_argument(
        "--strict", action="store_true",
        help="fail on a results part that cannot be read (default: name it on stderr and skip it)",
    )


def register(subparsers) -> None:
    """Add ``results``, ``plot``, ``table`` and ``compare`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "results",
        help="print the main table (methods x domains + average, accuracy %)",
        description="Print test (or dev) accuracy per method and target domain, "
        "mean ± std over seeds, in %.",
    )
    p.add_argument(
        "path", help="sweep directory (<storage>/<name>), its results/ directory, or a .parquet file"
    )
    p.add_argument("--split", default="test", choices=_SPLITS, help="which split's accuracy (default: test)")
    _exclude_flag(p)
    p.set_defaults(func=_guard(cmd_results))

    p = subparsers.add_parser(
        "plot",
        help="write Figure 3 / Figure 4 / student-size plots (PNG + PDF, or the format of -o's suffix)",
        description="fig3: improvement over the baseline vs sample rate; fig4: accuracy vs gamma2; "
        "sizes: accuracy vs student parameters.",
    )
    p.add_argument("figure", choices=("fig3", "fig4", "sizes"), help="which figure")
    p.add_argument("path", help="sweep directory, its results/ directory, or a .parquet file")
    p.add_argument(
        "-o", "--out", default=None,
        help="output file; its suffix is the format (.svg, .jpg, ...), and for .png (or no suffix) a PDF "
        "with the same stem is written too (default: <figure>.png)",
    )
    p.add_argument("--method", default="metakd", help="method to plot (default: metakd)")
    p.add_argument(
        "--baseline", default="kd_single", help="fig3 only: method to compare with (default: kd_single)"
    )
    p.add_argument("--split", default="test", choices=_SPLITS, help="which split's accuracy (default: test)")
    _exclude_flag(p)
    p.set_defaults(func=_guard(cmd_plot))

    p = subparsers.add_parser(
        "table",
        help="export the main table as markdown, LaTeX or CSV",
        description="markdown and latex: methods x domains + average, 'mean ± std' in %; "
        "csv: the tidy long form (method, domain, accuracy_mean_pct, accuracy_std_pct, seeds).",
    )
    p.add_argument("path", help="sweep directory, its results/ directory, or a .parquet file")
    p.add_argument("--format", default="markdown", choices=("markdown", "latex", "csv"), help="output format")
    p.add_argument("--split", default="test", choices=_SPLITS, help="which split's accuracy (default: test)")
    p.add_argument("-o", "--out", default=None, help="write to this file instead of stdout")
    p.add_argument(
        "--compare", nargs="+", default=[], metavar="BASELINE",
        help="add a row '<method> - BASELINE' per baseline: the paired difference in points with its 95%% "
        "t-interval over seeds (see `metakd compare`)",
    )
    p.add_argument("--method", default="metakd", help="with --compare: the method compared (default: metakd)")
    _exclude_flag(p)
    p.set_defaults(func=_guard(cmd_table))

    p = subparsers.add_parser(
        "compare",
        help="paired comparison of two methods: difference, 95%% t-interval, p-value, wins/ties/losses",
        description="Pairs the method's and the baseline's accuracy by seed, target domain and configuration; "
        "per domain and for the average (domains averaged within a seed first) prints the mean paired "
        "difference in points, its 95% t-interval over seeds, the paired t-test p-value and wins/ties/losses.",
    )
    p.add_argument("path", help="sweep directory, its results/ directory, or a .parquet file")
    p.add_argument("--baseline", nargs="+", default=["kd_single"],
                   help="method(s) to compare with (default: kd_single)")
    p.add_argument("--method", default="metakd", help="method compared (default: metakd)")
    p.add_argument("--split", default="test", choices=_SPLITS, help="which split's accuracy (default: test)")
    p.add_argument("--by", nargs="+", default=[], metavar="COLUMN",
                   help="also group by these columns (e.g. sample_rate, gamma2)")
    _exclude_flag(p)
    p.set_defaults(func=_guard(cmd_compare))


def guarded(*errors: type[BaseException]):
    """A command whose ``errors`` (bad input) print one ``metakd: error:`` line and exit 2."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            try:
                return fn(args)
            except errors as e:
                print(f"metakd: error: {e}", file=sys.stderr)
                return 2

        return run

    return wrap


_guard = guarded(ValueError, FileNotFoundError)


def _load(args: argparse.Namespace) -> pd.DataFrame:
    """The results table; a corrupt part is named on stderr and skipped (``--strict``: an error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", results.CorruptPartWarning)  # said once below, without a source line
        df = results.load(args.path, strict=args.strict)
    for path, reason in df.attrs.get("skipped_parts", []):
        print(f"warning: skipped corrupt results part {path}: {reason} (--strict makes this an error)",
              file=sys.stderr)
    return df


def _collapse_note(attrs: dict) -> None:
    """Say on stderr how many collapsed students the numbers include or leave out: never silently."""
    n, excluded = attrs.get("collapsed", 0), attrs.get("excluded", 0)
    if excluded:
        print(f"note: {excluded} collapsed student(s) excluded (--exclude-collapsed)", file=sys.stderr)
    elif n:
        print(f"note: {n} collapsed student(s) (dev accuracy <= dev majority-class rate) are included; "
              "--exclude-collapsed leaves them out", file=sys.stderr)


def cmd_results(args: argparse.Namespace) -> int:
    df = _load(args)
    long = analysis.main_table(df, split=args.split, exclude_collapsed=args.exclude_collapsed)
    counts = sorted(set(long["count"]))
    seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    print(f"Accuracy (%) on the {args.split} split, mean ± std over seeds ({seeds} per cell)")
    print(analysis.pivot_main_table(long).to_string())
    _collapse_note(long.attrs)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from metakd.report import plots  # matplotlib only when plotting

    df = _load(args)
    out = args.out or f"{args.figure}.png"
    skip = args.exclude_collapsed
    if args.figure == "fig3":
        table = analysis.improvement_vs_sample_rate(df, args.method, args.baseline, args.split, skip)
        plots.plot_fig3(table, out)
    elif args.figure == "fig4":
        table = analysis.accuracy_vs_gamma2(df, args.method, args.split, skip)
        plots.plot_fig4(table, out)
    else:
        table = analysis.student_size_table(df, args.method, args.split, skip)
        plots.plot_sizes(table, out)
    _collapse_note(table.attrs)
    for path in plots.output_paths(out):
        print(path)
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    df = _load(args)
    long = analysis.main_table(df, split=args.split, exclude_collapsed=args.exclude_collapsed)
    comparisons = {
        b: analysis.compare_methods(df, args.method, b, args.split, exclude_collapsed=args.exclude_collapsed)
        for b in args.compare
    }
    if args.format == "csv":
        table = long.assign(mean=long["mean"] * 100, std=long["std"] * 100).rename(
            columns={"mean": "accuracy_mean_pct", "std": "accuracy_std_pct", "count": "seeds"}
        )
        for b, cmp in comparisons.items():  # one row per domain: method "<method> - <baseline>"
            table = pd.concat([table, pd.DataFrame({
                "method": f"{args.method} - {b}", "domain": cmp["domain"], "seeds": cmp["n"],
                "diff_pct": cmp["diff"], "ci_low_pct": cmp["ci_low"], "ci_high_pct": cmp["ci_high"],
                "p_value": cmp["p_value"],
            })], ignore_index=True)
        text = table.to_csv(index=False)
    else:
        wide = with_comparisons(analysis.pivot_main_table(long), args.method, comparisons)
        if args.format == "markdown":
            text = to_markdown(wide)
        else:
            caption = f"Accuracy (%) on the {args.split} split, mean ± std over seeds."
            if comparisons:
                caption += (f" Rows '{args.method} - baseline': paired difference in points with its 95% "
                            "t-interval over seeds.")
            text = to_latex(wide, caption=caption)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(args.out)
    else:
        sys.stdout.write(text)
    _collapse_note(long.attrs)
    return 0


def with_comparisons(wide: pd.DataFrame, method: str, comparisons: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """``wide`` plus one row ``"<method> - <baseline>"`` per comparison: ``difference_cell`` per domain."""
    for baseline, cmp in comparisons.items():
        cells = {r["domain"]: analysis.difference_cell(r) for _, r in cmp.iterrows()}
        row = pd.DataFrame([[cells.get(c, "-") for c in wide.columns]], columns=wide.columns,
                           index=[f"{method} - {baseline}"])
        wide = pd.concat([wide.astype(object), row])
    return wide


def cmd_compare(args: argparse.Namespace) -> int:
    df = _load(args)
    for i, baseline in enumerate(args.baseline):
        cmp = analysis.compare_methods(df, args.method, baseline, args.split, by=args.by,
                                       exclude_collapsed=args.exclude_collapsed)
        print(("\n" if i else "") + format_comparison(cmp))
        if i == len(args.baseline) - 1:
            _collapse_note(cmp.attrs)
    return 0


def format_comparison(cmp: pd.DataFrame, digits: int = 2) -> str:
    """A readable text table of ``analysis.compare_methods`` output, with a header saying what it is."""
    a = cmp.attrs
    method, baseline = a.get("method", "method"), a.get("baseline", "baseline")
    level = round(100 * a.get("confidence", 0.95))
    by = [c for c in cmp.columns if c not in _COMPARE_COLUMNS]
    lines = [
        f"{method} - {baseline}, {a.get('split', 'test')} accuracy: paired difference in points over seeds "
        f"(pairs: same seed, domain and configuration), {level}% t-interval, paired t-test p",
    ]
    table = pd.DataFrame({
        **{c: cmp[c] for c in by},
        "domain": cmp["domain"],
        "seeds": cmp["n"],
        method: cmp["method_mean"].map(lambda v: f"{v:.{digits}f}"),
        baseline: cmp["baseline_mean"].map(lambda v: f"{v:.{digits}f}"),
        f"difference [{level}% CI]": [analysis.difference_cell(r, digits) for _, r in cmp.iterrows()],
        "p": cmp["p_value"].map(lambda v: "-" if pd.isna(v) else f"{v:.3g}"),
        "W/T/L": [f"{r.wins}/{r.ties}/{r.losses}" for r in cmp.itertuples(index=False)],
    })
    lines.append(table.to_string(index=False))
    notes = sorted({n for n in cmp["note"] if n})
    lines += [f"note: {n}" for n in notes]
    unpaired = {k: v for k, v in a.get("unpaired", {}).items() if v}
    if unpaired:
        lines.append("note: cells (seed, domain, configuration) without a partner, left out: "
                     + ", ".join(f"{k} {v}" for k, v in unpaired.items()))
    return "\n".join(lines)


_COMPARE_COLUMNS = ("domain", "n", "method_mean", "baseline_mean", "diff", "diff_std", "ci_low", "ci_high",
                    "p_value", "wins", "ties", "losses", "note")


def to_markdown(wide: pd.DataFrame) -> str:
    """A GitHub markdown table of a wide table (index as the first column)."""
    header = [wide.index.name or "method", *map(str, wide.columns)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([" --- "] + [" ---: "] * len(wide.columns)) + "|",
    ]
    for name, row in wide.iterrows():
        cells = [str(name), *(str(v).replace("|", "\\|") for v in row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(c, c) for c in text).replace("±", r"$\pm$")


def to_latex(wide: pd.DataFrame, caption: str | None = None) -> str:
    """A booktabs ``tabular`` (inside a ``table`` when ``caption`` is given) of a wide table."""
    header = [wide.index.name or "method", *map(str, wide.columns)]
    body = [
        r"\begin{tabular}{l" + "r" * len(wide.columns) + "}",
        r"\toprule",
        " & ".join(_latex_escape(h) for h in header) + r" \\",
        r"\midrule",
    ]
    for name, row in wide.iterrows():
        body.append(" & ".join(_latex_escape(str(v)) for v in [name, *row]) + r" \\")
    body += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        caption = r"\caption{" + _latex_escape(caption) + "}"
        body = [r"\begin{table}[t]", r"\centering", *body, caption, r"\end{table}"]
    return "\n".join(body) + "\n"

"""``metakd results | plot | table``: read a sweep's results and print, plot or export them.

``register(subparsers)`` adds the three subcommands to the main ``metakd`` parser; each sets
``func(args) -> exit code``. Analysis errors (a missing method, split or column, a path
with no results) print ``error: ...`` to stderr and return 2.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import pandas as pd

from metakd import analysis, results

_SPLITS = ("dev", "test")


def register(subparsers) -> None:
    """Add ``results``, ``plot`` and ``table`` to an ``argparse`` subparsers object."""
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
    p.set_defaults(func=_guard(cmd_results))

    p = subparsers.add_parser(
        "plot",
        help="write Figure 3 / Figure 4 / student-size plots (PNG + PDF)",
        description="fig3: improvement over the baseline vs sample rate; fig4: accuracy vs gamma2; "
        "sizes: accuracy vs student parameters.",
    )
    p.add_argument("figure", choices=("fig3", "fig4", "sizes"), help="which figure")
    p.add_argument("path", help="sweep directory, its results/ directory, or a .parquet file")
    p.add_argument(
        "-o", "--out", default=None,
        help="output PNG path; a PDF with the same stem is written too (default: <figure>.png)",
    )
    p.add_argument("--method", default="metakd", help="method to plot (default: metakd)")
    p.add_argument(
        "--baseline", default="kd_single", help="fig3 only: method to compare with (default: kd_single)"
    )
    p.add_argument("--split", default="test", choices=_SPLITS, help="which split's accuracy (default: test)")
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
    p.set_defaults(func=_guard(cmd_table))


def _guard(fn):
    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def cmd_results(args: argparse.Namespace) -> int:
    long = analysis.main_table(results.load(args.path), split=args.split)
    counts = sorted(set(long["count"]))
    seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    print(f"Accuracy (%) on the {args.split} split, mean ± std over seeds ({seeds} per cell)")
    print(analysis.pivot_main_table(long).to_string())
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from metakd import plots  # matplotlib only when plotting

    df = results.load(args.path)
    out = args.out or f"{args.figure}.png"
    if args.figure == "fig3":
        plots.plot_fig3(analysis.improvement_vs_sample_rate(df, args.method, args.baseline, args.split), out)
    elif args.figure == "fig4":
        plots.plot_fig4(analysis.accuracy_vs_gamma2(df, args.method, args.split), out)
    else:
        plots.plot_sizes(analysis.student_size_table(df, args.method, args.split), out)
    for path in plots.output_paths(out):
        print(path)
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    long = analysis.main_table(results.load(args.path), split=args.split)
    if args.format == "csv":
        text = long.assign(mean=long["mean"] * 100, std=long["std"] * 100).rename(
            columns={"mean": "accuracy_mean_pct", "std": "accuracy_std_pct", "count": "seeds"}
        ).to_csv(index=False)
    elif args.format == "markdown":
        text = to_markdown(analysis.pivot_main_table(long))
    else:
        caption = f"Accuracy (%) on the {args.split} split, mean ± std over seeds."
        text = to_latex(analysis.pivot_main_table(long), caption=caption)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(args.out)
    else:
        sys.stdout.write(text)
    return 0


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

"""Figure 3, Figure 4 and the student-size plot from the tables of ``metakd.report.analysis``.

Each function draws on a standalone Agg figure (no pyplot state, works headless), saves
``out`` as PNG (dpi 150) and the same stem as PDF (or, for another suffix such as ``.svg``,
in that format alone; :func:`output_paths`), and returns the Figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from metakd.report.analysis import AVERAGE

_LEGEND = dict(bbox_to_anchor=(1.02, 1), loc="upper left", borderaxespad=0.0, frameon=False)


def output_paths(out: str | Path) -> tuple[Path, ...]:
    """The files written for ``out``: ``fig3.png`` (or ``fig3.pdf``, ``fig3``) -> ``fig3.png``, ``fig3.pdf``;
    another format matplotlib writes keeps its suffix and is written alone (``fig.svg`` -> ``fig.svg``).
    A suffix that is no image format is part of the name (``fig.v2`` -> ``fig.v2.png``, ``fig.v2.pdf``)."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".png", ".pdf") and suffix[1:] in FigureCanvasAgg.get_supported_filetypes():
        return (out,)
    stem = out.with_suffix("") if suffix in (".png", ".pdf") else out
    return stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=(7.0, 4.5))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, out: str | Path) -> Figure:
    for path in output_paths(out):
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")  # dpi only matters for raster formats
    return fig


def _check(table: pd.DataFrame, columns: list[str], name: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{name}: table lacks column(s) {missing}")
    if table.empty:
        raise ValueError(f"{name}: table is empty")


def _domain_lines(ax, table: pd.DataFrame, x: str, style: str) -> None:
    """One line per domain and a thick black ``average`` line, values in %, spread over seeds.

    ``style`` is ``"band"`` (shaded mean ± std) or ``"errorbar"``.
    """
    domains = [d for d in dict.fromkeys(table["domain"]) if d != AVERAGE]
    colors = iter(f"C{i % 10}" for i in range(len(domains)))
    for domain in [*domains, AVERAGE]:
        sub = table[table["domain"] == domain].sort_values(x)
        if sub.empty:
            continue
        xs = sub[x].to_numpy(float)
        mean = sub["mean"].to_numpy(float) * 100
        std = np.nan_to_num(sub["std"].to_numpy(float) * 100)  # one seed: no spread to show
        is_avg = domain == AVERAGE
        color = "black" if is_avg else next(colors)
        kw = dict(color=color, label=domain, lw=2.8 if is_avg else 1.3, marker="o", ms=5 if is_avg else 4,
                  zorder=3 if is_avg else 2)
        if style == "band":
            ax.plot(xs, mean, **kw)
            ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.12 if is_avg else 0.15, lw=0)
        else:
            ax.errorbar(xs, mean, yerr=std, capsize=3, **kw)


def plot_fig3(table: pd.DataFrame, out: str | Path) -> Figure:
    """Improvement rate (%) vs sample rate (log x), from ``analysis.improvement_vs_sample_rate``."""
    _check(table, ["sample_rate", "domain", "mean", "std"], "plot_fig3")
    if (table["sample_rate"] <= 0).any():
        raise ValueError("plot_fig3: sample rates must be > 0 for a log-scaled axis")
    method = table.attrs.get("method", "metakd")
    baseline = table.attrs.get("baseline", "kd_single")
    split = table.attrs.get("split", "test")
    fig, ax = _figure()
    _domain_lines(ax, table, "sample_rate", style="band")
    ax.axhline(0.0, color="grey", lw=0.8, ls="--", zorder=1)
    ax.set_xscale("log")
    rates = sorted(table["sample_rate"].unique())
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("Sample rate (fraction of training data)")
    ax.set_ylabel(f"Improvement over {baseline} (%)")
    ax.set_title(f"{method} vs {baseline} by training-data size ({split}, mean ± std over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(title="target domain", **_LEGEND)
    return _save(fig, out)


def plot_fig4(table: pd.DataFrame, out: str | Path) -> Figure:
    """Accuracy (%) vs gamma2 with std-over-seeds error bars, from ``analysis.accuracy_vs_gamma2``."""
    _check(table, ["gamma2", "domain", "mean", "std"], "plot_fig4")
    method = table.attrs.get("method", "metakd")
    split = table.attrs.get("split", "test")
    fig, ax = _figure()
    _domain_lines(ax, table, "gamma2", style="errorbar")
    ax.set_xlabel(r"$\gamma_2$ (weight of the domain-representation loss $L_{TKD}$, unitless)")
    ax.set_ylabel("Accuracy (%)")
    ax.set_title(f"{method} accuracy vs $\\gamma_2$ ({split}, mean ± std over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(title="target domain", **_LEGEND)
    return _save(fig, out)


# how each kind of student is drawn on the size plot: dense, and the prune structures (cap-pruning spec)
_SIZE_STYLES = {"dense": ("o", "C0", "dense students"), "unstructured": ("s", "C1", "pruned: unstructured"),
                "heads_ffn": ("^", "C2", "pruned: heads + FFN neurons")}
# what a pruned student's latency measured (metakd.train.pruned)
_LATENCY_NOTES = {"dense_masked": " (zeros in dense matrices)", "physical": " (pruned units removed)"}


def plot_sizes(table: pd.DataFrame, out: str | Path) -> Figure:
    """Accuracy (%) vs nonzero student parameters (millions, log x), from ``analysis.student_size_table``:
    dense students (their parameters) and pruned ones (the parameters pruning left) on one axis,
    one marker per kind."""
    _check(table, ["label", "mean", "std", "student_params"], "plot_sizes")
    if table["student_params"].isna().any():
        missing = ", ".join(map(str, table.loc[table["student_params"].isna(), "label"]))
        raise ValueError(f"plot_sizes: student_params is missing for {missing}")
    method = table.attrs.get("method", "metakd")
    split = table.attrs.get("split", "test")
    fig, ax = _figure()
    x_column = "student_nonzero_params" if "student_nonzero_params" in table else "student_params"
    params = table[x_column].fillna(table["student_params"]).to_numpy(float) / 1e6
    mean = table["mean"].to_numpy(float) * 100
    std = np.nan_to_num(table["std"].to_numpy(float) * 100)
    kinds = table["kind"].fillna("dense") if "kind" in table else pd.Series(["dense"] * len(table))
    for kind, (marker, color, name) in _SIZE_STYLES.items():
        at = (kinds == kind).to_numpy()
        if at.any():
            ax.errorbar(params[at], mean[at], yerr=std[at], fmt=marker, capsize=3, color=color,
                        label=f"{method}, {name} (mean ± std over seeds)")
    latency = table["latency_ms_b1"] if "latency_ms_b1" in table else pd.Series([np.nan] * len(table))
    latency_kind = table["latency_kind"] if "latency_kind" in table else pd.Series([None] * len(table))
    previous = -np.inf
    for x, y, label, ms, how in zip(params, mean, table["label"], latency, latency_kind):
        note = _LATENCY_NOTES.get(how, "") if isinstance(how, str) else ""
        text = label if pd.isna(ms) else f"{label}\n{ms:.1f} ms at batch 1{note}"
        # below a point that is lower than its smaller neighbour: close sizes (4L-256, 4L-312) do not collide
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, 6 if y >= previous else -24), fontsize=8)
        previous = y
    ax.set_xscale("log")
    # room on the right for the last point's note; round-number ticks instead of 4x10^0
    ax.set_xlim(params.min() / 1.5, params.max() * 2.5)
    lo, hi = ax.get_xlim()
    ticks = [t * 10.0**e for e in range(-3, 6) for t in (1, 2, 5) if lo <= t * 10.0**e <= hi]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(y=0.15)
    pruned = bool((kinds != "dense").any())
    ax.set_xlabel("Student parameters, nonzero (millions)" if pruned else "Student parameters (millions)")
    ax.set_ylabel("Accuracy (%)")
    ax.set_title(f"Student size vs accuracy ({split}, average over domains)")
    ax.grid(True, alpha=0.3)
    ax.legend(**_LEGEND)
    return _save(fig, out)

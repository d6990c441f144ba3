"""Figures: the report's (``engine.report.document``) and the benchmarks' (``--plot``), one small PNG each.

matplotlib is an optional extra (``pip install "actcap-engine[plot]"``). ``load_pyplot`` is the one place
that imports it: without it, a ConfigError naming the extra, which every command turns into its one-line
error before it does any work. The figures draw tables (column name -> numpy array) exactly as the CSV files
beside them hold them, so what a test checks in a CSV is what the picture shows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from engine.errors import ConfigError

PLOT_EXTRA = 'pip install "actcap-engine[plot]"'
WIDTH_IN, PANEL_HEIGHT_IN, DPI = 7.5, 3.4, 96  # ~720 x 330 pixels a panel: a few tens of kB as PNG
# One colour per kind of row, the same in every figure
ALL, READ, SINK, OUTLIER, LIMIT = "C0", "C2", "C1", "C3", "0.35"


def load_pyplot():
    """matplotlib.pyplot on the Agg backend (files only: no screen needed).

    Raises:
        ConfigError: matplotlib is not installed (the message names the extra that installs it).
    """
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(f"drawing pictures needs matplotlib, which is missing: {PLOT_EXTRA}") from None
    matplotlib.use("Agg")  # before pyplot is imported: a machine without a display must still draw
    import matplotlib.pyplot as plt

    return plt


def exit_unless_available() -> None:
    """For scripts (the benchmarks' ``--plot``): without matplotlib, print the one-line error naming the
    extra and exit with status 2, before any work."""
    try:
        load_pyplot()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def figure(panels: int = 1, title: str = ""):
    """A figure of ``panels`` panels stacked, sharing the x axis; returns (figure, list of axes)."""
    plt = load_pyplot()
    fig, axes = plt.subplots(panels, 1, figsize=(WIDTH_IN, PANEL_HEIGHT_IN * panels), sharex=True,
                             squeeze=False, layout="constrained")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, list(axes[:, 0])


def save(fig, path: str | Path) -> Path:
    """Write the figure as a PNG and free it (pyplot keeps every open figure otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    load_pyplot().close(fig)
    return path


def legend(ax, below: bool = True, ncols: int = 3) -> None:
    """The legend under the figure (it hides no data), or inside the panel where a figure has several."""
    if below:
        ax.figure.legend(loc="outside lower center", ncols=ncols, fontsize=7, frameon=False)
    else:
        ax.legend(fontsize=7, loc="best", framealpha=0.85)


def _log_y(ax) -> None:
    """A log y axis labelled in plain numbers, minor ticks too when it spans little (else matplotlib writes
    1.25 x 10^0)."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))


def norm_by_position(table: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """Mean and p99 of the row norms at each position (all rows, and the rows read by default), the largest
    norm there, and the rows flagged ``outlier`` as red crosses with their count: an attention sink is a high
    first position, a massive activation a cross far above the green line."""
    fig, (ax,) = figure(title=title)
    x = table["position_start"]
    ax.plot(x, table["max_norm"], color=LIMIT, lw=0.8, ls=":", label="largest norm, all rows")
    ax.plot(x, table["mean_norm"], color=ALL, lw=1.2, label="mean, all rows")
    ax.plot(x, table["p99_norm"], color=ALL, lw=1.0, ls="--", label="p99, all rows")
    ax.plot(x, table["mean_norm_read"], color=READ, lw=1.4, label="mean, rows read by default")
    ax.plot(x, table["p99_norm_read"], color=READ, lw=1.0, ls="--", label="p99, rows read by default")
    flagged = table["rows_outlier"] > 0
    if flagged.any():
        ax.scatter(x[flagged], table["max_norm_outlier"][flagged], marker="x", color=OUTLIER, zorder=3,
                   label=f"rows flagged outlier at some point ({int(table['rows_outlier'].sum()):,}): "
                   "largest, count")
        for i in np.flatnonzero(flagged)[np.argsort(-table["max_norm_outlier"][flagged])][:8]:
            ax.annotate(f"{int(table['rows_outlier'][i])}", (x[i], table["max_norm_outlier"][i]), fontsize=7,
                        color=OUTLIER, xytext=(4, 2), textcoords="offset points")
    _log_y(ax)
    ax.set_xlabel("position in the sequence" + (" (buckets beyond 128)" if _bucketed(table) else ""))
    ax.set_ylabel("L2 norm of the row")
    legend(ax)
    return save(fig, path)


def _bucketed(table: dict[str, np.ndarray]) -> bool:
    return bool(np.any(table["position_stop"] - table["position_start"] > 1))


def norm_histogram(table: dict[str, np.ndarray], title: str, threshold: float | None, rule: str,
                   path: Path) -> Path:
    """Rows per norm bin (log-log), by kind of row, with the outlier rule's threshold marked (``rule``: its
    legend; without a threshold, a note saying why)."""
    fig, (ax,) = figure(title=title)
    edges = np.append(table["norm_low"], table["norm_high"][-1:])
    for column, color, label in (("rows_read", READ, "rows read by default"),
                                 ("rows_sink", SINK, "sinks (bos, first)"),
                                 ("rows_outlier", OUTLIER, "flagged outlier")):
        counts = table[column]
        if counts.any():
            ax.stairs(counts, edges, color=color, lw=1.2, label=f"{label} ({int(counts.sum()):,})")
    if threshold is not None:
        ax.axvline(threshold, color=LIMIT, ls="--", lw=1.0, label=rule)
    else:
        ax.text(0.99, 0.97, rule, ha="right", va="top", transform=ax.transAxes, fontsize=7, color=LIMIT)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.7)
    ax.set_xlabel("L2 norm of the row")
    ax.set_ylabel("rows")
    legend(ax, ncols=2)
    return save(fig, path)


def drift(table: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """Mean norm of each block of rows in capture order (all rows, rows read by default) and the largest."""
    fig, (ax,) = figure(title=title)
    x = (table["row_start"] + table["row_stop"]) / 2
    ax.plot(x, table["max_norm"], color=LIMIT, lw=0.8, ls=":", marker=".", ms=3, label="largest norm")
    ax.plot(x, table["mean_norm"], color=ALL, lw=1.2, marker=".", ms=4, label="mean, all rows")
    ax.plot(x, table["mean_norm_read"], color=READ, lw=1.4, marker=".", ms=4,
            label="mean, rows read by default")
    _log_y(ax)
    ax.set_xlabel("row of the store (capture order)")
    ax.set_ylabel("L2 norm")
    legend(ax)
    return save(fig, path)


def capture_timeline(table: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """Tokens/s as chunks committed, and the seconds the forward waited for a free slot (per chunk, and in
    all); dotted lines where a run (a resume) began."""
    fig, (rate, stall) = figure(2, title)
    t = table["seconds"]
    rate.plot(t, table["tokens_per_s"], color=ALL, marker="o", ms=3, lw=1.2, label="tokens/s committed")
    rate.set_ylabel("tokens/s")
    rate.set_ylim(bottom=0)
    waits = table["stall_seconds"]
    if np.isfinite(waits).any():
        stall.vlines(t, 0, np.nan_to_num(waits), color=OUTLIER, lw=2, label="stall of the chunk's forwards")
        stall.plot(t, np.nancumsum(waits), color=LIMIT, lw=1.0, drawstyle="steps-post", label="stall in all")
        stall.set_ylim(bottom=0, top=max(np.nanmax(np.nancumsum(waits)) * 1.1, 1.0))
        legend(stall, below=False)
    else:
        stall.text(0.5, 0.5, "stall seconds are not recorded in this store's commit records\n(captured by "
                   "an engine before they were)", ha="center", va="center", transform=stall.transAxes,
                   fontsize=8)
    stall.set_ylabel("seconds waited")
    stall.set_xlabel("seconds since the capture began")
    stall.set_xlim(left=0)
    for start in table["run_start_seconds"][np.r_[True, np.diff(table["run"]) != 0]][1:]:
        for ax in (rate, stall):
            ax.axvline(start, color=LIMIT, ls=":", lw=1.0)
    legend(rate, below=False)
    return save(fig, path)

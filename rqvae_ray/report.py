"""The SID quality report of a run: a JSON file, a plain-text table and one PNG, from per-model SID summaries.

Each summary is what :meth:`rqvae_ray.sid_stats.SidCounter.summary` returns. Files are written atomically (a
temporary file beside the target, then ``os.replace``). matplotlib is imported only inside :func:`draw_quality_png`
and drives its own Agg canvas (no pyplot state), so Ray actors never import it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rqvae_ray import __version__
from rqvae_ray.errors import ReportError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# Bucket sizes (POIs per SID) are drawn in these bins: exact up to 5, then coarser.
SIZE_BINS = ((1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, 1000))
LEVEL_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22")
# Figure geometry in inches: one row per model, a title band on top.
FIGURE_WIDTH_IN, ROW_HEIGHT_IN, TOP_IN, LEFT_IN, RIGHT_IN, GAP_IN = 17.0, 2.5, 0.55, 0.65, 0.2, 0.55
BUCKET_PANEL_RATIO = 1.1
DPI = 110


def write_quality_json(path: str | Path, reports: dict[str, dict]) -> Path:
    """Write ``{"tool", "tool_version", "models": reports}`` as JSON to ``path`` atomically; returns the path."""
    document = {"tool": "rqvae_ray", "tool_version": __version__, "models": reports}
    data = (json.dumps(document, indent=2) + "\n").encode()
    return _atomic_write(Path(path), lambda staged: staged.write_bytes(data))


def quality_table(reports: dict[str, dict]) -> str:
    """A plain-text table of the key figures per model, followed by a legend."""
    levels = max((len(s["levels"]) for s in reports.values()), default=0)
    header = ["model", "POIs", "unique SIDs", "collided", "largest", "POIs collided"]
    header += [f"L{i} used/K" for i in range(1, levels + 1)] + [f"L{i} ppl" for i in range(1, levels + 1)]
    header += [f"share p{i}" for i in range(1, levels + 1)]
    rows = [header]
    for model, summary in reports.items():
        row = [model, *(f"{summary[k]:,}" for k in ("pois", "unique_sids", "collided_buckets", "largest_bucket"))]
        row.append(f"{summary['pois_in_collided_buckets']:,}")
        used = [f"{lv['codewords_used']}/{lv['codebook_size']}" for lv in summary["levels"]]
        perplexity = [f"{lv['perplexity']:.1f}" for lv in summary["levels"]]
        shared = [f"{summary['pois_sharing_prefix'].get(str(i), 0):,}" for i in range(1, len(summary["levels"]) + 1)]
        for values in (used, perplexity, shared):
            row += values + [""] * (levels - len(values))
        rows.append(row)
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    aligned = (
        [cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths, strict=True))]
        for row in rows
    )
    lines = ["  ".join(cells).rstrip() for cells in aligned]
    legend = (
        "collided: SIDs given to 2+ POIs; largest: most POIs on one SID; POIs collided: POIs whose SID is shared; "
        "Lk used/K: codewords of level k used; Lk ppl: perplexity of level k usage (at most K); "
        "share pk: POIs whose first k codes equal another POI's"
    )
    return "\n".join([*lines, "", legend])


def draw_quality_png(path: str | Path, reports: dict[str, dict]) -> Path:
    """Draw one PNG with a row per model: codeword usage per level and the bucket-size distribution (log scale)."""
    if not reports:
        raise ReportError(str(path), "no model summaries to draw")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    levels = max(len(s["levels"]) for s in reports.values())
    height = TOP_IN + ROW_HEIGHT_IN * len(reports)
    figure = Figure(figsize=(FIGURE_WIDTH_IN, height), dpi=DPI)
    FigureCanvasAgg(figure)
    figure.text(
        0.5,
        1 - 0.3 / height,
        "SID quality per model: codeword usage per level (dashed: uniform use, red ticks: unused codewords) "
        "and how many POIs share each SID",
        ha="center",
        va="center",
        fontsize=12,
        fontweight="bold",
    )
    ratios = [1.0] * levels + [BUCKET_PANEL_RATIO]
    unit = (FIGURE_WIDTH_IN - LEFT_IN - RIGHT_IN - GAP_IN * levels) / sum(ratios)
    for row, (model, summary) in enumerate(reports.items()):
        row_top = height - TOP_IN - row * ROW_HEIGHT_IN
        figure.text(
            0.2 / FIGURE_WIDTH_IN,
            (row_top - 0.18) / height,
            _headline(model, summary),
            fontsize=10,
            fontweight="bold",
            va="center",
        )
        bottom, top = row_top - ROW_HEIGHT_IN + 0.5, row_top - 0.62
        left = LEFT_IN
        for column, ratio in enumerate(ratios):
            box = (left / FIGURE_WIDTH_IN, bottom / height, unit * ratio / FIGURE_WIDTH_IN, (top - bottom) / height)
            left += unit * ratio + GAP_IN
            if column == levels:
                _draw_buckets(figure.add_axes(box), summary)
            elif column < len(summary["levels"]):
                _draw_usage(figure.add_axes(box), column, summary["levels"][column], summary["pois"])
    return _atomic_write(Path(path), lambda staged: figure.savefig(staged, format="png"))


def _headline(model: str, summary: dict) -> str:
    pois, unique = summary["pois"], summary["unique_sids"]
    share = f" ({unique / pois:.1%})" if pois else ""
    return (
        f"{model}:  {pois:,} POIs · {unique:,} unique SIDs{share} · {summary['collided_buckets']:,} collided SIDs "
        f"holding {summary['pois_in_collided_buckets']:,} POIs · largest bucket {summary['largest_bucket']:,}"
    )


def _draw_usage(axis: Axes, level: int, stats: dict, pois: int) -> None:
    usage, size = stats["usage"], stats["codebook_size"]
    from matplotlib.ticker import MaxNLocator

    color = LEVEL_COLORS[level % len(LEVEL_COLORS)]
    # One filled step outline rather than K bar patches: drawing stays fast with many models and large codebooks.
    axis.stairs(usage, [k - 0.5 for k in range(size + 1)], fill=True, color=color)
    axis.xaxis.set_major_locator(MaxNLocator(8, integer=True))
    axis.yaxis.set_major_locator(MaxNLocator(5, integer=True))
    if pois:
        axis.axhline(pois / size, color="black", linestyle="--", linewidth=0.8)
    unused = [k for k, count in enumerate(usage) if count == 0]
    if unused:
        axis.plot(unused, [0] * len(unused), linestyle="none", marker="|", markersize=9, color="red", clip_on=False)
    axis.set_title(
        f"level {level + 1}: {stats['codewords_used']}/{size} codewords used, perplexity {stats['perplexity']:.1f}",
        fontsize=8.5,
        y=1.0,  # a fixed position: matplotlib's automatic one measures every tick label, which is slow
    )
    axis.set_xlim(-1, size)
    axis.set_ylim(0, max(max(usage, default=0), 1) * 1.08)
    axis.set_xlabel("codeword", fontsize=7.5, labelpad=1)
    if level == 0:
        axis.set_ylabel("POIs", fontsize=7.5)
    axis.tick_params(labelsize=7)


def _draw_buckets(axis: Axes, summary: dict) -> None:
    from matplotlib.ticker import NullFormatter

    axis.set_title("SIDs by POIs per SID (green: unique, red: collided)", fontsize=8.5, y=1.0)
    axis.tick_params(labelsize=7)
    histogram = {int(size): count for size, count in summary["bucket_size_histogram"].items()}
    bins = [*SIZE_BINS, (SIZE_BINS[-1][1] + 1, math.inf)]
    counts = [sum(c for s, c in histogram.items() if low <= s <= high) for low, high in bins]
    if not any(counts):
        axis.text(0.5, 0.5, "no POIs", ha="center", va="center", transform=axis.transAxes, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
        return
    shown = max(i for i, count in enumerate(counts) if count) + 1
    colors = ["#2ca02c" if low == 1 else "#d62728" for low, _ in bins[:shown]]
    axis.set_ylim(0.7, max(10, max(counts) * 4))
    axis.set_yscale("log")
    axis.yaxis.set_minor_formatter(NullFormatter())
    bars = axis.bar(range(shown), counts[:shown], color=colors, width=0.8)
    axis.bar_label(bars, labels=[f"{c:,}" if c else "" for c in counts[:shown]], fontsize=6.5, padding=1)
    crowded = {"rotation": 30, "ha": "right", "rotation_mode": "anchor"} if shown > 8 else {}
    axis.set_xticks(range(shown), [_bin_label(low, high) for low, high in bins[:shown]], **crowded)
    axis.set_xlabel("POIs sharing one SID", fontsize=7.5, labelpad=1)
    axis.set_ylabel("SIDs (log)", fontsize=7.5)


def _bin_label(low: int, high: float) -> str:
    if high == math.inf:
        return f">{_short(low - 1)}"
    return str(low) if low == high else f"{low}-{_short(int(high))}"


def _short(number: int) -> str:
    return f"{number // 1000}k" if number >= 1000 and number % 1000 == 0 else str(number)


def _atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    staged = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(staged)
        os.replace(staged, path)
    except OSError as exc:
        raise ReportError(str(path), str(exc.strerror or exc)) from None
    finally:
        with contextlib.suppress(OSError):  # gone after os.replace; may be unreachable when the write failed
            staged.unlink(missing_ok=True)
    return path

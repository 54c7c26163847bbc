"""The SID quality report of a run: a JSON file, a plain-text table and one PNG, from per-model SID summaries.

Each summary is what :meth:`rqvae_ray.core.sid_stats.SidCounter.summary` returns. The JSON file accumulates: a run adds
its models to those already in the file (a shared report folder keeps every model's latest figures, also when runs
finish at the same time: :func:`write_quality_report` merges under the folder's lock). Files are
written atomically (a temporary file beside the target, then ``os.replace``). matplotlib is imported only inside
:func:`draw_quality_png` and drives its own Agg canvas (no pyplot state), so Ray actors never import it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rqvae_ray import __version__
from rqvae_ray.errors import ReportError
from rqvae_ray.outputs.staging import atomic_write, folder_lock

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.figure import Figure

# Bucket sizes (POIs per SID) are drawn in these bins: exact up to 5, then coarser.
SIZE_BINS = ((1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, 1000))
LEVEL_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22")
# Figure geometry in inches: one row per model, a band with the title, the legend and column headers on top.
FIGURE_WIDTH_IN, ROW_HEIGHT_IN, TOP_IN, LEFT_IN, RIGHT_IN, GAP_IN = 17.0, 2.35, 0.95, 0.55, 0.2, 0.5
BUCKET_PANEL_RATIO = 1.1
Box = tuple[float, float, float, float]  # a panel's left, bottom, width, height in inches
DPI = 110
TITLE = "SID quality per model: codeword usage per level, and how many POIs share each SID"
LEGEND = (
    "Per level: POIs per codeword, titled with the codewords used out of K and the usage perplexity (ppl, at most K); "
    "dashed: uniform use; red ticks: unused codewords.  Right: SIDs by POIs sharing them; green: unique, red: collided."
)
BUCKET_HEADER = "SIDs by POIs per SID (log scale)"
LOG_FLOOR = -0.15  # log10 of the bucket panels' lower edge: just below one SID, so a bar of 1 stays visible
SUMMARY_KEYS = frozenset(
    {"pois", "unique_sids", "collided_buckets", "largest_bucket", "pois_in_collided_buckets", "levels"}
    | {"pois_sharing_prefix", "bucket_size_histogram"}
)
LEVEL_KEYS = frozenset({"codebook_size", "codewords_used", "perplexity", "usage"})
JSON_FILE, PNG_FILE = "sid_quality.json", "sid_quality.png"


@dataclass(frozen=True)
class WrittenReport:
    """A folder's quality report after a run: its two files and every model they now hold."""

    json_path: Path
    png_path: Path
    models: dict[str, dict]


def write_quality_report(folder: str | Path, reports: dict[str, dict]) -> WrittenReport:
    """Merge ``reports`` into ``folder``'s ``sid_quality.json`` and draw ``sid_quality.png`` of the merged models,
    under the folder's lock, so that runs reporting into one folder at the same time keep each other's models."""
    target = Path(folder)
    try:
        target.mkdir(parents=True, exist_ok=True)
        with folder_lock(target):
            merged = write_quality_json(target / JSON_FILE, reports)
            return WrittenReport(target / JSON_FILE, draw_quality_png(target / PNG_FILE, merged), merged)
    except OSError as exc:
        raise ReportError(str(target), str(exc.strerror or exc)) from None


def write_quality_json(path: str | Path, reports: dict[str, dict]) -> dict[str, dict]:
    """Merge ``reports`` into the report at ``path`` and write it atomically; returns the merged reports.

    Models already in the file keep their place and take this run's figures; the file's other models are kept, and
    this run's new ones follow them. An existing file that is unreadable or not a report of this tool is replaced.
    """
    target = Path(path)
    merged = {**_existing_reports(target), **reports}
    document = {"tool": "rqvae_ray", "tool_version": __version__, "models": merged}
    data = (json.dumps(document, indent=2) + "\n").encode()
    _atomic_write(target, lambda staged: staged.write_bytes(data))
    return merged


def _existing_reports(path: Path) -> dict[str, dict]:
    """The models of the report at ``path``; none when it is missing, unreadable or not one of ours."""
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return {}
    models = document.get("models") if isinstance(document, dict) and document.get("tool") == "rqvae_ray" else None
    if not isinstance(models, dict) or not all(map(_is_summary, models.values())):
        return {}
    return models


def _is_summary(value: object) -> bool:
    return (
        isinstance(value, dict)
        and SUMMARY_KEYS <= value.keys()
        and isinstance(value["levels"], list)
        and all(isinstance(level, dict) and LEVEL_KEYS <= level.keys() for level in value["levels"])
    )


def quality_table(reports: dict[str, dict]) -> str:
    """A plain-text table of the key figures per model, followed by a legend."""
    levels = max((len(s["levels"]) for s in reports.values()), default=0)
    header = ["model", "POIs", "unique SIDs", "collided", "largest", "POIs collided"]
    header += [f"L{i} used/K" for i in range(1, levels + 1)] + [f"L{i} ppl" for i in range(1, levels + 1)]
    header += [f"share p{i}" for i in range(1, levels + 1)]
    capped = any("cap" in summary for summary in reports.values())
    if capped:
        header += ["max/SID", "moved", "extra dist"]
    rows = [header]
    for model, summary in reports.items():
        row = [model, *(f"{summary[k]:,}" for k in ("pois", "unique_sids", "collided_buckets", "largest_bucket"))]
        row.append(f"{summary['pois_in_collided_buckets']:,}")
        used = [f"{lv['codewords_used']}/{lv['codebook_size']}" for lv in summary["levels"]]
        perplexity = [f"{lv['perplexity']:.1f}" for lv in summary["levels"]]
        shared = [f"{summary['pois_sharing_prefix'].get(str(i), 0):,}" for i in range(1, len(summary["levels"]) + 1)]
        for values in (used, perplexity, shared):
            row += values + [""] * (levels - len(values))
        if capped:
            row += _cap_cells(summary.get("cap"))
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
    if capped:
        legend += (
            "; max/SID: --max-per-sid; moved: POIs it moved to another SID; extra dist: the mean increase of a moved "
            "POI's squared quantization error |z - q|^2"
        )
    return "\n".join([*lines, "", legend])


def _cap_cells(cap: dict | None) -> list[str]:
    """The cap's cells of a model's row (empty without a cap)."""
    if not cap:
        return ["", "", ""]
    return [str(cap["max_per_sid"]), f"{cap['moved_pois']:,}", f"{cap['extra_distance_mean']:.4g}"]


def draw_quality_png(path: str | Path, reports: dict[str, dict]) -> Path:
    """Draw one PNG with a row per model: codeword usage per level and the bucket-size distribution (log scale).

    Panels are a few plain artists each on the figure, not matplotlib Axes: an Axes builds and draws dozens of tick
    objects, which made the picture of 10 models take seconds.
    """
    if not reports:
        raise ReportError(str(path), "no model summaries to draw")
    import matplotlib

    figure = _quality_figure(reports)
    # Unhinted glyphs render markedly faster (text is most of the drawing time) and look the same at this size;
    # zlib level 1 encodes several times faster than the default 6, and a picture of flat colours stays small.
    with matplotlib.rc_context({"text.hinting": "no_hinting"}):
        return _atomic_write(
            Path(path), lambda staged: figure.savefig(staged, format="png", pil_kwargs={"compress_level": 1})
        )


def _quality_figure(reports: dict[str, dict]) -> Figure:
    """The report picture: a title band, then per model a headline and a row of panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    levels = max(len(s["levels"]) for s in reports.values())
    height = TOP_IN + ROW_HEIGHT_IN * len(reports)
    figure = Figure(figsize=(FIGURE_WIDTH_IN, height), dpi=DPI)
    FigureCanvasAgg(figure)
    inches = figure.dpi_scale_trans
    bold = {"transform": inches, "va": "center", "fontweight": "bold"}
    figure.text(FIGURE_WIDTH_IN / 2, height - 0.22, TITLE, ha="center", fontsize=12, **bold)
    figure.text(FIGURE_WIDTH_IN / 2, height - 0.5, LEGEND, transform=inches, ha="center", va="center", fontsize=9)
    ratios = [1.0] * levels + [BUCKET_PANEL_RATIO]
    unit = (FIGURE_WIDTH_IN - LEFT_IN - RIGHT_IN - GAP_IN * levels) / sum(ratios)
    lefts = [LEFT_IN + sum(unit * r + GAP_IN for r in ratios[:column]) for column in range(len(ratios))]
    headers = [f"level {level + 1}: POIs per codeword" for level in range(levels)] + [BUCKET_HEADER]
    for left, ratio, header in zip(lefts, ratios, headers, strict=True):
        figure.text(
            left + unit * ratio / 2, height - 0.8, header, transform=inches, ha="center", style="italic", fontsize=9
        )
    for row, (model, summary) in enumerate(reports.items()):
        row_top = height - TOP_IN - row * ROW_HEIGHT_IN
        figure.text(0.2, row_top - 0.18, _headline(model, summary), fontsize=10, **bold)
        bottom, top = row_top - ROW_HEIGHT_IN + 0.42, row_top - 0.6
        for column, (left, ratio) in enumerate(zip(lefts, ratios, strict=True)):
            box = (left, bottom, unit * ratio, top - bottom)
            if column == levels:
                _draw_buckets(figure, box, summary)
            elif column < len(summary["levels"]):
                _draw_usage(figure, box, column, summary["levels"][column], summary["pois"])
    return figure


class _Panel:
    """A framed plot area of the figure at ``box`` showing the data range ``xlim`` x ``ylim``; :attr:`data` maps
    data coordinates onto it."""

    def __init__(self, figure: Figure, box: Box, xlim: tuple[float, float], ylim: tuple[float, float]) -> None:
        from matplotlib.patches import Rectangle
        from matplotlib.transforms import Bbox, BboxTransform

        self.figure, self.box, self.xlim, self.ylim = figure, box, xlim, ylim
        limits = Bbox([[xlim[0], ylim[0]], [xlim[1], ylim[1]]])
        self.data = BboxTransform(limits, Bbox.from_bounds(*box)) + figure.dpi_scale_trans
        frame = Rectangle(box[:2], *box[2:], fill=False, linewidth=0.8, edgecolor="black", zorder=3)
        frame.set_transform(figure.dpi_scale_trans)
        figure.add_artist(frame)

    def add(self, artist: Artist) -> None:
        """Add an artist whose coordinates are data coordinates."""
        artist.set_transform(self.data)
        self.figure.add_artist(artist)

    def title(self, text: str) -> None:
        left, bottom, width, height = self.box
        inches = self.figure.dpi_scale_trans
        self.figure.text(left + width / 2, bottom + height + 0.05, text, transform=inches, ha="center", fontsize=8.5)

    def ticks(self, axis: str, values: Sequence[float], labels: Sequence[str], **text: object) -> None:
        """Tick marks and their labels along the bottom (``axis="x"``) or the left (``axis="y"``) edge."""
        from matplotlib.lines import Line2D
        from matplotlib.markers import TICKDOWN, TICKLEFT
        from matplotlib.transforms import offset_copy

        if axis == "x":
            points, marker, shift = [(v, self.ylim[0]) for v in values], TICKDOWN, {"y": -5}
            text = {"ha": "center", "va": "top", **text}
        else:
            points, marker, shift = [(self.xlim[0], v) for v in values], TICKLEFT, {"x": -5}
            text = {"ha": "right", "va": "center", **text}
        marks = Line2D(*zip(*points, strict=True), linestyle="none", marker=marker, markersize=3.5, color="black")
        self.add(marks)
        placed = offset_copy(self.data, self.figure, units="points", **shift)
        for (x, y), label in zip(points, labels, strict=True):
            self.figure.text(x, y, label, transform=placed, fontsize=7, **text)

    def labels_above(self, points: Sequence[tuple[float, float]], labels: Sequence[str]) -> None:
        """Small labels centred just above data points (the values on bars)."""
        from matplotlib.transforms import offset_copy

        placed = offset_copy(self.data, self.figure, units="points", y=1)
        for (x, y), label in zip(points, labels, strict=True):
            self.figure.text(x, y, label, transform=placed, ha="center", va="bottom", fontsize=6.5)


def _headline(model: str, summary: dict) -> str:
    pois, unique = summary["pois"], summary["unique_sids"]
    share = f" ({unique / pois:.1%})" if pois else ""
    return (
        f"{model}:  {pois:,} POIs · {unique:,} unique SIDs{share} · {summary['collided_buckets']:,} collided SIDs "
        f"holding {summary['pois_in_collided_buckets']:,} POIs · largest bucket {summary['largest_bucket']:,}"
    )


def _draw_usage(figure: Figure, box: Box, level: int, stats: dict, pois: int) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import StepPatch

    usage, size = stats["usage"], stats["codebook_size"]
    panel = _Panel(figure, box, (-1, size), (0, max(max(usage, default=0), 1) * 1.08))
    # One filled step outline rather than K bar patches: drawing stays fast with many models and large codebooks.
    edges = [k - 0.5 for k in range(size + 1)]
    panel.add(StepPatch(usage, edges, fill=True, color=LEVEL_COLORS[level % len(LEVEL_COLORS)], linewidth=0))
    if pois:
        panel.add(Line2D([-1, size], [pois / size] * 2, color="black", linestyle="--", linewidth=0.8))
    unused = [k for k, count in enumerate(usage) if count == 0]
    if unused:
        panel.add(Line2D(unused, [0] * len(unused), linestyle="none", marker="|", markersize=9, color="red"))
    # Few labels, as text is most of the drawing time: zero and the busiest codeword's POIs. The x axis needs none:
    # it holds codewords 0 to K-1 in order, and the title gives K.
    counts = sorted({0, max(usage, default=0)})
    panel.ticks("y", counts, [f"{c:,}" for c in counts])
    panel.title(f"{stats['codewords_used']}/{size} used · ppl {stats['perplexity']:.1f}")


def _draw_buckets(figure: Figure, box: Box, summary: dict) -> None:
    from matplotlib.collections import PolyCollection

    histogram = {int(size): count for size, count in summary["bucket_size_histogram"].items()}
    bins = [*SIZE_BINS, (SIZE_BINS[-1][1] + 1, math.inf)]
    counts = [sum(c for s, c in histogram.items() if low <= s <= high) for low, high in bins]
    if not any(counts):
        panel = _Panel(figure, box, (0, 1), (0, 1))
        figure.text(0.5, 0.5, "no POIs", transform=panel.data, ha="center", va="center", fontsize=9)
        return
    shown = max(i for i, count in enumerate(counts) if count) + 1
    # Bar heights are log10(SIDs) drawn linearly, with headroom above the tallest bar for its label; no y axis, as
    # every bar carries its count.
    panel = _Panel(figure, box, (-0.6, shown - 0.4), (LOG_FLOOR, math.log10(max(counts) * 3)))
    drawn = [(i, math.log10(count)) for i, count in enumerate(counts[:shown]) if count]
    bars = [[(i - 0.4, LOG_FLOOR), (i - 0.4, y), (i + 0.4, y), (i + 0.4, LOG_FLOOR)] for i, y in drawn]
    colors = ["#2ca02c" if bins[i][0] == 1 else "#d62728" for i, _ in drawn]
    panel.add(PolyCollection(bars, facecolors=colors, edgecolors="none"))
    panel.labels_above(drawn, [f"{counts[i]:,}" for i, _ in drawn])
    crowded = {"rotation": 30, "ha": "right", "rotation_mode": "anchor"} if shown > 8 else {}
    panel.ticks("x", range(shown), [_bin_label(low, high) for low, high in bins[:shown]], **crowded)


def _bin_label(low: int, high: float) -> str:
    if high == math.inf:
        return f">{_short(low - 1)}"
    return str(low) if low == high else f"{low}-{_short(int(high))}"


def _short(number: int) -> str:
    return f"{number // 1000}k" if number >= 1000 and number % 1000 == 0 else str(number)


def _atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, write)
    except OSError as exc:
        raise ReportError(str(path), str(exc.strerror or exc)) from None

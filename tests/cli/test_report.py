"""The SID quality report: summary figures checked by hand, the JSON file, the text table and the PNG."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import threading

import matplotlib
import numpy as np
import pytest
from PIL import Image

from rqvae_ray.cli.report import (
    LEVEL_COLORS,
    ReportError,
    draw_quality_png,
    quality_table,
    write_quality_json,
    write_quality_report,
)
from rqvae_ray.core.sid_stats import SidCounter, pack_codes
from rqvae_ray.outputs.staging import folder_lock

# Six POIs, codebooks of 4: P1 and P2 collide, P3 shares their first two codes, P4 only the first.
CODES = [[0, 1, 2], [0, 1, 2], [0, 1, 3], [0, 2, 0], [1, 0, 0], [3, 3, 3]]


def _summary(codes: list[list[int]], sizes: tuple[int, ...]) -> dict:
    counter = SidCounter(sizes)
    array = np.array(codes, dtype=np.int64)
    counter.add(pack_codes(array[:2], sizes))  # in two batches, as the writer receives them
    counter.add(pack_codes(array[2:], sizes))
    return counter.summary()


def _entropy_perplexity(counts: list[int]) -> float:
    total = sum(counts)
    return math.exp(-sum(c / total * math.log(c / total) for c in counts if c))


def test_summary_by_hand():
    summary = _summary(CODES, (4, 4, 4))
    assert summary["pois"] == 6
    assert summary["unique_sids"] == 5
    assert summary["collided_buckets"] == 1
    assert summary["largest_bucket"] == 2
    assert summary["pois_in_collided_buckets"] == 2
    assert summary["bucket_size_histogram"] == {"1": 4, "2": 1}
    assert summary["pois_sharing_prefix"] == {"1": 4, "2": 3, "3": 2}
    usage = [[4, 1, 0, 1], [1, 3, 1, 1], [2, 0, 2, 2]]
    assert [level["usage"] for level in summary["levels"]] == usage
    assert [level["codewords_used"] for level in summary["levels"]] == [3, 4, 3]
    assert [level["codebook_size"] for level in summary["levels"]] == [4, 4, 4]
    for level, counts in zip(summary["levels"], usage, strict=True):
        assert level["perplexity"] == pytest.approx(_entropy_perplexity(counts), rel=1e-12)
    assert summary["levels"][2]["perplexity"] == pytest.approx(3.0, rel=1e-12)  # uniform over 3 codewords


@pytest.mark.parametrize("size", [1, 4, 32])
def test_perplexity_of_uniform_usage_is_k(size):
    codes = [[k, 0] for k in range(size)] * 3
    summary = _summary(codes, (size, 2))
    assert summary["levels"][0]["perplexity"] == pytest.approx(size, rel=1e-12)
    assert summary["levels"][0]["codewords_used"] == size
    assert summary["levels"][1]["perplexity"] == pytest.approx(1.0)
    assert summary["largest_bucket"] == 3 and summary["unique_sids"] == size


def test_empty_counter():
    summary = SidCounter((8, 8)).summary()
    assert summary["pois"] == summary["unique_sids"] == summary["largest_bucket"] == 0
    assert summary["bucket_size_histogram"] == {} and summary["pois_sharing_prefix"] == {"1": 0, "2": 0}


def _reports() -> dict[str, dict]:
    rng = np.random.default_rng(3)
    reports = {"org/rqvae-hand": _summary(CODES, (4, 4, 4))}
    for index, concentration in enumerate((0.05, 0.3, 1.0, 3.0, 10.0, 0.1, 0.5, 2.0, 30.0)):
        size = 32 if index % 2 else 64
        codes = np.stack([rng.choice(size, 6000, p=rng.dirichlet([concentration] * size)) for _ in range(3)], 1)
        reports[f"org/rqvae-model-{index}-concentration{concentration}"] = _summary(codes.tolist(), (size,) * 3)
    return reports


def test_json_round_trip(tmp_path):
    reports = _reports()
    path = tmp_path / "out" / "sid_quality.json"
    assert write_quality_json(path, reports) == reports
    document = json.loads(path.read_text())
    assert document["tool"] == "rqvae_ray" and document["models"] == reports
    assert list(document["models"]) == list(reports)  # run order kept
    assert [p.name for p in path.parent.iterdir()] == ["sid_quality.json"]  # no staged file left behind


def test_runs_into_one_folder_accumulate(tmp_path):
    reports = _reports()
    models = list(reports)
    path = tmp_path / "sid_quality.json"
    first = {m: reports[m] for m in models[:6]}
    write_quality_json(path, first)
    # The second run redoes models 4 and 5 with other figures and adds 6 to 9.
    second = {m: reports[models[(i + 1) % len(models)]] for i, m in enumerate(models[4:], start=4)}
    merged = write_quality_json(path, second)
    assert list(merged) == models  # the first run's models keep their place, new ones follow
    assert merged == {**first, **second}
    assert merged[models[4]] == reports[models[5]] != first[models[4]]  # the second run's figures win
    assert merged[models[0]] == first[models[0]]
    assert json.loads(path.read_text())["models"] == merged
    assert [p.name for p in tmp_path.iterdir()] == ["sid_quality.json"]


def test_runs_reporting_into_one_folder_at_once_keep_each_others_models(tmp_path):
    reports = _reports()
    mine, theirs = dict(list(reports.items())[:2]), dict(list(reports.items())[2:4])
    written = []
    with folder_lock(tmp_path):  # another run is merging its models into this folder's report
        run = threading.Thread(target=lambda: written.append(write_quality_report(tmp_path, mine)))
        run.start()
        run.join(timeout=1.0)
        assert run.is_alive() and not written  # waits for the other run instead of merging at the same time
        write_quality_json(tmp_path / "sid_quality.json", theirs)
    run.join(timeout=60)
    assert written and written[0].models == {**theirs, **mine}
    assert json.loads(written[0].json_path.read_text())["models"] == {**theirs, **mine}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sid_quality.json", "sid_quality.png"]
    every = draw_quality_png(tmp_path / "expected" / "four.png", {**theirs, **mine})  # a row per model: 4 rows
    assert _png_size(written[0].png_path.read_bytes()) == _png_size(every.read_bytes())


@pytest.mark.parametrize(
    "existing",
    [
        b"\x00{not json",
        b"\xff\xfe",
        b"[1, 2]",
        json.dumps({"tool": "other", "models": {"org/x": {}}}).encode(),
        json.dumps({"tool": "rqvae_ray", "models": {"org/x": {"pois": 3}}}).encode(),
        json.dumps({"tool": "rqvae_ray", "models": ["org/x"]}).encode(),
    ],
)
def test_unusable_existing_report_is_replaced(tmp_path, existing):
    path = tmp_path / "sid_quality.json"
    path.write_bytes(existing)
    reports = {"org/rqvae-hand": _summary(CODES, (4, 4, 4))}
    assert write_quality_json(path, reports) == reports
    assert json.loads(path.read_text())["models"] == reports


def test_table_lists_every_model_and_its_numbers():
    reports = _reports()
    table = quality_table(reports)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["model", "POIs", "unique"]
    hand = next(line for line in lines if line.startswith("org/rqvae-hand "))
    assert hand.split()[1:] == ["6", "5", "1", "2", "2", "3/4", "4/4", "3/4"] + [
        f"{_entropy_perplexity([4, 1, 0, 1]):.1f}",
        f"{_entropy_perplexity([1, 3, 1, 1]):.1f}",
        "3.0",
        "4",
        "3",
        "2",
    ]
    for model, summary in reports.items():
        line = next(line for line in lines if line.startswith(model + " "))
        assert f"{summary['unique_sids']:,}" in line.split()
    assert "perplexity" in lines[-1] and all(line == line.rstrip() for line in lines)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_png_one_file_readable_size(tmp_path):
    reports = _reports()
    hinting = matplotlib.rcParams["text.hinting"]
    path = draw_quality_png(tmp_path / "sid_quality.png", reports)
    assert matplotlib.rcParams["text.hinting"] == hinting  # the faster text setting does not leak
    width, height = _png_size(path.read_bytes())
    assert width >= 1600 and height >= 240 * len(reports)  # about 2.35 inches per model row at 110 dpi
    assert [p.name for p in tmp_path.iterdir()] == ["sid_quality.png"]
    single = draw_quality_png(tmp_path / "one.png", {"org/rqvae-hand": reports["org/rqvae-hand"]})
    one_width, one_height = _png_size(single.read_bytes())
    assert one_width == width and one_height < height / 5


def _colors(path) -> set[tuple[int, int, int]]:
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return {tuple(int(v) for v in color) for color in np.unique(pixels, axis=0)}


def _rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))


def _unused_tick_ink(colors: set[tuple[int, int, int]]) -> bool:
    """Whether the thin pure-red ticks of unused codewords show: antialiased onto white they are (255, g, g)."""
    return any(r == 255 and g == b < 160 for r, g, b in colors)


def test_png_draws_usage_unused_codewords_and_buckets(tmp_path):
    # Level 1 leaves codeword 2 unused; the buckets hold unique (green) and collided (red) SIDs.
    colors = _colors(draw_quality_png(tmp_path / "hand.png", {"org/rqvae-hand": _summary(CODES, (4, 4, 4))}))
    assert {_rgb(c) for c in LEVEL_COLORS[:3]} | {_rgb("#2ca02c"), _rgb("#d62728")} <= colors
    assert _unused_tick_ink(colors)
    # Every codeword used and no collisions: no red anywhere.
    uniform = _summary([[k, k] for k in range(4)], (4, 4))
    colors = _colors(draw_quality_png(tmp_path / "uniform.png", {"org/uniform": uniform}))
    assert _rgb(LEVEL_COLORS[0]) in colors and _rgb("#d62728") not in colors and not _unused_tick_ink(colors)
    assert _rgb(LEVEL_COLORS[2]) not in colors  # two levels drawn, not three


def test_png_edge_cases(tmp_path):
    reports = {
        "org/empty": SidCounter((32, 32, 32)).summary(),
        "org/two-levels": _summary([[1, 2], [1, 2], [0, 0]], (256, 256)),
        "org/collapsed": _summary([[0, 0, 0, 0]] * 3000, (8, 8, 8, 8)),
    }
    _png_size(draw_quality_png(tmp_path / "edge.png", reports).read_bytes())
    with pytest.raises(ReportError) as raised:
        draw_quality_png(tmp_path / "none.png", {})
    assert raised.value.path == str(tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_unwritable_target_is_a_report_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ReportError) as raised:
        write_quality_json(blocker / "sid_quality.json", _reports())
    assert raised.value.path == str(blocker / "sid_quality.json")
    with pytest.raises(ReportError) as raised:
        write_quality_report(blocker / "reports", _reports())
    assert raised.value.path == str(blocker / "reports")


def test_importing_the_report_does_not_import_matplotlib():
    code = "import sys, rqvae_ray.cli.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

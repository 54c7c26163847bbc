"""The cap on POIs per SID (``rqvae_ray.core.sid_cap``) against a plain statement of the rule, written here on its
own: on the bundled NYC data (the reference encoder's latents and codes) for several K, and on a tiny model whose
SIDs fill up, so that POIs must go a level up."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from rqvae_ray.core.checkpoint import load_checkpoint_file
from rqvae_ray.core.encoder import Encoder, SparseRows
from rqvae_ray.core.sid_cap import Placement, distances, movers, quantization_errors, room_problem
from rqvae_ray.core.sid_stats import SidCounter
from tests import unit_models
from tests.reference import build_encoder, reference_sids

MODEL = "rqvae-nyc-div0.25-commit0.5-lr5e-5"


def _distance(residual: np.ndarray, codeword: np.ndarray) -> float:
    total = 0.0
    for a, b in zip(residual.tolist(), codeword.tolist(), strict=True):
        total += (a - b) ** 2
    return total


def reference_cap(
    latent: np.ndarray, codes: np.ndarray, books: list[np.ndarray], k: int
) -> tuple[list[tuple[int, ...]], int, float]:
    """The rule as the README states it, plainly: every POI's final SID, how many moved, their extra distance."""
    sizes = [len(book) for book in books]
    levels = len(books)

    def residual(row: int, prefix: tuple[int, ...]) -> np.ndarray:
        r = latent[row].copy()
        for level, code in enumerate(prefix):
            r = r - books[level][code]
        return r

    error = [_distance(residual(i, tuple(c[:-1])), books[-1][c[-1]]) for i, c in enumerate(codes.tolist())]
    members: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for row, sid in enumerate(map(tuple, codes.tolist())):
        members[sid].append(row)
    count: Counter = Counter()
    moving = []
    for sid, rows in members.items():
        rows.sort(key=lambda row: (error[row], row))
        count[sid] = min(len(rows), k)
        moving += rows[k:]
    moving.sort(key=lambda row: (error[row], row))

    def room(prefix: tuple[int, ...]) -> bool:
        rests = itertools.product(*(range(size) for size in sizes[len(prefix) :]))
        return any(count[prefix + rest] < k for rest in rests)

    final = [tuple(c) for c in codes.tolist()]
    extra = 0.0
    for row in moving:
        old = final[row]
        keep = max(length for length in range(levels) if room(old[:length]))
        prefix = old[:keep]
        for level in range(keep, levels):
            r = residual(row, prefix)
            near = sorted(range(sizes[level]), key=lambda c: (_distance(r, books[level][c]), c))
            prefix += (next(c for c in near if room(prefix + (c,))),)
        final[row] = prefix
        count[prefix] += 1
        extra += _distance(residual(row, prefix[:-1]), books[-1][prefix[-1]]) - error[row]
    return final, len(moving), extra


def capped(latent: np.ndarray, codes: np.ndarray, books: tuple[np.ndarray, ...], k: int):
    """The product's rule on the same rows: every POI's final SID, how many moved, their extra distance."""
    sizes = tuple(len(book) for book in books)
    counter = SidCounter(sizes)
    packed = counter.layout.pack(codes)
    counter.add(packed)
    row_errors = quantization_errors(latent, codes, books)
    rows = movers(packed, row_errors, counter, k)
    counter.remove(packed[rows])
    placement = Placement(counter, books, k)
    final = [tuple(c) for c in codes.tolist()]
    extra = 0.0
    for row in rows.tolist():
        new, error = placement.place(latent[row], codes[row])
        final[row] = tuple(new.tolist())
        extra += error - row_errors[row]
    return final, len(rows), extra, counter


@pytest.fixture(scope="module")
def nyc(demo_hub):
    base = demo_hub / "datasets" / "comp5331poi" / "nyc" / "RQVAE Dataset"
    features = torch.load(base / "poi_features.pt", weights_only=True).numpy()
    path = demo_hub / "models" / "comp5331poi" / MODEL / "rqvae_best.pt"
    weights = load_checkpoint_file(path)
    codes, latent = Encoder(weights).encode_latent(SparseRows.from_dense(features))
    state = torch.load(path, weights_only=True)["model_state_dict"]
    model, ref_books = build_encoder(state)
    with torch.no_grad():
        ref_latent = model(torch.from_numpy(features).double()).numpy()
    ref_codes, _ = reference_sids(state, features)
    np.testing.assert_array_equal(codes, ref_codes)
    books = tuple(book.astype(np.float64) for book in weights.codebooks)
    return codes, latent, books, ref_latent, [book.double().numpy() for book in ref_books]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_nyc_capped_sids_follow_the_rule(nyc, k):
    codes, latent, books, ref_latent, ref_books = nyc
    final, moved, extra, counter = capped(latent, codes, books, k)
    expected, expected_moved, expected_extra = reference_cap(ref_latent, codes, ref_books, k)
    assert final == expected
    assert moved == expected_moved > 0
    assert extra == pytest.approx(expected_extra, rel=1e-9) and extra > 0
    assert max(Counter(final).values()) <= k
    assert counter.rows == len(codes) and counter.items()[1].max() <= k
    # a POI that did not move keeps its SID
    assert sum(f != tuple(c) for f, c in zip(final, codes.tolist(), strict=True)) == moved


def test_nyc_without_over_full_sids_nobody_moves(nyc):
    codes, latent, books, _, _ = nyc
    largest = max(Counter(map(tuple, codes.tolist())).values())
    final, moved, extra, _ = capped(latent, codes, books, largest)
    assert moved == 0 and extra == 0.0 and final == [tuple(c) for c in codes.tolist()]


@pytest.mark.parametrize(("sizes", "k", "count"), [((3, 2), 1, 6), ((2, 2, 2), 2, 16), ((3, 2), 2, 9)])
def test_full_prefixes_send_pois_a_level_up(sizes, k, count):
    weights = unit_models.weights(7, sizes)
    codes, latent = Encoder(weights).encode_latent(unit_models.rows(count, seed=3))
    books = tuple(book.astype(np.float64) for book in weights.codebooks)
    final, moved, extra, _ = capped(latent, codes, books, k)
    expected, expected_moved, expected_extra = reference_cap(latent, codes, list(books), k)
    assert final == expected and moved == expected_moved
    assert extra == pytest.approx(expected_extra, rel=1e-12)
    assert max(Counter(final).values()) <= k
    went_up = [f for f, c in zip(final, codes.tolist(), strict=True) if f[:-1] != tuple(c[:-1])]
    assert went_up, "no POI had to leave its prefix"


def test_room_is_checked_before_any_work():
    assert room_problem((3, 2), 1, 6) == ""
    assert room_problem((3, 2), 1, 7) == (
        "--max-per-sid 1 leaves room for 6 POIs (6 SIDs) but there are 7; raise --max-per-sid"
    )


def test_distances_add_the_dimensions_in_ascending_order():
    rng = np.random.default_rng(5)
    residuals, book = rng.standard_normal((20, 64)) * 1e3, rng.standard_normal((7, 64))
    got = distances(residuals, book)
    for i, j in itertools.product(range(20), range(7)):
        assert got[i, j] == _distance(residuals[i], book[j])  # bit for bit

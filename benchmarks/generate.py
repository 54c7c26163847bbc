"""Synthetic NYC-shaped POIs at any scale, written as a hub dataset with sharded Parquet features, plus 5 NYC models.

Each POI is a 1,407-dim multi-hot row shaped like the real Foursquare-NYC features
(``rqvae_ray.inputs.demo.nyc_features``): one of 209 categories (Zipf-like popularity), one of 91 regions (half the
time the category's home region), up to 10
distinct hours of 24 around the category's peak hour, and up to 10 distinct users of 1,083 (Zipf-like popularity).
The per-row counts of hours and users follow the real NYC distribution (``--row-profile nyc``: mean about 15 nonzeros,
at most 22) or are always 10 (``--row-profile max``: 22 nonzeros per row).

Layout (``<hub>/datasets/comp5331poi/nyc/``):

* ``RQVAE Dataset/poi_features/part-00000.parquet``, ...: ``shard_rows`` POIs per shard; columns ``Pid`` int64
  (1..N in order across shards) and ``indices`` list<int32> (ascending column indices of the nonzeros), or with
  ``dense=True`` a ``features`` fixed_size_list<float32>[1407] column instead of ``indices`` (small N only);
* ``RQVAE Dataset/metadata.json`` (the demo's keys; ``total_dim`` 1407, ``num_pois`` N);
* ``Intermediate Files/pid_mapping.csv`` (``Original_Pid,Mapped_Pid``; Mapped_Pid 1..N);
* with ``pt=True`` also ``RQVAE Dataset/poi_features.pt`` (dense float32 [N, 1407], the original system's input).

Models: the 5 default NYC model IDs, fitted with ``rqvae_ray.inputs.demo.fit_checkpoint`` on the first ``fit_rows``
POIs, saved as ``<hub>/models/comp5331poi/<name>/rqvae_best.pt``.

Run: ``python -m benchmarks.generate --pois N --hub-dir DIR [--dense] [--pt] [--shard-rows 250000]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ORG = "comp5331poi"
DATASET = "nyc"
CATEGORIES, REGIONS, HOURS, USERS = 209, 91, 24, 1083
TOTAL_DIM = CATEGORIES + REGIONS + HOURS + USERS  # 1407
OFFSETS = {
    "category": 0,
    "region": CATEGORIES,
    "temporal": CATEGORIES + REGIONS,
    "collaborative": CATEGORIES + REGIONS + HOURS,
}
TOP_K = 10
# Rows of the real NYC features with 0..10 distinct hours / users (demo.nyc_features, 5,135 POIs).
NYC_HOUR_COUNTS = np.array([0, 18, 49, 115, 210, 291, 458, 616, 634, 590, 2154], dtype=float)
NYC_USER_COUNTS = np.array([0, 1669, 568, 332, 290, 256, 218, 199, 197, 195, 1211], dtype=float)
NYC_MODELS = tuple(
    f"{ORG}/rqvae-nyc-div{div}-commit0.5-lr5e-5{suffix}"
    for div, suffix in (("0.0", ""), ("0.25", ""), ("0.25", "-without_L_quant"), ("0.5", ""), ("0.75", ""))
)
SHARD_ROWS = 250_000
FIT_ROWS = 20_000
GENERATOR_VERSION = 1
STAMP_FILE = "benchmarks-generator.json"
FEATURES_DIR = "RQVAE Dataset/poi_features"


class _World:
    """The fixed population the POIs are drawn from (same for every shard and every N)."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        cat = 1.0 / np.arange(1, CATEGORIES + 1) ** 1.1
        self.category_p = rng.permutation(cat / cat.sum())
        reg = 1.0 / np.arange(1, REGIONS + 1) ** 0.8
        self.region_p = rng.permutation(reg / reg.sum())
        self.home_region = rng.choice(REGIONS, size=CATEGORIES, p=self.region_p)
        self.peak_hour = rng.integers(0, HOURS, size=CATEGORIES)
        users = 1.0 / np.arange(1, USERS + 1) ** 0.7
        self.user_p = rng.permutation(users / users.sum())


def _choose_distinct(candidates: np.ndarray, keep: np.ndarray, rng: np.random.Generator, big: int) -> np.ndarray:
    """Per row, ``keep`` distinct values chosen at random among ``candidates``, ascending, padded with ``big``."""
    n, width = candidates.shape
    ordered = np.sort(candidates, axis=1)
    duplicate = np.zeros_like(ordered, dtype=bool)
    duplicate[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    priority = rng.random((n, width))
    priority[duplicate] = 2.0
    rank = np.argsort(np.argsort(priority, axis=1), axis=1)
    chosen = np.where((rank < keep[:, None]) & ~duplicate, ordered, big)
    return np.sort(chosen, axis=1)


def shard_indices(world: _World, rows: int, seed: int, profile: str = "nyc") -> tuple[np.ndarray, np.ndarray]:
    """CSR (``indptr`` int32 [rows + 1], ``indices`` int32 [nnz]) of ``rows`` synthetic POIs, columns ascending."""
    rng = np.random.default_rng(seed)
    big = TOTAL_DIM + 1
    category = rng.choice(CATEGORIES, size=rows, p=world.category_p)
    region = np.where(
        rng.random(rows) < 0.5, world.home_region[category], rng.choice(REGIONS, size=rows, p=world.region_p)
    )
    if profile == "max":
        hour_count = np.full(rows, TOP_K)
        user_count = np.full(rows, TOP_K)
    else:
        hour_count = rng.choice(TOP_K + 1, size=rows, p=NYC_HOUR_COUNTS / NYC_HOUR_COUNTS.sum())
        user_count = rng.choice(TOP_K + 1, size=rows, p=NYC_USER_COUNTS / NYC_USER_COUNTS.sum())
    # Hours: a random subset of the 24, favouring those near the category's peak (Gumbel top-k).
    distance = np.abs(np.arange(HOURS)[None, :] - world.peak_hour[category][:, None])
    distance = np.minimum(distance, HOURS - distance)
    keys = -(distance**2) / (2 * 4.0**2) + rng.gumbel(size=(rows, HOURS))
    rank = np.argsort(np.argsort(-keys, axis=1), axis=1)
    hours = np.where(rank < hour_count[:, None], np.arange(HOURS)[None, :], big)
    hours = np.sort(hours, axis=1)[:, :TOP_K]
    # Users: up to 10 distinct of 20 popularity-weighted draws (a popular user may be drawn twice).
    draws = rng.choice(USERS, size=(rows, 2 * TOP_K), p=world.user_p)
    users = _choose_distinct(draws, user_count, rng, big)[:, :TOP_K]
    columns = np.concatenate(
        [
            (OFFSETS["category"] + category)[:, None],
            (OFFSETS["region"] + region)[:, None],
            np.where(hours < big, OFFSETS["temporal"] + hours, big),
            np.where(users < big, OFFSETS["collaborative"] + users, big),
        ],
        axis=1,
    )
    valid = columns < big
    indptr = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(valid.sum(axis=1), out=indptr[1:])
    return indptr, columns[valid].astype(np.int32)


def densify(indptr: np.ndarray, indices: np.ndarray, dim: int = TOTAL_DIM) -> np.ndarray:
    """Dense float32 [rows, dim] multi-hot matrix of CSR rows."""
    rows = len(indptr) - 1
    dense = np.zeros((rows, dim), dtype=np.float32)
    dense[np.repeat(np.arange(rows), np.diff(indptr)), indices] = 1.0
    return dense


def metadata(num_pois: int) -> dict:
    """``metadata.json`` contents, with the demo's keys."""
    return {
        "num_pois": num_pois,
        "num_categories": CATEGORIES,
        "num_regions": REGIONS,
        "num_users": USERS,
        "num_time_bins": HOURS,
        "total_dim": TOTAL_DIM,
        "feature_dims": {"category": CATEGORIES, "region": REGIONS, "temporal": HOURS, "collaborative": USERS},
        "feature_offsets": dict(OFFSETS),
    }


def _shard_table(first_pid: int, indptr: np.ndarray, indices: np.ndarray, dense: bool) -> pa.Table:
    rows = len(indptr) - 1
    pids = pa.array(np.arange(first_pid, first_pid + rows, dtype=np.int64))
    if dense:
        flat = pa.array(densify(indptr, indices).ravel())
        return pa.table({"Pid": pids, "features": pa.FixedSizeListArray.from_arrays(flat, TOTAL_DIM)})
    column = pa.ListArray.from_arrays(pa.array(indptr, type=pa.int32()), pa.array(indices, type=pa.int32()))
    return pa.table({"Pid": pids, "indices": column})


def _write_pid_mapping(path: Path, num_pois: int, chunk: int = 1_000_000) -> None:
    with path.open("w", newline="") as handle:
        handle.write("Original_Pid,Mapped_Pid\n")
        for start in range(1, num_pois + 1, chunk):
            stop = min(start + chunk, num_pois + 1)
            handle.write("".join(f"{zlib.crc32(b'nyc-%d' % pid):08x}{pid:016x},{pid}\n" for pid in range(start, stop)))


def write_models(hub: Path, sample: np.ndarray, models: tuple[str, ...] = NYC_MODELS) -> list[Path]:
    """Fit each model on ``sample`` (dense) and save it in the hub layout."""
    import torch

    from rqvae_ray.inputs.demo import fit_checkpoint
    from rqvae_ray.inputs.model_ids import parse_model_id

    paths = []
    for model_id in models:
        spec = parse_model_id(model_id)
        path = hub / "models" / spec.org / spec.name / "rqvae_best.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(fit_checkpoint(spec, sample), path)
        paths.append(path)
    return paths


def generate_hub(
    hub: str | Path,
    num_pois: int,
    *,
    dense: bool = False,
    pt: bool = False,
    shard_rows: int = SHARD_ROWS,
    models: tuple[str, ...] = NYC_MODELS,
    fit_rows: int = FIT_ROWS,
    profile: str = "nyc",
    seed: int = 5331,
    progress=print,
) -> Path:
    """Write the hub at ``hub`` (built in a sibling staging directory and renamed: never half-built)."""
    if num_pois < 1:
        raise ValueError("num_pois must be at least 1")
    if profile not in ("nyc", "max"):
        raise ValueError("profile must be 'nyc' or 'max'")
    target = Path(hub)
    staging = target.with_name(target.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    base = staging / "datasets" / ORG / DATASET
    (base / FEATURES_DIR).mkdir(parents=True)
    (base / "Intermediate Files").mkdir(parents=True)
    world = _World(seed)
    sample_parts: list[np.ndarray] = []
    sampled = 0
    dense_parts: list[np.ndarray] = []
    nnz = 0
    for shard, start in enumerate(range(0, num_pois, shard_rows)):
        rows = min(shard_rows, num_pois - start)
        indptr, indices = shard_indices(world, rows, seed=seed * 1_000_003 + shard, profile=profile)
        nnz += len(indices)
        pq.write_table(
            _shard_table(start + 1, indptr, indices, dense), base / FEATURES_DIR / f"part-{shard:05d}.parquet"
        )
        if sampled < fit_rows and models:
            take = min(rows, fit_rows - sampled)
            sample_parts.append(densify(indptr[: take + 1], indices[: indptr[take]]))
            sampled += take
        if pt:
            dense_parts.append(densify(indptr, indices))
        progress(f"generate: {start + rows}/{num_pois} POIs")
    (base / "RQVAE Dataset" / "metadata.json").write_text(json.dumps(metadata(num_pois), indent=2))
    _write_pid_mapping(base / "Intermediate Files" / "pid_mapping.csv", num_pois)
    if pt:
        import torch

        torch.save(torch.from_numpy(np.concatenate(dense_parts)), base / "RQVAE Dataset" / "poi_features.pt")
    if models:
        progress(f"generate: fitting {len(models)} models on {sampled} POIs")
        write_models(staging, np.concatenate(sample_parts), models)
    stamp = {
        "generator_version": GENERATOR_VERSION,
        "num_pois": num_pois,
        "dense": dense,
        "pt": pt,
        "shard_rows": shard_rows,
        "models": list(models),
        "fit_rows": fit_rows,
        "profile": profile,
        "seed": seed,
        "mean_nonzeros": nnz / num_pois,
    }
    (staging / STAMP_FILE).write_text(json.dumps(stamp, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def cached_hub(hub: str | Path, num_pois: int, **options) -> Path:
    """``hub`` as generated with these options, reusing an existing one whose stamp matches."""
    target = Path(hub)
    try:
        stamp = json.loads((target / STAMP_FILE).read_text())
    except (OSError, ValueError):
        stamp = None
    wanted = {
        "generator_version": GENERATOR_VERSION,
        "num_pois": num_pois,
        "dense": options.get("dense", False),
        "pt": options.get("pt", False),
        "shard_rows": options.get("shard_rows", SHARD_ROWS),
        "models": list(options.get("models", NYC_MODELS)),
        "fit_rows": options.get("fit_rows", FIT_ROWS),
        "profile": options.get("profile", "nyc"),
        "seed": options.get("seed", 5331),
    }
    if stamp is not None and all(stamp.get(k) == v for k, v in wanted.items()):
        return target
    return generate_hub(target, num_pois, **options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--pois", type=int, required=True, help="number of POIs")
    parser.add_argument("--hub-dir", type=Path, required=True)
    parser.add_argument("--dense", action="store_true", help="a dense 'features' column instead of 'indices'")
    parser.add_argument("--pt", action="store_true", help="also write poi_features.pt (dense; small N only)")
    parser.add_argument("--shard-rows", type=int, default=SHARD_ROWS)
    parser.add_argument("--fit-rows", type=int, default=FIT_ROWS)
    parser.add_argument("--row-profile", choices=("nyc", "max"), default="nyc")
    parser.add_argument("--no-models", action="store_true", help="write the dataset only")
    parser.add_argument("--seed", type=int, default=5331)
    args = parser.parse_args(argv)
    generate_hub(
        args.hub_dir,
        args.pois,
        dense=args.dense,
        pt=args.pt,
        shard_rows=args.shard_rows,
        models=() if args.no_models else NYC_MODELS,
        fit_rows=args.fit_rows,
        profile=args.row_profile,
        seed=args.seed,
    )
    print(f"wrote {args.hub_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

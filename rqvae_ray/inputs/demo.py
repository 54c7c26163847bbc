"""The embedded demo: a local hub with the real Foursquare-NYC POIs, a TKY-shaped synthetic set, and 10 checkpoints.

NYC features are built from the bundled ``poi_info.csv`` exactly as the GNPR-SID data preparation does:
``concat(category one-hot, region one-hot, 24-hour 10-hot, user 10-hot)`` where a 10-hot takes the first ten
distinct entries of the POI's list. The checkpoints use the published ``rqvae_best.pt`` layout and are an honest quick
fit: random Linear layers, BatchNorm statistics measured on the data, and residual k-means codebooks.
"""

from __future__ import annotations

import ast
import csv
import json
import shutil
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, ModelSpec, parse_model_id
from rqvae_ray.inputs.stores import CHECKPOINT_FILE, FEATURES_FILE, METADATA_FILE, PID_MAPPING_FILE

HIDDEN = (256, 128, 128)
LATENT = 64
LEVELS = 3
CODEBOOK_SIZE = {"nyc": 32, "tky": 64}
TOP_K = 10
TKY_SHAPE = {"pois": 7900, "categories": 191, "regions": 60, "users": 2294}


def _nyc_dir():
    return resources.files("rqvae_ray") / "data" / "foursquare_nyc"


def _count_rows(name: str) -> int:
    with (_nyc_dir() / name).open(newline="") as handle:
        return sum(1 for _ in csv.DictReader(handle))


def _multi_hot(columns: list[list[int]], dim: int, offset: int, out: np.ndarray) -> None:
    for row, items in enumerate(columns):
        for item in list(dict.fromkeys(items))[:TOP_K]:
            if 0 < item <= dim:
                out[row, offset + item - 1] = 1.0


def build_features(
    categories: list[int], regions: list[int], hours: list[list[int]], users: list[list[int]], dims: dict[str, int]
) -> tuple[np.ndarray, dict]:
    """The multi-hot feature matrix (1-based ids; hours 0..23) and its metadata.json contents."""
    n = len(categories)
    offsets = {
        "category": 0,
        "region": dims["categories"],
        "temporal": dims["categories"] + dims["regions"],
        "collaborative": dims["categories"] + dims["regions"] + 24,
    }
    total = offsets["collaborative"] + dims["users"]
    features = np.zeros((n, total), dtype=np.float32)
    _multi_hot([[c] for c in categories], dims["categories"], offsets["category"], features)
    _multi_hot([[r] for r in regions], dims["regions"], offsets["region"], features)
    _multi_hot([[h + 1 for h in hs] for hs in hours], 24, offsets["temporal"], features)
    _multi_hot(users, dims["users"], offsets["collaborative"], features)
    metadata = {
        "num_pois": n,
        "num_categories": dims["categories"],
        "num_regions": dims["regions"],
        "num_users": dims["users"],
        "num_time_bins": 24,
        "total_dim": total,
        "feature_dims": {
            "category": dims["categories"],
            "region": dims["regions"],
            "temporal": 24,
            "collaborative": dims["users"],
        },
        "feature_offsets": offsets,
    }
    return features, metadata


def nyc_features() -> tuple[np.ndarray, dict, list[tuple[str, int]]]:
    """Features, metadata and Pid mapping of the bundled Foursquare-NYC POIs."""
    categories, regions, hours, users = [], [], [], []
    with (_nyc_dir() / "poi_info.csv").open(newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: int(r["Pid"]))
    for expected, row in enumerate(rows, start=1):
        if int(row["Pid"]) != expected:
            raise ValueError(f"bundled poi_info.csv skips Pid {expected}")
        categories.append(int(row["Catname"]))
        regions.append(int(row["Region"]))
        hours.append(list(ast.literal_eval(row["Time"])))
        users.append(list(ast.literal_eval(row["Uid"])))
    dims = {
        "categories": _count_rows("catname_mapping.csv"),
        "regions": _count_rows("region_mapping.csv"),
        "users": _count_rows("uid_mapping.csv"),
    }
    features, metadata = build_features(categories, regions, hours, users, dims)
    with (_nyc_dir() / "pid_mapping.csv").open(newline="") as handle:
        mapping = [(r["Original_Pid"], int(r["Mapped_Pid"])) for r in csv.DictReader(handle)]
    return features, metadata, mapping


def tky_features(seed: int = 5331) -> tuple[np.ndarray, dict, list[tuple[str, int]]]:
    """A synthetic dataset shaped like Foursquare-TKY (POI, category, region and user counts)."""
    rng = np.random.default_rng(seed)
    n, n_cat, n_reg, n_users = (TKY_SHAPE[k] for k in ("pois", "categories", "regions", "users"))
    cat_pop = rng.zipf(1.6, n_cat).astype(float)
    categories = rng.choice(n_cat, size=n, p=cat_pop / cat_pop.sum()) + 1
    region_of_cat = rng.integers(0, n_reg, size=n_cat)
    regions = np.where(rng.random(n) < 0.5, region_of_cat[categories - 1], rng.integers(0, n_reg, size=n)) + 1
    peak = rng.integers(0, 24, size=n_cat)
    user_pop = rng.zipf(1.4, n_users).astype(float)
    user_p = user_pop / user_pop.sum()
    hours, users = [], []
    for i in range(n):
        k = int(rng.integers(1, 15))
        centre = peak[categories[i] - 1]
        hs = (centre + np.round(rng.normal(0, 3, size=k))).astype(int) % 24
        hours.append(list(dict.fromkeys(hs.tolist())))
        us = rng.choice(n_users, size=int(rng.integers(1, 16)), p=user_p) + 1
        users.append(list(dict.fromkeys(us.tolist())))
    features, metadata = build_features(
        categories.tolist(), regions.tolist(), hours, users, {"categories": n_cat, "regions": n_reg, "users": n_users}
    )
    mapping = [(f"{zlib.crc32(f'tky-{pid}'.encode()):08x}{pid:016x}", pid) for pid in range(1, n + 1)]
    return features, metadata, mapping


def _sq_distances(points: np.ndarray, centres: np.ndarray, points_sq: np.ndarray) -> np.ndarray:
    """Squared distances by expansion; ``points_sq`` is ``(points**2).sum(1)``, computed once by the caller."""
    return np.maximum(points_sq[:, None] - 2 * points @ centres.T + (centres**2).sum(1)[None], 0.0)


def _nearest(points: np.ndarray, book: np.ndarray, rows: int = 64) -> np.ndarray:
    """Index of each point's nearest codeword by exact differences, ``rows`` points at a time: the same sums as one
    ``[points, codewords, latent]`` array (hundreds of MB for TKY), which made this most of a model's fitting time."""
    nearest = np.empty(len(points), dtype=np.intp)
    for start in range(0, len(points), rows):
        chunk = points[start : start + rows]
        nearest[start : start + rows] = np.square(chunk[:, None, :] - book[None]).sum(2).argmin(1)
    return nearest


def _kmeans(points: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 15) -> np.ndarray:
    """k-means++ then Lloyd iterations; an empty cluster is re-seeded at the point farthest from its centre."""
    centres = np.empty((k, points.shape[1]))
    centres[0] = points[rng.integers(len(points))]
    points_sq = (points**2).sum(1)
    d2 = _sq_distances(points, centres[:1], points_sq)[:, 0]
    for j in range(1, k):
        centres[j] = points[rng.choice(len(points), p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(len(points))]
        d2 = np.minimum(d2, _sq_distances(points, centres[j : j + 1], points_sq)[:, 0])
    for _ in range(iterations):
        dist = _sq_distances(points, centres, points_sq)
        assign = dist.argmin(1)
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(centres)
        np.add.at(sums, assign, points)
        for j in np.flatnonzero(counts == 0):
            far = int(dist[np.arange(len(points)), assign].argmax())
            sums[j], counts[j] = points[far], 1
            assign[far] = j
            dist[far] = 0.0
        centres = sums / counts[:, None]
    return centres


def _linear(rng: np.random.Generator, fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, (fan_out, fan_in)), rng.uniform(-bound, bound, fan_out)


def fit_checkpoint(spec: ModelSpec, features: np.ndarray) -> dict:
    """A published-layout checkpoint fitted to ``features`` (deterministic per model name; computed in float64, so
    callers fitting several models pass float64 features once rather than a copy made per model)."""
    import torch

    rng = np.random.default_rng(zlib.crc32(spec.model_id.encode()))
    state: dict[str, np.ndarray] = {}
    h = np.asarray(features, dtype=np.float64)
    width = features.shape[1]
    for block, size in enumerate(HIDDEN):
        w, b = _linear(rng, width, size)
        pre = h @ w.T + b
        mean, var = pre.mean(0), pre.var(0)
        gamma = 1.0 + 0.1 * rng.standard_normal(size)
        beta = 0.1 * rng.standard_normal(size)
        lin, bn = f"encoder.layers.{4 * block}", f"encoder.layers.{4 * block + 1}"
        state.update({f"{lin}.weight": w, f"{lin}.bias": b, f"{bn}.weight": gamma, f"{bn}.bias": beta})
        state.update({f"{bn}.running_mean": mean, f"{bn}.running_var": var})
        state[f"{bn}.num_batches_tracked"] = np.array(1000, dtype=np.int64)
        h = np.maximum((pre - mean) / np.sqrt(var + 1e-5) * gamma + beta, 0.0)
        width = size
    w, b = _linear(rng, width, LATENT)
    state.update({"encoder.proj.weight": w, "encoder.proj.bias": b})
    residual = h @ w.T + b
    k = CODEBOOK_SIZE[spec.dataset]
    for level in range(LEVELS):
        book = _kmeans(residual, k, rng)
        chosen = _nearest(residual, book)
        residual = residual - book[chosen]
        prefix = f"quantizer.quantizers.{level}"
        state[f"{prefix}.vectors.weight"] = book
        state[f"{prefix}.cluster_size"] = np.bincount(chosen, minlength=k).astype(np.float64)
        state[f"{prefix}.embed_avg"] = book.copy()
    width = LATENT
    for block, size in enumerate((*reversed(HIDDEN), features.shape[1])):
        dw, db = _linear(rng, width, size)
        state.update({f"decoder.layers.{2 * block}.weight": dw, f"decoder.layers.{2 * block}.bias": db})
        width = size
    tensors = {
        key: torch.from_numpy(np.asarray(value)).to(torch.int64 if value.dtype == np.int64 else torch.float32)
        for key, value in state.items()
    }
    return {
        "model_state_dict": tensors,
        "epoch": 1,
        "config": {"div_weight": spec.div_weight, "commitment_weight": spec.commitment_weight, "lr": spec.lr},
    }


def write_dataset(hub: Path, repo: str, features: np.ndarray, metadata: dict, mapping: list[tuple[str, int]]) -> None:
    """Write one dataset in the hub layout."""
    import torch

    base = hub / "datasets" / repo
    (base / FEATURES_FILE).parent.mkdir(parents=True, exist_ok=True)
    (base / PID_MAPPING_FILE).parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.from_numpy(features), base / FEATURES_FILE)
    (base / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    with (base / PID_MAPPING_FILE).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Original_Pid", "Mapped_Pid"])
        writer.writerows(mapping)


def build_demo_hub(hub: str | Path, models: tuple[str, ...] = DEFAULT_MODELS, progress=print) -> Path:
    """Build the demo hub at ``hub`` (atomically: a half-built hub never appears)."""
    import torch

    target = Path(hub)
    staging = target.with_name(target.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    specs = [parse_model_id(m) for m in models]
    datasets = {"nyc": nyc_features, "tky": tky_features}
    for dataset in sorted({s.dataset for s in specs}):
        progress(f"demo hub: building {dataset} features")
        features, metadata, mapping = datasets[dataset]()
        wide = features.astype(np.float64)
        for repo in sorted({s.dataset_repo for s in specs if s.dataset == dataset}):
            write_dataset(staging, repo, features, metadata, mapping)
        for spec in (s for s in specs if s.dataset == dataset):
            progress(f"demo hub: fitting {spec.model_id}")
            path = staging / "models" / spec.org / spec.name / CHECKPOINT_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(fit_checkpoint(spec, wide), path)
    staging.rename(target)
    return target

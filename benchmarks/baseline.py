"""A careful single-process baseline for W2: stream Parquet shards, encode every model with torch, write each file.

Per record batch (pyarrow): densify the multi-hot rows to float32, run every model's encoder (torch ``nn.Sequential``
of Linear/BatchNorm1d/ReLU/Dropout blocks + projection, float32, eval mode, no grad) and residual quantizer (nearest
codeword by ``||r||² - 2 r·c + ||c||²``), then format with pyarrow compute (float32 to string cast, list join) and
append to one CSV (or Parquet) file per model. ``torch.set_num_threads`` defaults to the machine's cores; ``--device
cuda`` runs the encoders on a GPU.

Run: ``python -m benchmarks.baseline --hub-dir H --out-dir O [--format csv|parquet] [--device cuda] [MODEL_ID ...]``
(default: the 5 NYC models of ``benchmarks.generate``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from benchmarks.compare import output_file
from benchmarks.generate import FEATURES_DIR, NYC_MODELS
from rqvae_ray.inputs.model_ids import parse_model_id

BATCH_ROWS = 8192
CSV_HEADER = b"Pid,Codebook,Vector\n"


class FrozenModel:
    """Encoder + residual quantizer of one checkpoint, float32, eval mode."""

    def __init__(self, state: dict[str, torch.Tensor], device: str = "cpu") -> None:
        self.device = torch.device(device)
        blocks: list[nn.Module] = []
        index = 0
        while f"encoder.layers.{index}.weight" in state:
            weight = state[f"encoder.layers.{index}.weight"]
            linear = nn.Linear(weight.shape[1], weight.shape[0])
            norm = nn.BatchNorm1d(weight.shape[0])
            linear.load_state_dict({"weight": weight, "bias": state[f"encoder.layers.{index}.bias"]})
            norm.load_state_dict(
                {
                    name: state[f"encoder.layers.{index + 1}.{name}"]
                    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
                }
            )
            blocks += [linear, norm, nn.ReLU(), nn.Dropout(0.1)]
            index += 4
        proj = nn.Linear(state["encoder.proj.weight"].shape[1], state["encoder.proj.weight"].shape[0])
        proj.load_state_dict({"weight": state["encoder.proj.weight"], "bias": state["encoder.proj.bias"]})
        self.encoder = nn.Sequential(*blocks, proj).float().eval().to(self.device)
        self.codebooks = []
        level = 0
        while f"quantizer.quantizers.{level}.vectors.weight" in state:
            book = state[f"quantizer.quantizers.{level}.vectors.weight"].float().contiguous()
            self.codebooks.append(book.to(self.device))
            level += 1
        self.norms = [(book * book).sum(1) for book in self.codebooks]

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """codes int32 [n, levels], vectors float32 [n, latent]."""
        residual = self.encoder(x.to(self.device, non_blocking=True))
        vectors = torch.zeros_like(residual)
        codes = torch.empty((len(x), len(self.codebooks)), dtype=torch.int64, device=self.device)
        for level, (book, norm) in enumerate(zip(self.codebooks, self.norms, strict=True)):
            distances = (residual * residual).sum(1, keepdim=True) - 2 * residual @ book.T + norm
            chosen = distances.argmin(dim=1)
            codes[:, level] = chosen
            picked = book[chosen]
            vectors += picked
            residual = residual - picked
        return codes.cpu().numpy().astype(np.int32), vectors.cpu().numpy()


def load_model(path: Path, device: str = "cpu") -> FrozenModel:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return FrozenModel(checkpoint["model_state_dict"], device)


def batch_to_dense(batch: pa.RecordBatch, dim: int) -> np.ndarray:
    """Dense float32 [n, dim] of a batch with ``indices`` (+ optional ``values``) or a ``features`` column."""
    if "features" in batch.schema.names:
        column = batch.column("features")
        return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    column = batch.column("indices")
    offsets = column.offsets.to_numpy()
    flat = column.values.to_numpy()[offsets[0] : offsets[-1]]
    dense = np.zeros((len(column), dim), dtype=np.float32)
    rows = np.repeat(np.arange(len(column)), np.diff(offsets))
    if "values" in batch.schema.names:
        values = batch.column("values")
        dense[rows, flat] = values.values.to_numpy()[values.offsets[0].as_py() : values.offsets[-1].as_py()]
    else:
        dense[rows, flat] = 1.0
    return dense


def _join(flat: pa.Array, width: int) -> pa.Array:
    offsets = pa.array(np.arange(0, len(flat) + 1, width, dtype=np.int32))
    return pc.binary_join(pa.ListArray.from_arrays(offsets, flat), ", ")


def csv_bytes(pids: np.ndarray, codes: np.ndarray, vectors: np.ndarray) -> bytes:
    """``Pid,"[c1, c2, c3]","[v1, ..., vd]"`` lines, floats as Arrow's shortest round-trip float32 strings."""
    pid_text = pa.array(pids).cast(pa.string())
    code_text = _join(pa.array(codes.ravel()).cast(pa.string()), codes.shape[1])
    floats = pa.array(vectors.ravel()).cast(pa.string())
    floats = pc.if_else(pc.equal(floats, "-0"), "-0.0", floats)
    vector_text = _join(floats, vectors.shape[1])
    lines = pc.binary_join_element_wise(pid_text, ',"[', code_text, ']","[', vector_text, ']"\n', "")
    _, offsets, data = lines.buffers()
    ends = np.frombuffer(offsets, dtype=np.int32)[lines.offset : lines.offset + len(lines) + 1]
    return data[int(ends[0]) : int(ends[-1])].to_pybytes()


def arrow_table(pids: np.ndarray, codes: np.ndarray, vectors: np.ndarray) -> pa.Table:
    levels, dim = codes.shape[1], vectors.shape[1]
    offsets = pa.array(np.arange(0, len(pids) * levels + 1, levels, dtype=np.int32))
    return pa.table(
        {
            "Pid": pa.array(pids),
            "Codebook": pa.ListArray.from_arrays(offsets, pa.array(codes.ravel())),
            "Vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        }
    )


def run(
    hub_dir: Path,
    out_dir: Path,
    model_ids: list[str] | tuple[str, ...] = NYC_MODELS,
    fmt: str = "csv",
    batch_rows: int = BATCH_ROWS,
    threads: int | None = None,
    device: str = "cpu",
) -> list[Path]:
    """Encode every POI of the models' dataset with every model; returns the output paths."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    specs = [parse_model_id(m) for m in model_ids]
    repos = {s.dataset_repo for s in specs}
    if len(repos) != 1:
        raise ValueError("the baseline runs models of one dataset at a time")
    repo = repos.pop()
    models = [load_model(hub_dir / "models" / s.org / s.name / "rqvae_best.pt", device) for s in specs]
    dim = models[0].encoder[0].in_features
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"baseline: torch {torch.__version__} on {device_name}, {torch.get_num_threads()} threads", flush=True)
    shards = sorted((hub_dir / "datasets" / repo / FEATURES_DIR).glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no Parquet shards under {hub_dir / 'datasets' / repo / FEATURES_DIR}")
    paths = [output_file(out_dir, m, fmt) for m in model_ids]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    staged = [path.with_name(f".{path.name}.partial") for path in paths]
    handles = [open(path, "wb") for path in staged] if fmt == "csv" else []  # noqa: SIM115
    writers: list[pq.ParquetWriter | None] = [None] * len(paths)
    for handle in handles:
        handle.write(CSV_HEADER)
    for shard in shards:
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_rows):
            pids = batch.column("Pid").to_numpy()
            x = torch.from_numpy(batch_to_dense(batch, dim))
            for index, model in enumerate(models):
                codes, vectors = model.encode(x)
                if fmt == "csv":
                    handles[index].write(csv_bytes(pids, codes, vectors))
                    continue
                table = arrow_table(pids, codes, vectors)
                if writers[index] is None:
                    # The product's settings: plain encoding (dictionary encoding costs ~8x the CPU on floats).
                    writers[index] = pq.ParquetWriter(staged[index], table.schema, use_dictionary=False)
                writers[index].write_table(table)
    for handle in handles:
        handle.close()
    for writer in writers:
        if writer is not None:
            writer.close()
    for temp, path in zip(staged, paths, strict=True):
        os.replace(temp, path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline", description=__doc__.splitlines()[0])
    parser.add_argument("model_ids", nargs="*", default=list(NYC_MODELS))
    parser.add_argument("--hub-dir", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    parser.add_argument("--batch-rows", type=int, default=BATCH_ROWS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cpu", help="torch device for the encoders, e.g. cuda")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    paths = run(args.hub_dir, args.out_dir, args.model_ids, args.format, args.batch_rows, args.threads, args.device)
    print(f"baseline: {len(paths)} files in {time.perf_counter() - started:.1f}s", flush=True)
    for path in paths:
        print(f"  {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

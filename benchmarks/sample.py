"""What the one-thread measurements (:mod:`benchmarks.components`, :mod:`benchmarks.job_floor`) share: BLAS on one
thread, and the first rows of a W2 hub's NYC shards in batches."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa


def sample_args(module: str, doc: str, argv: list[str] | None, rows: int) -> argparse.Namespace:
    """The command line of such a measurement: ``--hub-dir`` (a W2 hub), ``--rows`` (``rows`` by default) and
    ``--batch``."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    parser.add_argument("--hub-dir", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=rows)
    parser.add_argument("--batch", type=int, default=4096)
    return parser.parse_args(argv)


def one_thread() -> None:
    """One BLAS thread, as each encoder actor and each encode thread runs; BLAS reads these when numpy loads, so call
    this before anything imports numpy."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"


def hub_sample(hub_dir: Path, rows: int, batch: int) -> list[pa.Table]:
    """The first ``rows`` POIs of ``hub_dir``'s NYC shards, in tables of at most ``batch`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.generate import FEATURES_DIR

    tables, have = [], 0
    for shard in sorted((hub_dir / "datasets/comp5331poi/nyc" / FEATURES_DIR).glob("*.parquet")):
        for part in pq.ParquetFile(shard).iter_batches(batch_size=batch):
            tables.append(pa.Table.from_batches([part.slice(0, rows - have)]))
            have += tables[-1].num_rows
            if have >= rows:
                return tables
    return tables

"""The floor of any Ray Data run on this machine, the third system of W1: start a private local Ray the way the
product does, stream N rows (by default W1's 13,035 POIs) through one actor pool of one actor whose constructor
imports numpy and pyarrow, and stop Ray the way the product's command line does. The rows enter Ray as the product's
rows in memory do: blocks this process puts into the object store, no task (``ray.data.from_arrow``, used here until
2026-12-06, runs a task per block for its metadata, and their worker processes cost ~3 CPU-seconds, ~1.7 s of the
floor's ~8 s on 2 cores). No model, no file: what is left of a run when its own work is taken away.

Run: ``python -m benchmarks.floor [--rows N] [--batch-size B]``.
"""

from __future__ import annotations

import argparse
import sys
import time


class Touch:
    """A Ray Data UDF that does nothing but exist: its actor imports what an encoder actor imports at the least."""

    def __init__(self) -> None:
        import numpy  # noqa: F401
        import pyarrow  # noqa: F401

    def __call__(self, batch):
        return batch


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=13_035)
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    import numpy as np
    import pyarrow as pa

    from rqvae_ray.ray_backend import compat
    from rqvae_ray.ray_backend.cluster import begin_stopping_ray, configure_data_context, start_ray

    start_ray(None)
    configure_data_context()
    from ray.data import ActorPoolStrategy

    blocks = [
        pa.table({"Pid": np.arange(start + 1, min(start + args.batch_size, args.rows) + 1, dtype=np.int64)})
        for start in range(0, args.rows, args.batch_size)
    ]
    ds = compat.from_blocks(blocks).map_batches(
        Touch, batch_size=args.batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=1), num_cpus=0.5
    )
    rows = sum(bundle.num_rows() for bundle in ds.iter_internal_ref_bundles())
    begin_stopping_ray().wait()
    print(f"{rows} rows through one actor pool in {time.perf_counter() - started:.2f}s", flush=True)
    return 0 if rows == args.rows else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""An encoder that does no math, for the ceiling benchmark: what the pipeline streams when encoding costs nothing.

:class:`StandIn` is an ``encoder_factory`` (:class:`rqvae_ray.pipeline.options.RunOptions`): it enters the real
pipeline where the encoders are built, on both executors (Ray pickles it into the encoder actors). Each row's codes
come from a hash of its nonzero columns (and values), so equal features get equal SIDs, spread evenly over every SID
the model's codebooks can spell (the real NYC models of the benchmark hub use 29-32k of their 32,768 SIDs at 250k
POIs; the stand-in 32.6k); the Vector is the sum of the chosen codewords, as the real encoder's. Everything after the
encoder (CSV text, counting, writing, hashing) does the same work as on a real run.

Run (one measured system of ``python -m benchmarks ceiling``):
``python -m benchmarks.stand_in --hub-dir H --out-dir O --format csv --executor ray [MODEL_ID ...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import zlib

import numpy as np

from rqvae_ray.core.checkpoint import ModelWeights
from rqvae_ray.core.encoder import Encoder, SparseRows, codeword_sums


class StandInEncoder(Encoder):
    """Codes from a hash of each row (no matrix product), Vectors as the real encoder's: the codeword sums."""

    def __init__(self, weights: ModelWeights) -> None:
        super().__init__(weights, float32_pass=False)
        self._sizes = tuple(weights.codebook_sizes)
        rng = np.random.default_rng(zlib.crc32(weights.codebooks[0].tobytes()))  # each model its own hash
        self._column_keys = rng.integers(1, 2**63, size=weights.input_dim, dtype=np.uint64)

    def encode_latent(self, rows: SparseRows) -> tuple[np.ndarray, np.ndarray]:
        """``codes`` int32 [n, levels] and, standing for the latent, the Vectors in float64 [n, latent]."""
        self._check_columns(rows)
        terms = self._column_keys[rows.indices]
        if rows.values is not None:
            terms = terms * (rows.values.astype(np.float32).view(np.uint32).astype(np.uint64) | np.uint64(1))
        sums = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(terms, dtype=np.uint64)])
        keys = sums[rows.indptr[1:]] - sums[rows.indptr[:-1]]  # wraps around: a hash, not a sum
        sids = keys % np.uint64(math.prod(self._sizes))
        codes = np.stack(np.unravel_index(sids.astype(np.int64), self._sizes), axis=1).astype(np.int32)
        return codes, codeword_sums(self.weights.codebooks, codes).astype(np.float64)


def stand_in(weights: ModelWeights, use_gpu: bool = False) -> Encoder:
    """An ``encoder_factory`` that builds :class:`StandInEncoder` (the same on a GPU: it does no math)."""
    return StandInEncoder(weights)


def main(argv: list[str]) -> int:
    from benchmarks.generate import NYC_MODELS
    from rqvae_ray import BatchInferenceProcessor
    from rqvae_ray.inputs.model_ids import parse_model_id

    parser = argparse.ArgumentParser(prog="python -m benchmarks.stand_in", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(NYC_MODELS))
    parser.add_argument("--hub-dir", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    parser.add_argument("--executor", choices=("local", "ray"), default="ray")
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args(argv)
    processor = BatchInferenceProcessor(
        hub_dir=args.hub_dir,
        out_dir=args.out_dir,
        fmt=args.format,
        executor=args.executor,
        batch_size=args.batch_size,
        force=True,
    )
    processor.options = dataclasses.replace(processor.options, encoder_factory=stand_in)
    started = time.perf_counter()
    results = processor.run([parse_model_id(model) for model in args.models])
    for result in results:
        status = "ok" if result.ok else f"FAILED: {result.error}"
        print(f"{result.model_id}: {result.rows} rows, {result.unique_sids} unique SIDs, {status}")
    print(f"run_models took {time.perf_counter() - started:.2f}s", flush=True)
    return 0 if all(result.ok for result in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

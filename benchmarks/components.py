"""Single-process, single-thread throughput of the pieces of the work, to know the ceiling on this machine.

For one model over ``--rows`` POIs of a W2 hub (batches of ``--batch`` rows), in this process, one thread each:

* product encode: ``rqvae_ray.core.encoder.Encoder.encode`` (the float32 pass, the float64 path for the rows it
  cannot prove; the same codes), and the float64 path alone;
* product CSV formatting: every row (``csv_parts``) and with the per-SID cache of whole lines (``SidLines``: the
  pass that learns the SIDs, then one that finds them known);
  product Arrow columns: ``arrow_columns``;
* baseline encode: densify + torch float32 encoder and quantizer (``benchmarks.baseline``);
* Parquet read of the shards (``indices``) and the product's ``rows_from_table``.

Rows/s are model-rows per second per core; multiply by the cores to bound a perfectly parallel system.

Run: ``python -m benchmarks.components --hub-dir .bench/w2_hub_n500000 [--rows 100000] [--batch 4096]``.
"""

from __future__ import annotations

import sys
import time

from benchmarks.sample import hub_sample, one_thread, sample_args


def _timed(label: str, rows: int, fn) -> float:
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    print(f"  {label:<48} {seconds:8.2f}s  {rows / seconds:>12,.0f} rows/s/core")
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = sample_args("benchmarks.components", __doc__, argv, rows=100_000)
    one_thread()
    import torch

    torch.set_num_threads(1)
    from benchmarks.baseline import batch_to_dense, csv_bytes, load_model
    from benchmarks.compare import product_csv_bytes
    from benchmarks.generate import NYC_MODELS
    from rqvae_ray.core.checkpoint import load_checkpoint_file
    from rqvae_ray.core.encoder import Encoder
    from rqvae_ray.core.formatting import SidLines, arrow_columns, string_bytes
    from rqvae_ray.core.rows import rows_from_table
    from rqvae_ray.core.sid_stats import pack_codes

    model = NYC_MODELS[0]
    tables = hub_sample(args.hub_dir, args.rows, args.batch)
    rows = sum(t.num_rows for t in tables)
    print(f"{rows:,} rows of {args.hub_dir}, batches of {args.batch}, model {model}, 1 thread")
    checkpoint = args.hub_dir / "models" / model / "rqvae_best.pt"
    encoder = Encoder(load_checkpoint_file(checkpoint))
    frozen = load_model(checkpoint)
    sparse = []
    _timed("product rows_from_table (Arrow -> CSR)", rows, lambda: sparse.extend(rows_from_table(t) for t in tables))
    float64 = Encoder(encoder.weights, float32_pass=False)
    _timed("product encode, float64 path alone", rows, lambda: [float64.encode(r) for r in sparse])
    results = []
    _timed(
        "product encode (float32 pass + float64 rest)", rows, lambda: results.extend(encoder.encode(r) for r in sparse)
    )
    pids = [t.column("Pid").to_numpy() for t in tables]
    _timed(
        "product CSV formatting (csv_lines)",
        rows,
        lambda: [product_csv_bytes(p, c, v) for p, (c, v) in zip(pids, results, strict=True)],
    )
    text = SidLines(encoder.vectors, tokens=False)
    sizes = encoder.weights.codebook_sizes

    def cached_lines() -> None:
        for p, (c, _) in zip(pids, results, strict=True):
            string_bytes(text.csv_lines(p, c, pack_codes(c, sizes)))

    # The first pass formats each distinct SID once (most of its time on a sample this small); a long run's blocks
    # mostly find their SIDs known, as the second pass does.
    _timed("product CSV formatting (SidLines cache, learning)", rows, cached_lines)
    _timed("product CSV formatting (SidLines cache, known)", rows, cached_lines)
    _timed(
        "product Arrow columns (arrow_columns)",
        rows,
        lambda: [arrow_columns(p, c, v) for p, (c, v) in zip(pids, results, strict=True)],
    )
    dense = []
    _timed(
        "baseline densify (float32)",
        rows,
        lambda: dense.extend(batch_to_dense(t.to_batches()[0], 1407) for t in tables),
    )
    base = []
    _timed(
        "baseline encode (torch float32, dense)",
        rows,
        lambda: base.extend(frozen.encode(torch.from_numpy(d)) for d in dense),
    )
    _timed(
        "baseline CSV formatting (pyarrow)",
        rows,
        lambda: [csv_bytes(p, c, v) for p, (c, v) in zip(pids, base, strict=True)],
    )
    equal = sum(int((a[0] == b[0]).all(axis=1).sum()) for a, b in zip(results, base, strict=True))
    print(f"  codes equal product vs baseline: {equal}/{rows}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

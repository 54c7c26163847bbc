"""The encoder's share of W2's floor for the job: CPU seconds per SID row of the product's encoder, one thread.

W2's third goal compares ours with this machine's floor for the job: the encoder's CPU seconds for every SID row
divided by the cores, plus the floor of Ray Data (:mod:`benchmarks.floor`). This measures the first term's rate: each
of the hub's models encodes the same sample of ``--rows`` POIs with :meth:`~rqvae_ray.core.encoder.Encoder.codes`
(what the encode stage calls: the float32 pass, the float64 path for the rows it cannot prove) in batches of
``--batch``, on one thread; the Arrow-to-CSR decode of the rows is left out (it is the reading's cost, not the
encoder's). Prints one JSON line: ``{"cpu_s_per_sid_row": ..., "sid_rows": ...}``.

Run: ``python -m benchmarks.job_floor --hub-dir .bench/w2_hub_n500000 [--rows 40000] [--batch 4096]``.
"""

from __future__ import annotations

import json
import sys
import time

from benchmarks.sample import hub_sample, one_thread, sample_args


def main(argv: list[str] | None = None) -> int:
    args = sample_args("benchmarks.job_floor", __doc__, argv, rows=40_000)
    one_thread()
    from rqvae_ray.core.checkpoint import load_checkpoint_file
    from rqvae_ray.core.encoder import Encoder
    from rqvae_ray.core.rows import rows_from_table

    stamp = json.loads((args.hub_dir / "benchmarks-generator.json").read_text())
    batches = [rows_from_table(table) for table in hub_sample(args.hub_dir, args.rows, args.batch)]
    have = sum(rows.num_rows for rows in batches)
    cpu_s, sid_rows = 0.0, 0
    for model in stamp["models"]:
        encoder = Encoder(load_checkpoint_file(args.hub_dir / "models" / model / "rqvae_best.pt"))
        started = time.process_time()
        for rows in batches:
            encoder.codes(rows)
        cpu_s += time.process_time() - started
        sid_rows += have
    print(json.dumps({"cpu_s_per_sid_row": cpu_s / sid_rows, "sid_rows": sid_rows}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

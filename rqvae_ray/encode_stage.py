"""The Ray Data UDF: one actor pool per model; each actor loads its frozen model once and encodes batches.

Kept lean on purpose: CPU actors import numpy and pyarrow only (torch only when Ray assigned a GPU).
"""

from __future__ import annotations

import pyarrow as pa

from rqvae_ray.encoder import Encoder, make_encoder
from rqvae_ray.features import rows_from_table
from rqvae_ray.formatting import SidText, arrow_columns, csv_lines, sid_tokens
from rqvae_ray.sid_stats import pack_codes

INPUT_COLUMNS = ("indices", "values", "features")


class EncodeBatches:
    """Callable class for ``Dataset.map_batches``: appends one model's columns to each batch."""

    def __init__(self, weights_ref: list, column: str, fmt: str, drop_inputs: bool, dedup: bool, tokens: bool) -> None:
        import ray

        weights = ray.get(weights_ref[0])
        self.encoder: Encoder = make_encoder(weights, ray.get_gpu_ids())
        self.column = column
        self.fmt = fmt
        self.drop_inputs = drop_inputs
        self.dedup = dedup
        self.tokens = tokens
        self.text = SidText(self.encoder.vectors, tokens)

    def __call__(self, batch: pa.Table) -> pa.Table:
        codes, vectors = self.encoder.encode(rows_from_table(batch))
        pids = batch.column("Pid").to_numpy()
        sizes = self.encoder.weights.codebook_sizes
        packed = pack_codes(codes, sizes)
        batch = batch.append_column(f"{self.column}.sid", pa.array(packed))
        if self.fmt == "csv":
            parts = self.text.csv_parts(pids, codes, packed)
            if self.dedup:  # the writer adds the dedup codes once every SID is counted
                columns = parts
            else:
                columns = {"csv": csv_lines(parts)}
        else:
            columns = {k.lower(): v for k, v in arrow_columns(pids, codes, vectors).items() if k != "Pid"}
            if self.tokens:
                columns["tokens"] = sid_tokens(codes)
        for name, values in columns.items():
            batch = batch.append_column(f"{self.column}.{name}", values)
        if self.drop_inputs:
            batch = batch.drop_columns([c for c in INPUT_COLUMNS if c in batch.column_names])
        return batch

"""Where SIDs are computed: the Ray Data UDF whose actors hold one or more frozen models and encode each batch.

Kept lean on purpose: CPU actors import numpy and pyarrow only (torch only when Ray assigned a GPU).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa

from rqvae_ray.checkpoint import ModelWeights
from rqvae_ray.contract import EncodedColumns, ModelSlot, OutputFormat, OutputSpec
from rqvae_ray.encoder import Encoder, SparseRows, make_encoder
from rqvae_ray.errors import DatasetError, InputDimensionError
from rqvae_ray.features import rows_from_table
from rqvae_ray.formatting import SidText, csv_lines, sid_tokens
from rqvae_ray.sid_stats import pack_codes

INPUT_COLUMNS = ("indices", "values", "features")


class _Model:
    """One model inside an actor: its encoder, its slot in the blocks, and its per-SID text cache."""

    def __init__(self, model_id: str, slot: int, weights: ModelWeights, gpu_ids: list, spec: OutputSpec) -> None:
        self.model_id = model_id
        self.slot = ModelSlot(slot)
        self.encoder: Encoder = make_encoder(weights, gpu_ids)
        self.text = SidText(self.encoder.vectors, spec.sid_tokens) if spec.fmt is OutputFormat.CSV else None

    def encode(self, rows: SparseRows, pids, spec: OutputSpec) -> EncodedColumns:
        started = time.perf_counter()
        codes, _vectors = self.encoder.encode(rows)
        packed = pack_codes(codes, self.encoder.weights.codebook_sizes)
        encoded = encoded_columns(pids, codes, packed, spec, self.text)
        share = (time.perf_counter() - started) / max(len(pids), 1)
        return dataclasses.replace(encoded, seconds=pa.array(np.full(len(pids), share)))


def encoded_columns(
    pids: np.ndarray, codes: np.ndarray, packed: np.ndarray, spec: OutputSpec, text: SidText | None
) -> EncodedColumns:
    """A model's output columns for rows of known codes (``text``: its per-SID CSV text cache, for CSV)."""
    sid = pa.array(packed)
    if text is not None:
        parts = text.csv_parts(pids, codes, packed)
        if spec.text_parts:  # the writer adds the dedup codes once every SID is counted
            return EncodedColumns(sid, head=parts["head"], tail=parts["tail"], tokens=parts.get("tokens"))
        return EncodedColumns(sid, lines=csv_lines(parts))
    return EncodedColumns(sid, tokens=sid_tokens(codes) if spec.sid_tokens else None)


class EncodeModels:
    """Callable class for ``Dataset.map_batches``: encodes each batch with every model it holds.

    ``models`` are ``(model ID, slot, weights)``; the output block holds ``Pid`` and each model's columns, plus the
    input columns when ``keep_inputs`` (a later pool in a chain of per-model pools still needs them).
    """

    def __init__(
        self, repo: str, models: list[tuple[str, int, ModelWeights]], spec: OutputSpec, keep_inputs: bool
    ) -> None:
        import ray

        # Outside Ray (a test, or a notebook calling the UDF directly) no GPU was assigned.
        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        self.repo = repo
        self.spec = spec
        self.keep_inputs = keep_inputs
        self.models = [_Model(model_id, slot, weights, gpu_ids, spec) for model_id, slot, weights in models]

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            rows = rows_from_table(batch)
        except DatasetError as exc:
            raise DatasetError(self.repo, exc.reason) from None
        pids = batch.column("Pid").to_numpy()
        for model in self.models:
            try:
                encoded = model.encode(rows, pids, self.spec)
            except InputDimensionError as exc:
                raise DatasetError(self.repo, f"{exc} of {model.model_id}; the features do not fit the model") from None
            batch = model.slot.attach(batch, encoded)
        if self.keep_inputs:
            return batch
        return batch.drop_columns([c for c in INPUT_COLUMNS if c in batch.column_names])

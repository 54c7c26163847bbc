"""Where SIDs are computed: the Ray Data UDF whose instances hold one or more frozen models and encode each batch.

It knows nothing of the executor that runs it (Ray's actor pools, or the in-process executor's threads), and is kept
lean on purpose: a CPU instance imports numpy, scipy and pyarrow only (torch only for a GPU).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa

from rqvae_ray.core.contract import (
    CsvText,
    EncodedColumns,
    ModelSlot,
    OutputFormat,
    OutputSpec,
    StageModel,
    csv_text,
    encoded_columns,
)
from rqvae_ray.core.encoder import Encoder, EncoderFactory, SparseRows, make_encoder
from rqvae_ray.core.rows import rows_from_table
from rqvae_ray.core.sid_cap import latent_array
from rqvae_ray.core.sid_stats import sid_layout
from rqvae_ray.errors import DatasetError, InputDimensionError

INPUT_COLUMNS = ("indices", "values", "features")


class _Model:
    """One model inside a stage instance: its encoder, its slot in the blocks, and its per-SID text cache."""

    def __init__(self, model: StageModel, use_gpu: bool, spec: OutputSpec, encoder_factory: EncoderFactory) -> None:
        self.model_id = model.model_id
        self.slot = ModelSlot(model.slot)
        self.encoder: Encoder = encoder_factory(model.weights, use_gpu)
        sizes = model.weights.codebook_sizes
        self.layout = sid_layout(sizes)
        self.text: CsvText | None = None
        if spec.fmt is OutputFormat.CSV:
            self.text = csv_text(self.encoder.vectors, spec.sid_tokens, sizes, lines=not spec.text_parts)

    def encode(self, rows: SparseRows, pids, spec: OutputSpec) -> EncodedColumns:
        started = time.perf_counter()
        if spec.max_per_sid is None:
            codes, latent = self.encoder.codes(rows), None
        else:  # the writer places the POIs that move from it by their latents
            codes, latent = self.encoder.encode_latent(rows)
        packed = self.layout.pack(codes)
        encoded = encoded_columns(pids, codes, packed, spec, self.text)
        if latent is not None:
            encoded = dataclasses.replace(encoded, latent=latent_array(latent))
        share = (time.perf_counter() - started) / max(len(pids), 1)
        return dataclasses.replace(encoded, seconds=pa.array(np.full(len(pids), share)))


class EncodeModels:
    """Callable class for ``Dataset.map_batches``: encodes each batch with every model it holds.

    The output block holds ``Pid`` and each model's columns, plus the input columns when ``keep_inputs`` (a later
    pool in a chain of per-model pools still needs them). ``use_gpu``: encode on CUDA when it is available (the
    executor gave this instance a GPU; Ray sets ``CUDA_VISIBLE_DEVICES`` to it). ``encoder_factory`` builds each
    model's encoder (a benchmark's stand-in replaces :func:`~rqvae_ray.core.encoder.make_encoder`).
    """

    def __init__(
        self,
        *,
        repo: str,
        models: list[StageModel],
        spec: OutputSpec,
        keep_inputs: bool = False,
        use_gpu: bool = False,
        encoder_factory: EncoderFactory = make_encoder,
    ) -> None:
        self.repo = repo
        self.spec = spec
        self.keep_inputs = keep_inputs
        self.models = [_Model(model, use_gpu, spec, encoder_factory) for model in models]

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

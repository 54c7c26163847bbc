"""The SID stage for users' own Ray Data pipelines: the command line's bits, sparse or dense, on Ray or called
directly; bad models fail when the stage is built; the stage asks Ray for the pool it was configured with."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import rqvae_ray
from rqvae_ray.core.contract import OutputFormat
from rqvae_ray.core.encoder import SparseRows
from rqvae_ray.core.rows import sparse_table
from rqvae_ray.errors import CheckpointError, DatasetError, InvalidModelIdError, OutputError, RepoNotFoundError
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_id
from rqvae_ray.outputs.layout import codebooks_filename, output_dir
from rqvae_ray.stages.sid_stage import SidColumns
from tests.pipeline.test_pipeline import features_of

# One model by ID, one by checkpoint file: both NYC models, each prefixed with its name.
BY_ID, BY_FILE = parse_model_id(DEFAULT_MODELS[0]), parse_model_id(DEFAULT_MODELS[3])


def checkpoint_path(hub, spec):
    return hub / "models" / spec.org / spec.name / "rqvae_best.pt"


def stage_config(hub, **overrides) -> rqvae_ray.SidStageConfig:
    keywords = {
        "models": (BY_ID.model_id, checkpoint_path(hub, BY_FILE)),
        "hub_dir": hub,
        "vectors": True,
        "tokens": True,
        "actors": 1,
        "cpus_per_actor": 0.5,
        "batch_size": 1000,
        **overrides,
    }
    return rqvae_ray.SidStageConfig(**keywords)


def cli_columns(out, spec) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The CLI's codes and vectors of ``spec`` (Pid order), and the token strings those codes must give."""
    folder = output_dir(out, spec.dataset_repo, "LLM Dataset")
    frame = rqvae_ray.read_codebooks(folder / codebooks_filename(spec.name, OutputFormat.CSV))
    assert frame["Pid"].tolist() == list(range(1, len(frame) + 1))
    codes = np.array(frame["Codebook"].tolist(), dtype=np.int32)
    tokens = ["".join(f"<{'abc'[level]}_{code}>" for level, code in enumerate(row)) for row in codes]
    return codes, np.stack(frame["Vector"].to_numpy()), tokens


def demo_table(hub, layout: str) -> pa.Table:
    """The demo NYC POIs (Pid from 1), sparse (``indices``) or dense (``features``)."""
    features = features_of(hub, "nyc")
    if layout == "sparse":
        return sparse_table(SparseRows.from_dense(features))
    dense = pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), features.shape[1])
    return pa.table({"Pid": pa.array(np.arange(1, len(features) + 1, dtype=np.int64)), "features": dense})


def assert_cli_bits(table: pa.Table, out, pids: np.ndarray) -> None:
    """Each model's columns of ``table`` (rows of ``pids``) equal the CLI's files row for row, to the bit."""
    for spec in (BY_ID, BY_FILE):
        codes, vectors, tokens = cli_columns(out, spec)
        rows = pids - 1
        got_codes = table.column(f"{spec.name}.codes")
        assert got_codes.type == pa.list_(pa.int32())
        np.testing.assert_array_equal(np.array(got_codes.to_pylist(), dtype=np.int32), codes[rows])
        got_vectors = table.column(f"{spec.name}.vector").combine_chunks()
        assert got_vectors.type == pa.list_(pa.float32(), 64)
        flat = got_vectors.flatten().to_numpy().reshape(-1, 64)
        np.testing.assert_array_equal(flat.view(np.uint32), vectors[rows].view(np.uint32))
        assert table.column(f"{spec.name}.sid").to_pylist() == [tokens[row] for row in rows]


@pytest.mark.timeout(300, method="signal")
@pytest.mark.parametrize("layout", ["sparse", "dense"])
def test_stage_on_ray_gives_the_command_lines_bits(demo_hub, demo_run, local_ray, layout):
    out, _ = demo_run
    table = demo_table(demo_hub, layout)
    # Rows in a scrambled order, so that batches hold other POIs than the CLI's did; sorted back by Pid below.
    order = np.random.default_rng(7).permutation(table.num_rows)
    stage = rqvae_ray.build_sid_stage(stage_config(demo_hub, actors=(1, 2)))
    ds = stage(local_ray.data.from_arrow(table.take(pa.array(order))))
    result = pa.concat_tables(local_ray.get(ds.to_arrow_refs(), timeout=240)).sort_by("Pid")
    assert result.column_names == table.column_names + list(stage.output_columns)
    pids = result.column("Pid").to_numpy()
    np.testing.assert_array_equal(pids, np.arange(1, table.num_rows + 1))
    assert result.select(table.column_names).equals(table)
    assert_cli_bits(result, out, pids)


def test_the_class_called_directly_gives_the_same_columns(demo_hub, demo_run):
    out, _ = demo_run
    stage = rqvae_ray.build_sid_stage(stage_config(demo_hub, drop_features=True))
    udf = SidColumns(**stage.map_batches_kwargs["fn_constructor_kwargs"])
    for layout in ("sparse", "dense"):
        table = demo_table(demo_hub, layout).slice(4000, 300)
        result = udf(table)
        assert result.column_names == ["Pid", *stage.output_columns]
        assert_cli_bits(result, out, result.column("Pid").to_numpy())
    empty = udf(demo_table(demo_hub, "sparse").slice(0, 0))
    assert empty.num_rows == 0 and empty.column_names == ["Pid", *stage.output_columns]


def test_only_codes_unless_asked_and_prefixes_from_the_config(demo_hub):
    stage = rqvae_ray.build_sid_stage(stage_config(demo_hub, vectors=False, tokens=False, prefixes=("first", "second")))
    assert stage.output_columns == ("first.codes", "second.codes")
    table = demo_table(demo_hub, "sparse").slice(0, 10)
    result = SidColumns(**stage.map_batches_kwargs["fn_constructor_kwargs"])(table)
    assert result.column_names == ["Pid", "indices", "first.codes", "second.codes"]
    # The same batch through the stage again would write the same columns twice.
    with pytest.raises(DatasetError, match="already has a column 'first.codes'"):
        SidColumns(**stage.map_batches_kwargs["fn_constructor_kwargs"])(result)


def test_features_that_do_not_fit_are_refused_in_one_line(demo_hub):
    stage = rqvae_ray.build_sid_stage(stage_config(demo_hub))
    udf = SidColumns(**stage.map_batches_kwargs["fn_constructor_kwargs"])
    narrow = pa.table(
        {"Pid": [1], "features": pa.FixedSizeListArray.from_arrays(pa.array([1.0, 0.0], pa.float32()), 2)}
    )
    outside = pa.table({"Pid": [1], "indices": pa.array([[3, 5000]], pa.list_(pa.int32()))})
    no_pid = pa.table({"indices": pa.array([[3]], pa.list_(pa.int32()))})
    no_features = pa.table({"Pid": [1], "text": ["a cafe"]})
    for batch, reason in (
        (narrow, f"2 columns but {BY_ID.model_id} takes 1407"),
        (outside, "feature column 5000 is outside the model's input dimension 1407"),
        (no_pid, "reads a 'Pid' column"),
        (no_features, "reads 'indices' \\(sparse\\) or 'features' \\(dense\\)"),
    ):
        with pytest.raises(DatasetError, match=reason) as caught:
            udf(batch)
        assert "\n" not in str(caught.value)


def test_a_bad_model_fails_when_the_stage_is_built(demo_hub, tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    for model, error in (
        ("comp5331poi/rqvae/nyc", InvalidModelIdError),
        ("comp5331poi/rqvae-nyc-div9-commit0.5-lr5e-5", RepoNotFoundError),
        (str(bad), CheckpointError),
        (tmp_path / "missing.pt", CheckpointError),
    ):
        with pytest.raises(error) as caught:
            rqvae_ray.build_sid_stage(stage_config(demo_hub, models=(BY_ID.model_id, model)))
        assert "\n" not in str(caught.value) and str(caught.value)


def test_bad_configs_are_refused(demo_hub):
    for overrides, reason in (
        ({"models": BY_ID.model_id}, "give \\(model,\\) for one model"),
        ({"models": ()}, "needs at least one model"),
        ({"actors": (3, 2)}, "min <= max"),
        ({"actors": 0}, "at least 1"),
        ({"cpus_per_actor": -1.0}, "may not be negative"),
        ({"batch_size": 0}, "at least 1 row"),
        ({"prefixes": ("only-one",)}, "1 prefixes for 2 models"),
    ):
        with pytest.raises(OutputError, match=reason):
            stage_config(demo_hub, **overrides)
    with pytest.raises(OutputError, match="'same'.*its own prefix"):
        rqvae_ray.build_sid_stage(stage_config(demo_hub, prefixes=("same", "same")))
    tky = DEFAULT_MODELS[5]  # the demo's TKY models take 2569 features, NYC's 1407
    with pytest.raises(OutputError, match="different numbers of input features \\[1407, 2569\\]"):
        rqvae_ray.build_sid_stage(stage_config(demo_hub, models=(BY_ID.model_id, tky)))


def test_the_stage_asks_ray_for_the_configured_pool(demo_hub):
    from ray.data import ActorPoolStrategy

    stage = rqvae_ray.build_sid_stage(
        stage_config(demo_hub, actors=(2, 4), cpus_per_actor=1.5, gpus_per_actor=0.25, batch_size=512)
    )
    kwargs = stage.map_batches_kwargs
    assert set(kwargs) == {
        "fn",
        "fn_constructor_kwargs",
        "batch_size",
        "batch_format",
        "compute",
        "num_cpus",
        "num_gpus",
    }
    assert kwargs["fn"] is SidColumns and kwargs["batch_format"] == "pyarrow" and kwargs["batch_size"] == 512
    assert isinstance(kwargs["compute"], ActorPoolStrategy)
    assert (kwargs["compute"].min_size, kwargs["compute"].max_size) == (2, 4)
    assert (kwargs["num_cpus"], kwargs["num_gpus"]) == (1.5, 0.25)
    config = kwargs["fn_constructor_kwargs"]["config"]
    assert config.use_gpu and [m.prefix for m in config.models] == [BY_ID.name, BY_FILE.name]
    fixed = rqvae_ray.build_sid_stage(stage_config(demo_hub, actors=3)).map_batches_kwargs
    assert (fixed["compute"].min_size, fixed["compute"].max_size) == (3, 3)
    assert (fixed["num_cpus"], fixed["num_gpus"]) == (0.5, 0.0)
    assert not fixed["fn_constructor_kwargs"]["config"].use_gpu

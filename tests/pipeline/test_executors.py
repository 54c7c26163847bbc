"""The executors: which one ``auto`` picks and why, and the same bytes from both."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from rqvae_ray.core.contract import Export, OutputFormat, OutputSpec
from rqvae_ray.core.encoder import Encoder, SparseRows, codeword_sums, make_encoder
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_ids
from rqvae_ray.inputs.stores import LocalHub
from rqvae_ray.pipeline.executor import LOCAL_MAX_SID_ROWS, choose_executor, run_datasets
from rqvae_ray.pipeline.local import LocalExecutor
from rqvae_ray.pipeline.options import ExecutorMode, PoolSizing, RunOptions
from rqvae_ray.pipeline.progress import Progress
from rqvae_ray.runner import run_models


def _options(**kwargs) -> RunOptions:
    return RunOptions(hub=LocalHub("."), out_dir=".", **kwargs)


def test_auto_picks_ray_for_a_cluster_gpus_or_a_large_job_and_this_process_otherwise(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert choose_executor(_options(), None) is None  # the size decides: known once the datasets have loaded
    mode, why = choose_executor(_options(), 130_350)
    assert mode is ExecutorMode.LOCAL
    assert why == "130,350 SID rows; a private Ray's start-up would cost more than the work; --executor ray to use it"
    assert choose_executor(_options(), LOCAL_MAX_SID_ROWS)[0] is ExecutorMode.LOCAL
    assert choose_executor(_options(), LOCAL_MAX_SID_ROWS + 1) == (
        ExecutorMode.RAY,
        f"{LOCAL_MAX_SID_ROWS + 1:,} SID rows; past {LOCAL_MAX_SID_ROWS:,} a private Ray, whose actors scale with the "
        "cores",
    )
    parquet = OutputSpec(OutputFormat.PARQUET)
    assert choose_executor(_options(output=parquet), LOCAL_MAX_SID_ROWS)[0] is ExecutorMode.LOCAL
    assert choose_executor(_options(output=parquet), LOCAL_MAX_SID_ROWS + 1)[0] is ExecutorMode.RAY
    assert choose_executor(_options(address="10.0.0.1:6379"), None) == (
        ExecutorMode.RAY,
        "the cluster at --address 10.0.0.1:6379",
    )
    assert choose_executor(_options(pools=PoolSizing(gpus_per_actor=0.5)), None)[0] is ExecutorMode.RAY
    assert choose_executor(_options(executor=ExecutorMode.LOCAL), 10**12) == (ExecutorMode.LOCAL, "--executor local")
    assert choose_executor(_options(executor=ExecutorMode.RAY), 1) == (ExecutorMode.RAY, "--executor ray")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what ray job submit sets
    assert choose_executor(_options(), None) == (ExecutorMode.RAY, "the cluster at RAY_ADDRESS")


@pytest.mark.parametrize("fmt", [OutputFormat.CSV, OutputFormat.PARQUET])
def test_both_executors_write_the_same_bytes_with_dedup_tokens_and_exports(demo_hub, local_ray, tmp_path, fmt):
    specs = parse_model_ids([DEFAULT_MODELS[0], DEFAULT_MODELS[1], DEFAULT_MODELS[6]])
    output = OutputSpec(fmt, dedup=True, sid_tokens=True, exports=frozenset({Export.INDEX_JSON, Export.TENSOR}))
    notes: dict[ExecutorMode, list[str]] = {}
    for executor in (ExecutorMode.LOCAL, ExecutorMode.RAY):
        notes[executor] = []
        options = RunOptions(
            hub=LocalHub(demo_hub), out_dir=str(tmp_path / executor.value), output=output, executor=executor
        )
        results = run_models(specs, options, Progress(notes[executor].append))
        assert all(r.ok for r in results), [r.error for r in results]
    assert notes[ExecutorMode.LOCAL][0] == "executor: in this process (--executor local)"
    assert "executor: Ray (--executor ray)" in notes[ExecutorMode.RAY]
    local, ray = tmp_path / "local", tmp_path / "ray"
    published = sorted(p.relative_to(local) for p in local.rglob("codebooks-*") if p.is_file())
    assert len(published) == 3 * 4  # the codebooks file, the index, the tensor and the prefixes of each model
    for rel in published:
        assert (local / rel).read_bytes() == (ray / rel).read_bytes(), rel


class _FirstCodewords(Encoder):
    """Every row gets the first codeword of every level: an SID no real model gives all the demo's POIs."""

    def encode_latent(self, rows: SparseRows) -> tuple[np.ndarray, np.ndarray]:
        codes = np.zeros((rows.num_rows, len(self.weights.codebooks)), dtype=np.int32)
        return codes, codeword_sums(self.weights.codebooks, codes).astype(np.float64)


def _first_codewords(weights, use_gpu: bool = False) -> Encoder:
    return _FirstCodewords(weights, float32_pass=False)


def test_the_encoder_factory_builds_the_encoders_of_both_executors(demo_hub, local_ray, tmp_path):
    specs = parse_model_ids([DEFAULT_MODELS[0]])
    for executor in (ExecutorMode.LOCAL, ExecutorMode.RAY):
        options = RunOptions(
            hub=LocalHub(demo_hub),
            out_dir=str(tmp_path / executor.value),
            executor=executor,
            encoder_factory=_first_codewords,  # pickled into Ray's encoder actors
        )
        [result] = run_models(specs, options, Progress(lambda _: None))
        assert result.ok, result.error
        assert result.unique_sids == 1 and result.rows == 5135
    local, ray = tmp_path / "local", tmp_path / "ray"
    [published] = [p.relative_to(local) for p in local.rglob("codebooks-*.csv")]
    assert (local / published).read_bytes() == (ray / published).read_bytes()
    assert (local / published).read_text().splitlines()[1].startswith('1,"[0, 0, 0]",')


def test_a_stopped_run_reports_stopping_once_its_datasets_are_told_to_stop(demo_hub, tmp_path):
    """Ctrl-C while the datasets run: the run tells every dataset to stop, then reports ``stopping`` (what a test's
    gate or a console listens for) once, and the interrupt propagates; nothing is published, and BLAS has its
    setting back."""

    class Interrupted(LocalExecutor):
        def wait(self, futures) -> None:
            raise KeyboardInterrupt

    class Stops(Progress):
        def __init__(self) -> None:
            super().__init__(lambda _text: None)
            self.stopped = 0

        def stopping(self) -> None:
            self.stopped += 1

    progress = Stops()
    specs = parse_model_ids([DEFAULT_MODELS[0], DEFAULT_MODELS[5]])
    options = RunOptions(hub=LocalHub(demo_hub), out_dir=str(tmp_path))
    with threadpool_limits(limits=2, user_api="blas"):
        with pytest.raises(KeyboardInterrupt):
            run_datasets(specs, options, progress, lambda _rows: Interrupted())
        assert _blas_threads() == {2}
    assert progress.stopped == 1
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith(".")]


def _blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_blas_runs_one_thread_while_datasets_stream_in_this_process_and_gets_its_setting_back(demo_hub, tmp_path):
    """The in-process executor's threads are one per core; BLAS's own threads on top of them would oversubscribe
    the cores. Two datasets stream at once here: the process's setting comes back once both have ended."""
    seen: list[set[int]] = []

    def encoders(weights, use_gpu: bool = False) -> Encoder:
        seen.append(_blas_threads())  # in an encode thread, as each model's encoder is built
        return make_encoder(weights, use_gpu)

    specs = parse_model_ids([DEFAULT_MODELS[0], DEFAULT_MODELS[5]])
    options = RunOptions(
        hub=LocalHub(demo_hub), out_dir=str(tmp_path), executor=ExecutorMode.LOCAL, encoder_factory=encoders
    )
    with threadpool_limits(limits=2, user_api="blas"):
        assert _blas_threads() == {2}
        results = run_models(specs, options, Progress(lambda _: None))
        assert all(r.ok for r in results), [r.error for r in results]
        assert len(seen) >= 2 and all(threads == {1} for threads in seen), seen
        assert _blas_threads() == {2}


@pytest.mark.parametrize("known_before_loading", [True, False])
def test_the_executor_prepares_in_the_main_thread_before_any_dataset_loads_when_it_is_known(
    demo_hub, tmp_path, monkeypatch, known_before_loading
):
    """An executor known from the options prepares (Ray: its import) before the loading threads start, whose imports
    would slow it; one chosen by size prepares once the datasets have loaded, before it starts."""
    import threading

    from rqvae_ray.pipeline import executor as executor_module

    events: list[str] = []
    load = executor_module.load_dataset

    def recorded_load(*args, **kwargs):
        events.append("load")
        return load(*args, **kwargs)

    class Recorded(LocalExecutor):
        def prepare(self) -> None:
            assert threading.current_thread() is threading.main_thread()
            events.append("prepare")

        def start(self) -> None:
            events.append("start")
            super().start()

    def pick(sid_rows: int | None) -> LocalExecutor | None:
        return Recorded() if known_before_loading or sid_rows is not None else None

    monkeypatch.setattr(executor_module, "load_dataset", recorded_load)
    specs = parse_model_ids([DEFAULT_MODELS[0], DEFAULT_MODELS[5]])
    results = run_datasets(specs, RunOptions(hub=LocalHub(demo_hub), out_dir=str(tmp_path)), Progress(), pick)
    assert all(r.ok for r in results), [r.error for r in results]
    if known_before_loading:  # the main thread starts the executor while the datasets load
        assert events[0] == "prepare" and sorted(events[1:]) == ["load", "load", "start"], events
    else:
        assert events == ["load", "load", "prepare", "start"]


def test_a_dataset_that_finishes_loading_after_the_stop_starts_nothing_on_the_executor(demo_hub, tmp_path, monkeypatch):
    """Its thread is past the run's wait for its datasets: anything it started now (on Ray: a Ray Data execution, its
    actors) would run on while the process ends."""
    import threading

    from rqvae_ray.pipeline import executor as executor_module

    stopped, opened = threading.Event(), []
    load = executor_module.load_dataset

    def load_after_the_stop(*args, **kwargs):
        assert stopped.wait(60)
        return load(*args, **kwargs)

    class Interrupted(LocalExecutor):
        def wait(self, futures) -> None:
            raise KeyboardInterrupt

        def dataset(self, datasets: int):
            stream = super().dataset(datasets)
            stream.open = lambda output: opened.append(output.repo)
            return stream

    class Stops(Progress):
        def stopping(self) -> None:
            stopped.set()

    monkeypatch.setattr(executor_module, "load_dataset", load_after_the_stop)
    monkeypatch.setattr(executor_module, "CANCEL_WAIT_S", 60.0)  # the dataset is waited for: it ends by itself
    specs = parse_model_ids([DEFAULT_MODELS[0]])
    options = RunOptions(hub=LocalHub(demo_hub), out_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run_datasets(specs, options, Stops(lambda _: None), lambda _rows: Interrupted())
    assert opened == []
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


@pytest.mark.parametrize("lost", [False, True])
def test_a_lost_cluster_waits_less_for_its_datasets_than_an_interrupt(demo_hub, tmp_path, monkeypatch, lost):
    """After Ctrl-C the datasets get a few seconds to stop at their next block; after a lost cluster, whose calls never
    return, only a moment (for one working in this process)."""
    from concurrent.futures import wait as real_wait

    from rqvae_ray.errors import RayConnectionLost
    from rqvae_ray.pipeline import executor as executor_module

    error = RayConnectionLost("127.0.0.1:1") if lost else KeyboardInterrupt()

    class Failing(LocalExecutor):
        def wait(self, futures) -> None:
            real_wait(futures)  # the datasets are done: the wait after the error returns at once, whatever its limit
            raise error

    timeouts: list[float | None] = []

    def recorded_wait(futures, timeout=None, **kwargs):
        timeouts.append(timeout)
        return real_wait(futures, timeout=timeout, **kwargs)

    monkeypatch.setattr(executor_module, "wait", recorded_wait)
    specs = parse_model_ids([DEFAULT_MODELS[0]])
    options = RunOptions(hub=LocalHub(demo_hub), out_dir=str(tmp_path))
    with pytest.raises(type(error)):
        run_datasets(specs, options, Progress(lambda _: None), lambda _rows: Failing())
    assert timeouts[-1] == (executor_module.LOST_CLUSTER_WAIT_S if lost else executor_module.CANCEL_WAIT_S)
    assert executor_module.LOST_CLUSTER_WAIT_S < executor_module.CANCEL_WAIT_S

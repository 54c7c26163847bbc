"""What a run is asked to do (:class:`RunOptions`), built in one place for the command line and the Python API
(:func:`make_options`), and the checks made before any work starts."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from rqvae_ray.core.contract import Export, OutputFormat, OutputSpec
from rqvae_ray.core.encoder import EncoderFactory, make_encoder
from rqvae_ray.core.presets import Preset, resolve_presets
from rqvae_ray.errors import OutputError
from rqvae_ray.inputs.decoded_cache import DecodedCache
from rqvae_ray.inputs.stores import HfHub, LocalHub


class ExecutorMode(str, Enum):
    """Where a run's work runs: in this process, on Ray, or chosen by the job (``auto``)."""

    AUTO = "auto"
    LOCAL = "local"
    RAY = "ray"


class PoolMode(str, Enum):
    """How a dataset's models are spread over actor pools."""

    AUTO = "auto"
    DATASET = "dataset"
    MODEL = "model"


@dataclass(frozen=True)
class PoolSizing:
    """What the user asked for (None: decided by the plan)."""

    mode: PoolMode = PoolMode.AUTO
    min_actors: int | None = None
    max_actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None

    def __post_init__(self) -> None:
        if self.min_actors is not None and self.max_actors is not None and self.min_actors > self.max_actors:
            raise OutputError(f"--min-actors {self.min_actors} is larger than --max-actors {self.max_actors}")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Where inputs come from, where outputs go, what they hold, what executes the work and how Ray's actor pools
    are sized."""

    hub: LocalHub | HfHub
    out_dir: str | None = None  # None: upload only
    upload: bool = False
    base_folder: str = "LLM Dataset"
    output: OutputSpec = field(default_factory=OutputSpec)
    pools: PoolSizing = field(default_factory=PoolSizing)
    executor: ExecutorMode = ExecutorMode.AUTO
    batch_size: int = 4096
    actor_wait_s: float = 600.0
    address: str | None = None  # None: RAY_ADDRESS, else a private local Ray
    force: bool = False
    upload_retries: int = 5
    # The first wait before retrying a Hub call that failed transiently (doubled at each retry).
    retry_backoff_s: float = 1.0
    # Where decoded .pt inputs are kept between runs (None: decoded every run).
    input_cache: DecodedCache | None = None
    # Internal, not a command-line option: what builds the encoders (a benchmark swaps in a stand-in).
    encoder_factory: EncoderFactory = make_encoder


def make_options(
    *,
    hub_dir: str | Path | None = None,
    revision: str | None = None,
    dataset_revision: str | None = None,
    out_dir: str | Path | None = None,
    upload: bool | None = None,
    base_folder: str = "LLM Dataset",
    fmt: str | OutputFormat = OutputFormat.CSV,
    dedup: bool = False,
    fixed_length: bool = False,
    sid_tokens: bool = False,
    exports: str | Iterable[str] = (),
    for_: str | Iterable[str] = (),
    keep_existing: bool = False,
    max_per_sid: int | None = None,
    force: bool = False,
    executor: str | ExecutorMode = ExecutorMode.AUTO,
    pools: str | PoolMode = PoolMode.AUTO,
    actors_per_pool: int | None = None,
    min_actors: int | None = None,
    max_actors: int | None = None,
    cpus_per_actor: float | None = None,
    gpus_per_actor: float | None = None,
    batch_size: int = 4096,
    actor_wait_s: float = 600.0,
    address: str | None = None,
    upload_retries: int = 5,
    retry_backoff_s: float = 1.0,
    input_cache: str | Path | None = None,
) -> RunOptions:
    """The options of a run from the command line's or the API's keywords; contradictions raise
    :class:`~rqvae_ray.errors.OutputError` naming both options. ``upload`` None: upload when there is no
    ``out_dir``. ``for_`` names trainers' presets (``--for``), which turn on what their loaders need. ``input_cache``:
    the folder where decoded ``.pt`` inputs are kept between runs (None: none kept)."""
    if keep_existing and force:
        raise OutputError("--keep-existing keeps a published file and --force redoes it; give one of them")
    check_base_folder(base_folder)
    if actors_per_pool is not None:
        if min_actors is not None or max_actors is not None:
            raise OutputError("--actors-per-pool fixes the actors; give it or --min-actors/--max-actors, not both")
        min_actors = max_actors = actors_per_pool
    names = exports if isinstance(exports, str) else ",".join(exports)
    presets = Preset.parse(for_ if isinstance(for_, str) else ",".join(for_))
    fmt = OutputFormat(fmt)
    asked = frozenset(export.value for export in Export.parse(names))
    resolved = resolve_presets(
        presets, dedup=dedup, fixed_length=fixed_length, csv=fmt is OutputFormat.CSV, exports=asked
    )
    output = OutputSpec(
        fmt=fmt,
        dedup=resolved.dedup,
        sid_tokens=sid_tokens,
        fixed_length=resolved.fixed_length,
        exports=frozenset(Export(value) for value in resolved.exports),
        keep_existing=keep_existing,
        presets=presets,
        max_per_sid=max_per_sid,
    )
    return RunOptions(
        hub=HfHub(revision, dataset_revision, retry_backoff_s) if hub_dir is None else LocalHub(hub_dir),
        out_dir=None if out_dir is None else str(Path(out_dir).resolve()),
        upload=out_dir is None if upload is None else (upload or out_dir is None),
        base_folder=base_folder,
        output=output,
        pools=PoolSizing(PoolMode(pools), min_actors, max_actors, cpus_per_actor, gpus_per_actor),
        executor=ExecutorMode(executor),
        batch_size=batch_size,
        actor_wait_s=actor_wait_s,
        address=address,
        force=force,
        upload_retries=upload_retries,
        retry_backoff_s=retry_backoff_s,
        input_cache=None if input_cache is None else DecodedCache(Path(input_cache)),
    )


def check_base_folder(base_folder: str) -> None:
    """Refuse a ``--base-folder`` that is not a relative path of plain names (it is joined under ``--out-dir`` and
    used as a path in the dataset repo): raises :class:`~rqvae_ray.errors.OutputError` naming it."""
    reason = _base_folder_problem(base_folder)
    if reason:
        raise OutputError(
            f"--base-folder {base_folder!r}: {reason}; give a folder inside the dataset repo such as 'LLM Dataset' "
            "or 'a/b'"
        )


def _base_folder_problem(base_folder: str) -> str:
    """Why ``base_folder`` is not a relative path of plain names; "" when it is."""
    if not base_folder.strip():
        return "it is empty"
    if base_folder.startswith("/"):
        return "it is an absolute path"
    if "\\" in base_folder:
        return "it holds a backslash; separate folders with '/'"
    if any(ord(char) < 32 or ord(char) == 127 for char in base_folder):
        return "it holds a control character"
    for part in base_folder.split("/"):
        if not part:
            return "it has an empty folder name (a '//' or a '/' at the end)"
        if part in (".", ".."):
            return f"{part!r} is not a folder name (it would point elsewhere)"
        if part != part.strip():
            return f"the folder name {part!r} starts or ends with a space"
    return ""


def check_setup(options: RunOptions) -> None:
    """Fail before any work when the run could not publish: nothing to write, no token, a token the Hub refuses or
    that may not write, or an unwritable output (each dataset repo is checked when its dataset loads)."""
    if options.out_dir is None and not options.upload:
        raise OutputError("nothing would be written: give --out-dir, or upload to the Hub")
    if options.upload:
        from rqvae_ray.outputs.upload import check_token, require_token

        require_token()
        check_token(options.upload_retries, options.retry_backoff_s)
    if options.out_dir is not None:
        check_out_dir(options.out_dir)


def check_out_dir(out_dir: str) -> None:
    """Fail fast (before any inference) when the output directory cannot be written."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".rqvae_ray-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"output directory {out_dir} is not writable ({exc.strerror}); choose another --out-dir", path=out_dir
        ) from None

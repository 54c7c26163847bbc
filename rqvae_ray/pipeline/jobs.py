"""The work of one dataset, whatever executes it: load and check its inputs, decide per model (skip it as up to
date, upload its up-to-date file as it is, fail it, keep the rows of its published file, resume an interrupted run of
it, or encode it), and say what the writer needs to know of each model's file. Nothing here knows of Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from rqvae_ray import __version__
from rqvae_ray.core.checkpoint import ModelWeights, load_checkpoint_bytes
from rqvae_ray.core.contract import StageModel
from rqvae_ray.core.presets import too_many_codes
from rqvae_ray.core.sid_cap import room_problem
from rqvae_ray.errors import (
    Cancelled,
    CheckpointError,
    OutputError,
    OutputWriteError,
    RqvaeRayError,
    WriterDied,
    error_chain,
    reason_of,
)
from rqvae_ray.inputs.decoded_cache import DecodedCache
from rqvae_ray.inputs.feature_digest import rows_digests
from rqvae_ray.inputs.features import PoiFeatures, load_features
from rqvae_ray.inputs.model_ids import ModelSpec
from rqvae_ray.inputs.stores import HfHub
from rqvae_ray.outputs.existing_rows import ExistingRows
from rqvae_ray.outputs.keep_existing import PublishedFile, find_published, kept_entry
from rqvae_ray.outputs.layout import MANIFEST_FILE, codebooks_filename, output_dir, repo_folder
from rqvae_ray.outputs.manifest import Existing, Manifest, ManifestEntry, Provenance, check_existing
from rqvae_ray.outputs.resume import ResumeState, remove_resume_state, resume_key
from rqvae_ray.outputs.targets import DatasetOutput, ModelTarget
from rqvae_ray.pipeline.options import RunOptions
from rqvae_ray.pipeline.progress import Progress
from rqvae_ray.pipeline.results import ModelResult


@dataclass(frozen=True)
class Ready:
    """A model whose checkpoint loaded, fits its dataset and has no up-to-date output; ``existing`` are the rows of
    its published file that its new file keeps (``--keep-existing``)."""

    spec: ModelSpec
    weights: ModelWeights
    provenance: Provenance
    existing: ExistingRows | None = None
    resume_key: str = ""  # its file's resume state is kept under this key ("" when none is: upload only, kept rows)
    resumed: ResumeState | None = None  # the state of an interrupted run this one continues

    @property
    def revision(self) -> str:
        return self.provenance.checkpoint_revision


@dataclass(frozen=True)
class AsIs:
    """A model whose file in the output folder is up to date but not in the dataset repo the run uploads to: the file
    and its exports are uploaded as they are, without encoding."""

    model: Ready
    entry: ManifestEntry
    path: Path


@dataclass
class Loaded:
    """One dataset's inputs: the features, the models to run, the results already known (failed, skipped), the
    digest of the features of every row (see :mod:`rqvae_ray.inputs.feature_digest`), and the up-to-date files to
    upload as they are."""

    features: PoiFeatures
    ready: list[Ready]
    results: dict[str, ModelResult]
    folder: Path | None  # where its files go (None: upload only)
    rows_sha256: str = ""
    as_is: list[AsIs] = field(default_factory=list)

    @property
    def repo(self) -> str:
        return self.features.repo

    @property
    def sid_rows(self) -> int:
        """SID rows to encode: the POIs from :attr:`first_pid` on, for every model to run."""
        return (self.features.num_pois - self.first_pid + 1) * len(self.ready) if self.ready else 0

    @property
    def first_pid(self) -> int:
        """The first Pid any model needs encoded (N + 1 when every model keeps all its rows unverified)."""
        return min((_first_needed(r) for r in self.ready), default=1)


def _first_needed(ready: Ready) -> int:
    if ready.resumed is not None:
        return ready.resumed.rows + 1
    if ready.existing is not None and not ready.existing.verify:
        return ready.existing.rows + 1
    return 1


def load_weights(data: bytes, cache: DecodedCache | None) -> ModelWeights:
    """A checkpoint's frozen model, from ``cache`` when it holds it (and kept there otherwise)."""
    return load_checkpoint_bytes(data, source="checkpoint") if cache is None else cache.weights(data)


def load_dataset(repo: str, specs: list[ModelSpec], options: RunOptions, progress: Progress) -> Loaded:
    """Load and check the dataset and every checkpoint; decide which models have an up-to-date output already (and,
    when uploading, which of those the dataset repo lacks), and with ``--keep-existing`` which rows of each published
    file are kept. When uploading, the dataset repo must exist and be writable first."""
    org, dataset = repo.split("/", 1)
    if options.upload:
        from rqvae_ray.outputs.upload import check_writable

        check_writable(repo, options.upload_retries, options.retry_backoff_s)
    features = load_features(options.hub.dataset_files(org, dataset), options.input_cache)
    progress.note(f"{repo}: {features.num_pois} POIs x {features.dim} features (revision {features.revision})")
    folder = output_dir_of(options, repo)
    results: dict[str, ModelResult] = {}
    ready: list[Ready] = []
    kept: dict[str, tuple[PublishedFile, ManifestEntry]] = {}
    as_is: list[AsIs] = []
    in_repo: Manifest | None = None  # the dataset repo's manifest, read when first needed
    for spec in specs:
        try:
            data, revision = options.hub.checkpoint(spec)
            weights = load_weights(data, options.input_cache)
            if weights.input_dim != features.dim:
                raise CheckpointError(
                    spec.model_id,
                    f"the model takes {weights.input_dim} input features but {repo} has "
                    f"{features.dim}; pair the model with the dataset it was trained on",
                )
            refusal = _refusal(weights, options, features.num_pois)
            if refusal:
                raise OutputError(refusal)  # its result names the model
        except RqvaeRayError as exc:
            results[spec.model_id] = ModelResult(spec.model_id, spec.dataset_repo, ok=False, error=str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - a fault reading one model's checkpoint fails that model alone
            error = f"{spec.model_id}: its checkpoint could not be loaded ({reason_of(exc)})"
            results[spec.model_id] = ModelResult(spec.model_id, spec.dataset_repo, ok=False, error=error)
            continue
        provenance = Provenance(weights.sha256, revision, features.sha256, features.revision)
        candidate = Ready(spec, weights, provenance)
        existing = _existing(candidate, options, folder, repo)
        if existing.entry is not None:
            path = folder / existing.entry.file
            if options.upload:
                if in_repo is None:
                    in_repo = _repo_manifest(repo, options)
                missing = _not_in_repo(existing.entry, in_repo, repo)
                if missing:
                    progress.note(f"{spec.model_id}: up to date ({path}) but {missing}; uploading it as it is")
                    as_is.append(AsIs(candidate, existing.entry, path))
                    continue
            where = f" and in {repo}" if options.upload else ""
            progress.note(f"{spec.model_id}: up to date ({path}{where}); skipped, use --force to redo")
            results[spec.model_id] = ModelResult(
                spec.model_id,
                spec.dataset_repo,
                ok=True,
                skipped=True,
                rows=existing.entry.rows,
                path=str(path),
                sha256=existing.entry.sha256,
                quality=existing.entry.sid_stats,
                exports=existing.entry.exports,
            )
            continue
        filename = codebooks_filename(spec.name, options.output.fmt)
        if options.output.keep_existing:
            try:
                published = find_published(folder, options.hub, repo, options.base_folder, filename)
                if published is not None:
                    kept[spec.model_id] = (
                        published,
                        kept_entry(published, options.output, provenance, features.num_pois),
                    )
            except RqvaeRayError as exc:
                results[spec.model_id] = ModelResult(spec.model_id, spec.dataset_repo, ok=False, error=str(exc))
                continue
            if published is None:
                progress.note(f"{spec.model_id}: --keep-existing: no published {filename} yet; writing it whole")
        elif existing.stale:
            progress.note(f"{spec.model_id}: replacing {filename}: {existing.stale}")
        progress.note(f"{spec.model_id}: {weights.layout} checkpoint {weights.describe()} (revision {revision})")
        note = weights.sinkhorn_note()
        if note:
            progress.note(f"{spec.model_id}: note: {note}")
        ready.append(candidate)
    if not ready:
        return Loaded(features, ready, results, folder, as_is=as_is)
    digests = rows_digests(features, {features.num_pois, *(entry.rows for _, entry in kept.values())})
    keeping = []
    for r in ready:
        try:
            keeping.append(_keeping(r, kept.get(r.spec.model_id), digests, features.num_pois, options, progress))
        except RqvaeRayError as exc:
            results[r.spec.model_id] = ModelResult(r.spec.model_id, r.spec.dataset_repo, ok=False, error=str(exc))
    ready = keeping
    if not ready:
        return Loaded(features, ready, results, folder, as_is=as_is)
    # A capped file is decided once every SID is counted, from every row's latent: an interrupted run starts afresh.
    if folder is not None and not options.output.keep_existing and options.output.max_per_sid is None:
        ready = _resuming(ready, folder, options, features.num_pois, progress)
    return Loaded(features, ready, results, folder, digests[features.num_pois], as_is)


def _refusal(weights: ModelWeights, options: RunOptions, num_pois: int) -> str:
    """Why the run's options cannot give a file of ``weights`` for ``num_pois`` POIs, found before any work: SIDs
    longer than a ``--for`` trainer takes, or too few SIDs for ``--max-per-sid``; "" when they can."""
    output = options.output
    sizes = weights.codebook_sizes
    too_long = too_many_codes(output.presets, len(sizes), output.dedup)
    if too_long or output.max_per_sid is None:
        return too_long
    return room_problem(sizes, output.max_per_sid, num_pois)


def _resuming(ready: list[Ready], folder: Path, options: RunOptions, num_pois: int, progress: Progress) -> list[Ready]:
    """Every model with the resume key of its file, continuing an interrupted run of the same inputs and options
    when every model of the dataset has one (from the fewest rows any has); other resume states are dropped."""
    keyed, states = [], []
    for r in ready:
        final = folder / codebooks_filename(r.spec.name, options.output.fmt)
        key = resume_key(r.spec.model_id, final.name, r.provenance, options.output, num_pois)
        state = ResumeState.read(final)
        if state is not None and state.owner_alive:  # another run is writing this file: not a state to resume
            states.append(None)
        elif state is not None and state.key == key and not options.force:
            states.append(state)
        else:
            remove_resume_state(final)
            states.append(None)
        keyed.append(dataclasses.replace(r, resume_key=key))
    if not all(state is not None and state.rows > 0 for state in states):
        return keyed
    rows = min(state.rows for state in states)
    progress.note(f"{ready[0].spec.dataset_repo}: resuming an interrupted run: {rows} POIs kept, from Pid {rows + 1}")
    return [
        dataclasses.replace(r, resumed=dataclasses.replace(s, rows=rows)) for r, s in zip(keyed, states, strict=True)
    ]


def _keeping(
    ready: Ready,
    kept: tuple[PublishedFile, ManifestEntry] | None,
    digests: dict[int, str],
    num_pois: int,
    options: RunOptions,
    progress: Progress,
) -> Ready:
    """``ready`` starting its file from the rows of its published file, verified when their features changed (not
    with ``--max-per-sid``: a POI it moved holds another SID than its nearest, so it cannot be checked)."""
    if kept is None:
        return ready
    published, entry = kept
    model, name = ready.spec.model_id, published.path.name
    verify = entry.features_rows_sha256 != digests[entry.rows]
    if verify and options.output.max_per_sid is not None:
        raise OutputError(
            f"cannot keep the rows of {published.path}: the features of its POIs changed or were not recorded, and "
            "--max-per-sid moved some of them, so their SIDs cannot be checked; use --force to redo it",
            path=str(published.path),
        )
    if verify:
        why = "were not recorded" if not entry.features_rows_sha256 else "changed since it was written"
        progress.note(
            f"{model}: the features of the {entry.rows} POIs in {name} {why}; encoding them again to check that "
            "each keeps its SID"
        )
    else:
        todo = f"encoding Pids {entry.rows + 1}..{num_pois}" if entry.rows < num_pois else "no new POI to encode"
        progress.note(f"{model}: keeping the {entry.rows} POIs of {name}; {todo}")
    return dataclasses.replace(ready, existing=ExistingRows(str(published.path), entry.rows, entry.sha256, verify))


def output_dir_of(options: RunOptions, repo: str) -> Path | None:
    """The local output folder of ``repo``'s files, or None when the run only uploads."""
    return None if options.out_dir is None else output_dir(Path(options.out_dir), repo, options.base_folder)


def _repo_manifest(repo: str, options: RunOptions) -> Manifest:
    """The manifest of dataset repo ``repo``, where the run uploads, at the dataset revision (empty when it has
    none)."""
    from rqvae_ray.outputs.upload import read_repo_file

    revision = options.hub.revisions["dataset"] if isinstance(options.hub, HfHub) else None
    folder = repo_folder(options.base_folder)
    data = read_repo_file(repo, f"{folder}/{MANIFEST_FILE}", revision, options.upload_retries, options.retry_backoff_s)
    return Manifest.parse(Path(folder), repo, data)


def _not_in_repo(entry: ManifestEntry, in_repo: Manifest, repo: str) -> str:
    """Why the dataset repo (its manifest ``in_repo``) lacks ``entry``'s file or exports as the output folder holds
    them; "" when it has them."""
    theirs = in_repo.entries.get(entry.file)
    if theirs is None:
        return f"{repo} does not have it"
    exports = {(record.file, record.sha256) for record in entry.exports}
    if theirs.sha256 != entry.sha256 or {(record.file, record.sha256) for record in theirs.exports} != exports:
        return f"{repo} holds another version of it"
    return ""


def _existing(ready: Ready, options: RunOptions, folder: Path | None, repo: str) -> Existing:
    if folder is None or options.force:
        return Existing()
    filename = codebooks_filename(ready.spec.name, options.output.fmt)
    return check_existing(folder, filename, options.output, ready.provenance, repo)


def commit_message(features: PoiFeatures, ready: list[Ready]) -> str:
    """The message of a dataset's upload commit: the tool, the features and every model, with revisions."""
    lines = [f"- {r.spec.model_id} @ {r.revision}" for r in ready]
    return (
        f"rqvae_ray {__version__}: semantic IDs of {len(ready)} model(s) for {features.repo}\n\n"
        f"Features: {features.repo} @ {features.revision}\nModels:\n" + "\n".join(lines)
    )


def interrupted(error: BaseException) -> bool:
    """Whether a dataset failed from an interruption or a fault (its resume state is worth keeping), rather than for
    a reason of its inputs or options (ours, found by class along Ray's wrapping) that a rerun would meet again."""
    resumable = (Cancelled, OutputWriteError, WriterDied)
    return not any(isinstance(e, RqvaeRayError) and not isinstance(e, resumable) for e in error_chain(error))


def dataset_output(loaded: Loaded, options: RunOptions) -> DatasetOutput:
    """What the writer needs to know of ``loaded``'s files (the ``i``-th model to run in slot ``i``)."""
    spec = options.output
    targets = tuple(
        ModelTarget(
            model_id=r.spec.model_id,
            slot=slot,
            filename=codebooks_filename(r.spec.name, spec.fmt),
            codebook_sizes=r.weights.codebook_sizes,
            provenance=r.provenance,
            sinkhorn_levels=r.weights.sinkhorn_levels,
            features_rows_sha256=loaded.rows_sha256,
            existing=r.existing,
            codebooks=r.weights.codebooks,
            resume_key=r.resume_key,
            resume_rows=r.resumed.rows if r.resumed is not None else 0,
            resume_seconds=r.resumed.encode_seconds if r.resumed is not None else 0.0,
        )
        for slot, r in enumerate(loaded.ready)
    )
    return DatasetOutput(
        repo=loaded.repo,
        targets=targets,
        folder=loaded.folder,
        base_folder=options.base_folder,
        spec=spec,
        num_pois=loaded.features.num_pois,
        first_pid=loaded.first_pid,
    )


def stage_models(loaded: Loaded, indices: tuple[int, ...] | None = None) -> list[StageModel]:
    """The models an encode stage holds: those of ``indices`` (default: every model to run), in their slots."""
    chosen = range(len(loaded.ready)) if indices is None else indices
    return [StageModel(loaded.ready[i].spec.model_id, i, loaded.ready[i].weights) for i in chosen]

"""``--keep-existing`` on the driver: find a model's published codebooks file and check that its rows can be kept.

The file comes from the output folder, or (when only uploading) from the dataset repo at ``--dataset-revision``
with the manifest beside it. Its rows are kept only when the manifest describes it, its bytes are the ones recorded,
it was made with the same checkpoint and options, and the dataset still holds its POIs (Pids 1..M, M <= N).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rqvae_ray.core.contract import OutputSpec
from rqvae_ray.errors import ManifestError, OutputError
from rqvae_ray.inputs.stores import HfHub, LocalHub
from rqvae_ray.outputs.layout import MANIFEST_FILE, repo_folder
from rqvae_ray.outputs.manifest import Manifest, ManifestEntry, Provenance, damage


@dataclass(frozen=True)
class PublishedFile:
    """A model's published codebooks file and its manifest entry (None when the manifest does not describe it)."""

    path: Path
    entry: ManifestEntry | None


def find_published(
    folder: Path | None, hub: LocalHub | HfHub, repo: str, base_folder: str, filename: str
) -> PublishedFile | None:
    """The published ``filename`` of dataset ``repo``: in the local output ``folder``, or, when ``folder`` is None,
    downloaded from the dataset repo (at the hub's dataset revision); None when there is none."""
    if folder is not None:
        path = folder / filename
        if not path.is_file():
            return None
        return PublishedFile(path, Manifest.read(folder, repo).entries.get(filename))
    store = hub if isinstance(hub, HfHub) else HfHub()
    found = store.published_output(repo, repo_folder(base_folder), filename, MANIFEST_FILE)
    if found is None:
        return None
    path, manifest = found
    entry = None if manifest is None else _repo_manifest(manifest, repo, base_folder).entries.get(filename)
    return PublishedFile(path, entry)


def _repo_manifest(path: Path, repo: str, base_folder: str) -> Manifest:
    """The dataset repo's manifest, downloaded to ``path``; named by its place in the repo when it cannot be read."""
    where = f"{repo_folder(base_folder)}/{MANIFEST_FILE} of dataset repo {repo}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(where, f"the downloaded file cannot be read ({exc.strerror})") from None
    return Manifest.parse(path.parent, repo, data, where=where)


def kept_entry(published: PublishedFile, spec: OutputSpec, provenance: Provenance, num_pois: int) -> ManifestEntry:
    """The manifest entry of a file whose rows this run may keep; raises :class:`OutputError` saying why not."""
    path, entry = published.path, published.entry

    def refuse(why: str, advice: str = "use --force to redo it from scratch") -> OutputError:
        return OutputError(f"cannot keep the rows of {path}: {why}; {advice}", path=str(path))

    if entry is None:
        raise refuse("the manifest beside it does not describe it")
    if entry.checkpoint_sha256 != provenance.checkpoint_sha256:
        raise refuse(
            f"it was made with another checkpoint (sha256 {entry.checkpoint_sha256[:12]}, now "
            f"{provenance.checkpoint_sha256[:12]})",
            "use the checkpoint it was made with, or --force to redo it with this one",
        )
    options = [had for had, _now in entry.changed_options(spec)]
    if options:
        raise refuse(f"it was written with {', '.join(options)}", "run with its options, or --force")
    damaged = damage(path, entry)
    if damaged:
        raise refuse(damaged)
    if entry.rows > num_pois:
        raise refuse(
            f"it holds {entry.rows} POIs but the dataset has only {num_pois}",
            "keep the dataset's existing Pids and add new POIs after them, or use --force",
        )
    return entry

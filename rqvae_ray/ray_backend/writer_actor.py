"""A writer actor on Ray: the :class:`~rqvae_ray.outputs.writer.DatasetWriter` of some models of one or more datasets
(see :func:`rqvae_ray.ray_backend.plan.plan_writers`), each under the key its dataset's stream gave it; on the
driver's node when the files go to ``--out-dir``, anywhere in the cluster for an upload-only run.

It runs one call at a time, so its calls run in the order the driver made them (Ray runs a sequential actor's calls
in submission order): the driver does not wait for ``open``, and the blocks need no numbering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from rqvae_ray.errors import OutputError
from rqvae_ray.outputs.targets import DatasetOutput, Published, Refused
from rqvae_ray.outputs.writer import DatasetWriter

if TYPE_CHECKING:
    from rqvae_ray.outputs.upload import Preuploaded


@dataclass(frozen=True)
class WriterKey:
    """Which files of which dataset: part ``part`` of the models of dataset repo ``repo``."""

    repo: str
    part: int


class WriterActor:
    def __init__(self) -> None:
        self._writers: dict[WriterKey, DatasetWriter] = {}
        self._failed: dict[WriterKey, BaseException] = {}

    def token_here(self) -> bool:
        """Whether a Hugging Face token is configured on this actor's node (it is never sent through Ray)."""
        from huggingface_hub import get_token

        return get_token() is not None

    def open(self, key: WriterKey, output: DatasetOutput) -> None:
        self._failed.pop(key, None)
        try:
            self._writers[key] = DatasetWriter(output)
        except BaseException as exc:
            self._failed[key] = exc
            raise

    def _writer(self, key: WriterKey) -> DatasetWriter:
        if key in self._failed:
            raise self._failed[key]
        if key not in self._writers:
            raise OutputError(f"{key.repo}: the output files were never opened")
        return self._writers[key]

    def where(self, key: WriterKey) -> tuple[str, str]:
        """This actor's node, and the folder of ``key``'s files."""
        import ray

        return ray.get_runtime_context().get_node_id(), str(self._writer(key).folder)

    def write(self, key: WriterKey, block: pa.Table, span: tuple[int, int] | None) -> int:
        """Write one block (or its rows ``span``); returns the rows written so far."""
        return self._writer(key).write(block, span)

    def finish(self, key: WriterKey) -> list[Published | Refused]:
        return self._writer(key).finish()

    def preupload(self, key: WriterKey, retries: int, backoff_s: float) -> Preuploaded:
        return self._writer(key).preupload(retries, backoff_s)

    def release(self, key: WriterKey) -> None:
        self._writers.pop(key).release()

    def abort(self, key: WriterKey, keep_resume: bool = False) -> None:
        writer = self._writers.pop(key, None)
        if writer is not None:
            writer.abort(keep_resume)

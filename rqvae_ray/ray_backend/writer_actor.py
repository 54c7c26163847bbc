"""The run's writer actor on Ray: one :class:`~rqvae_ray.outputs.writer.DatasetWriter` per dataset, on the driver's
node (where ``--out-dir`` is and where the Hugging Face token is configured).

It runs one call at a time, so the calls of each dataset run in the order the driver made them (Ray runs a
sequential actor's calls in submission order): the driver does not wait for ``open``, and a dataset's blocks need no
numbering.
"""

from __future__ import annotations

import pyarrow as pa

from rqvae_ray.errors import OutputError
from rqvae_ray.outputs.targets import DatasetOutput, Published, Refused
from rqvae_ray.outputs.writer import DatasetWriter


class WriterActor:
    def __init__(self) -> None:
        self._writers: dict[str, DatasetWriter] = {}
        self._failed: dict[str, BaseException] = {}

    def open(self, output: DatasetOutput) -> None:
        self._failed.pop(output.repo, None)
        try:
            self._writers[output.repo] = DatasetWriter(output)
        except BaseException as exc:
            self._failed[output.repo] = exc
            raise

    def _writer(self, repo: str) -> DatasetWriter:
        if repo in self._failed:
            raise self._failed[repo]
        if repo not in self._writers:
            raise OutputError(f"{repo}: the output files were never opened")
        return self._writers[repo]

    def write(self, repo: str, block: pa.Table, span: tuple[int, int] | None) -> int:
        """Write one block (or its rows ``span``); returns the rows written so far."""
        return self._writer(repo).write(block, span)

    def finish(self, repo: str) -> list[Published | Refused]:
        return self._writer(repo).finish()

    def upload(self, repo: str, message: str, retries: int, backoff_s: float) -> str:
        return self._writer(repo).upload(message, retries, backoff_s)

    def abort(self, repo: str, keep_resume: bool = False) -> None:
        writer = self._writers.pop(repo, None)
        if writer is not None:
            writer.abort(keep_resume)

"""Where a Ray run's rows are written: by writer actors (see :mod:`rqvae_ray.ray_backend.writer_actor`), which the
blocks reach as object references, or, on a private local Ray whose dataset needs one writer, in this process,
which would otherwise start one more process for it and make a call per block (W1 on Ray: 0.8 CPU-seconds less,
0.4 s sooner on 2 cores).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from rqvae_ray.errors import RqvaeRayError, WriterDied, reason_of
from rqvae_ray.outputs.targets import DatasetOutput, Published, Refused
from rqvae_ray.outputs.writer import DatasetWriter, commit_dataset, repo_files
from rqvae_ray.ray_backend.cluster import ClusterShape
from rqvae_ray.ray_backend.plan import CPUS_PER_WRITER, WriterPlan
from rqvae_ray.ray_backend.writer_actor import WriterActor, WriterKey

# A block reference and the rows of it to write (None: all), as Ray Data hands them out.
BlockRef = tuple[object, tuple[int, int] | None]


class Writers:
    """The run's writer actors. Those on the driver's node (where ``--out-dir`` is) are shared by the datasets: one per
    :data:`~rqvae_ray.ray_backend.plan.CPUS_PER_WRITER` CPUs of the node, started as the datasets ask for them and
    handed out in turn beyond that. An upload-only run on a cluster starts its own on the nodes in turn, except
    that one whose node has no Hugging Face token is replaced by one on the driver's node, whose files the driver
    commits (the token is read where it is configured, never sent through Ray)."""

    def __init__(self, cluster: ClusterShape) -> None:
        self.cap = max(1, math.floor(cluster.driver_cpus / CPUS_PER_WRITER))
        self.here: list = []
        self.turn = 0
        self.spread: list = []
        self.spread_turn = 0
        self.lock = threading.Lock()

    def get(self, count: int, anywhere: bool) -> list:
        """``count`` writer actors for one dataset (the same actor may serve several datasets)."""
        import ray

        if not anywhere:
            with self.lock:
                return [self._next_here() for _ in range(count)]
        here = ray.get_runtime_context().get_node_id()
        # The other nodes first, then the driver's (whose disk the datasets written into --out-dir share).
        alive = sorted((node["NodeID"] for node in ray.nodes() if node.get("Alive")), key=lambda node: node == here)
        with self.lock:
            nodes = [self._next_node(alive or [here]) for _ in range(count)]
        # Pinned, not soft: a soft affinity let Ray place two writers on one node of a simulated cluster (as SPREAD
        # had); a node gone since the listing fails its writer's first call, and a driver-node writer takes over.
        writers = [_start_writer(node) for node in nodes]
        answers = [writer.token_here.remote() for writer in writers]
        with self.lock:
            for index, answer in enumerate(answers):
                if _token_there(answer):
                    self.spread.append(writers[index])
                else:
                    ray.kill(writers[index])
                    writers[index] = self._next_here()
        return writers

    def _next_node(self, nodes: list[str]) -> str:
        """The next of ``nodes`` in turn, for a writer that may run anywhere."""
        node = nodes[self.spread_turn % len(nodes)]
        self.spread_turn += 1
        return node

    def _next_here(self):
        if self.turn == len(self.here) and len(self.here) < self.cap:
            self.here.append(_start_writer())
        writer = self.here[self.turn % len(self.here)]
        self.turn += 1
        return writer

    def close(self) -> None:
        import ray

        for writer in [*self.here, *self.spread]:
            ray.kill(writer)
        self.here, self.spread = [], []


def _token_there(answer) -> bool:
    """Whether a writer placed on another node answered that a Hugging Face token is configured there (False when it
    could not start: its node went away)."""
    import ray

    try:
        return bool(ray.get(answer))
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError):
        return False


def _start_writer(node: str | None = None):
    """A writer actor pinned to ``node`` (default: the driver's); no GPU and no CPU reserved: writers must never keep
    encoder actors from starting."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy = NodeAffinitySchedulingStrategy(node or ray.get_runtime_context().get_node_id(), soft=False)
    options = {"num_cpus": 0, "num_gpus": 0, "max_concurrency": 1, "scheduling_strategy": strategy}
    return ray.remote(WriterActor).options(**options).remote()


class DriverWriting:
    """One dataset's files written in this process: each block is fetched from the object store and written."""

    def __init__(self, output: DatasetOutput) -> None:
        self.writer = DatasetWriter(output)

    def describe(self) -> str:
        return "written in this process (a private Ray's one writer)"

    def write(self, blocks: Iterable[BlockRef]) -> Iterator[int]:
        """Write the blocks in order; yields the rows written so far, block by block."""
        import ray

        for ref, span in blocks:
            yield self.writer.write(ray.get(ref), span)

    def finish(self) -> list[Published | Refused]:
        return self.writer.finish()

    def upload(self, message: str, retries: int, backoff_s: float) -> str:
        return self.writer.upload(message, retries, backoff_s)

    def abort(self, keep_resume: bool) -> None:
        self.writer.abort(keep_resume)


class ActorWriting:
    """One dataset's files written by writer actors, each the files of some of its models (``plan``); the blocks go
    to each of them as references, at most ``max_pending`` unwritten at a time. When uploading, the driver makes the
    dataset's one commit, with the files of writers on other nodes pre-uploaded there."""

    def __init__(self, pool: Writers, plan: WriterPlan, output: DatasetOutput, max_pending: int) -> None:
        self.plan = plan
        self.output = output
        self.max_pending = max_pending
        actors = pool.get(len(plan.parts), plan.anywhere)
        self.writers = [(actor, WriterKey(output.repo, number)) for number, actor in enumerate(actors)]
        self.published: list[list] = []  # each part's published manifest entries
        for (actor, key), part in zip(self.writers, plan.parts, strict=True):
            # Not waited for: the writes queue behind it, and an error here fails them.
            actor.open.remote(key, dataclasses.replace(output, targets=tuple(output.targets[i] for i in part)))

    def describe(self) -> str:
        return self.plan.describe()

    def _call(self, method: str, *args) -> list:
        """Call ``method`` of every part's writer, side by side: the object references."""
        return [getattr(actor, method).remote(key, *args) for actor, key in self.writers]

    def write(self, blocks: Iterable[BlockRef]) -> Iterator[int]:
        """Hand the blocks to every writer in order; yields the rows written so far as the writers answer."""
        pending: deque = deque()
        for ref, span in blocks:
            pending.append(self._call("write", ref, span))
            while pending and (len(pending) > self.max_pending or _all_ready(pending[0])):
                yield min(self._get(pending.popleft()))
        while pending:
            yield min(self._get(pending.popleft()))

    def finish(self) -> list[Published | Refused]:
        """Every writer's results: when some writers fail while others publish, the failed ones' models are refused
        with the reason; a failure of every writer is the dataset's."""
        results: list[Published | Refused] = []
        failures: list[RqvaeRayError] = []
        self.published = []
        for ref, part in zip(self._call("finish"), self.plan.parts, strict=True):
            try:
                outcome = self._get(ref)
            except RqvaeRayError as exc:
                failures.append(exc)
                outcome = [Refused(self.output.targets[i].model_id, reason_of(exc)) for i in part]
            self.published.append([result.entry for result in outcome if isinstance(result, Published)])
            results.extend(outcome)
        if failures and len(failures) == len(self.writers):
            raise failures[0]
        return results

    def upload(self, message: str, retries: int, backoff_s: float) -> str:
        """One commit of every writer's files: the driver reads those written on its node and the other writers
        pre-upload theirs."""
        import ray

        here = ray.get_runtime_context().get_node_id()
        files, elsewhere = [], []
        for (actor, key), entries, (node, folder) in zip(
            self.writers, self.published, self._get(self._call("where")), strict=True
        ):
            if node == here:
                files.extend(repo_files(Path(folder), self.output.base_folder, entries))
            elif entries:
                elsewhere.append(actor.preupload.remote(key, retries, backoff_s))
        preuploaded = self._get(elsewhere)
        entries = [entry for part in self.published for entry in part]
        base = self.output.base_folder
        oid = commit_dataset(self.output.repo, base, entries, message, retries, backoff_s, files, preuploaded)
        self._get(self._call("release"))
        return oid

    def _get(self, refs):
        """The result of calls to the writers; a writer's death is :class:`WriterDied` (resumable), not Ray's own
        error."""
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as exc:
            raise WriterDied(self.output.repo, _death_cause(exc)) from exc

    def abort(self, keep_resume: bool) -> None:
        import ray

        for ref in self._call("abort", keep_resume):
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                pass


def _all_ready(refs: list) -> bool:
    import ray

    return len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs)


def _death_cause(error) -> str:
    """Why an actor died, in a few words, from the class and attributes of Ray's error."""
    import ray

    if isinstance(error, ray.exceptions.ActorUnavailableError):
        return "it stopped answering"
    if error.preempted:
        return "its node was preempted"
    if error.actor_init_failed:
        return "it failed to start"
    return "it was killed or crashed"

"""The Ray cluster: starting or joining it, Ray Data's settings, what the cluster offers, checking that a plan's
actors fit, and watching that the cluster is still there while a run waits on it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, wait
from dataclasses import dataclass

from rqvae_ray.core.processes import process_ids, stat_field
from rqvae_ray.errors import PoolStartTimeout, RayConnectionLost, RayStartError, reason_of

BLOCK_BYTES = 4 << 20
# CSV blocks carry the rows' text (~3.5 KB per POI with 5 models), so they are about one batch's output instead: Ray
# Data lets a task hold only 2 output blocks the driver has not taken yet, and with 4 MiB blocks of text the encoder
# actors stalled on that (the ceiling benchmark at 1 M POIs x 5 models: 94k -> 143k SID rows/s streamed).
CSV_BLOCK_BYTES = 16 << 20
# Checks in a row that a joined cluster's GCS may fail before the run counts the cluster as lost.
CLUSTER_GCS_MISSES = 3
# How long a private local Ray's processes have to end by themselves after ray.shutdown() before they are killed.
RAY_EXIT_GRACE_S = 1.0


def start_ray(address: str | None) -> ClusterShape:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a private local Ray on loopback; returns what
    the cluster offers."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        # A private single-machine Ray has no reason to listen beyond loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    private = False
    # Ray's core worker replaces this process's SIGTERM handler with one that aborts it (no summary, partial files
    # left); the run's own handler (the command line's) is put back.
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if ray.is_initialized():
        pass
    elif address:
        # Ray retries a GCS that does not answer for minutes, silently (over 10 minutes for a port where nothing
        # listens); an address of the form host:port is tried once first.
        if _host_and_port(address) and (refused := _connect_error(address)):
            raise RayStartError(address, refused)
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as exc:
            raise RayStartError(address, reason_of(exc)) from exc
    else:
        try:
            ray.init(
                address="local",
                include_dashboard=False,
                log_to_driver=False,
                object_store_memory=local_object_store_bytes(),
                # Ray starts a worker per CPU for the first driver; the run's actors and tasks start their own
                # anyway, and the idle ones' start-up (~1.5 s of CPU each) competed with the run's (W1 on Ray: 0.8 s
                # slower).
                _system_config={"prestart_worker_first_driver": False},
            )
        except Exception as exc:
            raise RayStartError(None, reason_of(exc)) from exc
        private = True
    if sigterm is not None:
        signal.signal(signal.SIGTERM, sigterm)
    import ray.data  # noqa: F401 - imported here, while datasets load in other threads, not on the critical path

    return ClusterShape.current(private)


def local_object_store_bytes() -> int:
    """Object store size of a private local Ray: 256 MiB per CPU, at least 1 GiB, at most Ray's default (30 % of RAM).

    The blocks in flight need far less than Ray's default, and every page of the store that is touched once stays
    resident until Ray stops: with the default, the peak memory of a run grew with the number of POIs.
    """
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(0.3 * ram, max(1 << 30, (256 << 20) * (os.cpu_count() or 1))))


def configure_data_context(block_bytes: int = BLOCK_BYTES) -> None:
    """Ray Data settings of every run: rows in order, no skipped blocks, pools that start together, blocks of at
    most ``block_bytes``."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    # Blocks of about one batch's output: the writer gets rows as soon as a batch is encoded, rather than once Ray
    # Data has gathered 128 MiB of them, and no process holds more than a few blocks of rows.
    ctx.target_max_block_size = block_bytes
    # Ray Data's own blocks take at most a quarter of the object store (its default is half): with the blocks handed
    # to the writer on top, half made a private Ray on 2 CPUs (a 1 GiB store) spill CSV blocks to disk more often.
    ctx.override_object_store_memory_limit_fraction = 0.25
    # Ray Data restarts a dead encoder actor and retries its tasks (max_restarts=-1, max_task_retries=-1 are its
    # defaults for actor pools); a block that still fails must fail the dataset rather than be skipped.
    ctx.max_errored_blocks = 0
    # A UDF's own error (say, NaN in a feature row) reaches the driver as itself, with its one-line reason, rather
    # than wrapped in Ray Data's UserCodeException, whose cause does not survive the trip between processes.
    ctx.raise_original_map_exception = True
    # Every pool's actors start at once (see reserve_actors); waiting here would start the pools one after another.
    ctx.wait_for_min_actors_s = -1
    # The driver reports progress itself; Ray Data's per-operator bars and log lines would drown it.
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


@dataclass(frozen=True)
class ClusterShape:
    """What the cluster offers in all: CPUs and GPUs, and the CPUs of the driver's node; ``private`` when it is a
    local Ray this run started (whose resources never change and hold nothing else)."""

    cpus: float
    gpus: float
    private: bool = False
    driver_cpus: float = 1.0

    @classmethod
    def current(cls, private: bool = False) -> ClusterShape:
        import ray

        resources = ray.cluster_resources()
        here = ray.get_runtime_context().get_node_id()
        node = next((node for node in ray.nodes() if node.get("NodeID") == here), {})
        driver_cpus = float(node.get("Resources", {}).get("CPU", 1.0))
        return cls(float(resources.get("CPU", 1.0)), float(resources.get("GPU", 0.0)), private, driver_cpus)

    def now(self) -> ClusterShape:
        """The shape at this moment: a private Ray's never changes; a joined cluster's is read again (an autoscaling
        cluster grows while a run goes on)."""
        return self if self.private else ClusterShape.current()


def reserve_actors(num_cpus: float, num_gpus: float, actors: int, wait_s: float, cluster: ClusterShape) -> None:
    """Return once the cluster can hold ``actors`` encoder actors of this size at the same time.

    On a private local Ray the answer is known at once from its resources; elsewhere a placement group probes.

    Ray Data starts its actor pools asynchronously (``wait_for_min_actors_s = -1``), so that all pools' actors start
    together rather than one pool after another (a GPU actor spends seconds starting torch and CUDA); this check keeps
    a clear, bounded failure for pools that can never start. The placement group only probes: it is removed at once,
    before the actors ask for the same resources (on an autoscaling cluster, the nodes it brought up stay).
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {name: amount for name, amount in (("CPU", num_cpus), ("GPU", num_gpus)) if amount}
    if not bundle or actors < 1:
        return
    if cluster.private:
        if num_cpus * actors > cluster.cpus or num_gpus * actors > cluster.gpus:
            raise PoolStartTimeout(_pool_start_failure(num_cpus, num_gpus, wait_s))
        return
    group = placement_group([bundle] * actors)
    try:
        ready = group.wait(timeout_seconds=wait_s)
    finally:
        remove_placement_group(group)
    if not ready:
        raise PoolStartTimeout(_pool_start_failure(num_cpus, num_gpus, wait_s))


def _pool_start_failure(num_cpus: float, num_gpus: float, wait_s: float) -> str:
    """Why no encoder actor started within --actor-wait-s: what each asked for, what the nodes offer, what to change."""
    import ray

    asked = {"CPU": num_cpus, "GPU": num_gpus}
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    wanted = " + ".join(f"{amount:g} {name}" for name, amount in asked.items() if amount)
    if any(all(node.get(name, 0.0) >= amount for name, amount in asked.items()) for node in nodes):
        why = "the nodes that could hold one are busy (other pools, jobs or actors hold their resources)"
    else:
        offers = [(node.get("CPU", 0.0), node.get("GPU", 0.0)) for node in nodes]
        cpus, gpus = max(offers, key=lambda offer: offer[::-1], default=(0.0, 0.0))
        why = f"no node has that much (the largest offers {cpus:g} CPU + {gpus:g} GPU)"
    return (
        f"no encoder actor started within --actor-wait-s {wait_s:g}: each asks for {wanted} and {why}; "
        "lower --gpus-per-actor, --cpus-per-actor or the actors per pool, add nodes, or raise --actor-wait-s if "
        "nodes are still starting"
    )


def begin_stopping_ray() -> threading.Event:
    """Start shutting Ray down in the background (a private local Ray's processes end with it); the event is set when
    done. The caller waits on it with a bound of its own: a shutdown that hangs must not keep the process alive."""
    done = threading.Event()
    threading.Thread(target=lambda: (_shutdown_ray(), done.set()), daemon=True).start()
    return done


def _shutdown_ray() -> None:
    """``ray.shutdown()``, then make sure the processes of a private local Ray have ended.

    ``ray.shutdown()`` stops the GCS and the raylet but leaves their workers to notice on their own: dozens of actors
    on few CPUs took 5-10 s to, outliving the run. Those still there after a short grace are killed. When the GCS no
    longer answers (the cluster was lost), ``ray.shutdown()`` would wait on it until this process gives up on the
    shutdown (8 s of a lost private Ray's exit); it is skipped and the private Ray's processes are killed.
    """
    import ray

    from rqvae_ray.ray_backend import compat

    ours = _local_ray_processes()  # before the shutdown: its workers are then reparented away from the raylet
    if _gcs_answers():
        # Ray stops its processes one after another, the autoscaler's monitor after the GCS, and the monitor's SIGTERM
        # handler then waits on the GCS until Ray kills it a second later (1.0 of the 1.4 s of a private Ray's
        # shutdown). A private single-machine Ray's monitor has nothing to clean up: it is killed first.
        _kill(compat.local_monitor_pids())
        ray.shutdown()
        if _wait_gone(ours, RAY_EXIT_GRACE_S):
            return
    _kill(_alive(ours))
    _wait_gone(ours, RAY_EXIT_GRACE_S)


# Waits until the process that started it has ended (its one end of the pipe on standard input closes), then kills
# the processes named in its arguments. Within milliseconds of that end, none of their pids has been reused.
_REAPER = 'read -r _; kill -9 "$@" 2>/dev/null'
_reapers: list[subprocess.Popen] = []  # held until this process ends: each one's pipe closes with it


def kill_private_ray_at_exit() -> None:
    """Have the processes of the private local Ray this process started killed as soon as this process has ended
    (nothing when it joined a cluster); the caller ends the process right after.

    For a process that ends while threads of a stopped run may still be inside Ray calls (its datasets did not stop
    in time): leaving Ray under them (``ray.shutdown()``) makes Ray's core worker end the process itself, with status
    1, SIGABRT or SIGSEGV (seen with a dataset still starting its actors), and so does its raylet's death if this
    process kills it first and is slow to exit after. So a small shell waits for this process to end, then kills
    them: the node's own processes (GCS, raylet) are tied to this process by Ray and die with it anyway, but the
    raylet's agents and workers would outlive it (30 s and more). Without a shell they are killed at once, the
    node's own last.
    """
    from rqvae_ray.ray_backend import compat

    pids = _alive(_local_ray_processes())
    if not pids:
        return
    try:
        reaper = subprocess.Popen(
            ["/bin/sh", "-c", _REAPER, "rqvae_ray-reaper", *map(str, pids)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        node = compat.local_node_pids()
        _kill(sorted(pids, key=lambda pid: pid in node))
        return
    _reapers.append(reaper)


def _kill(pids: Iterable[int]) -> None:
    """SIGKILL each of ``pids`` that is still there to kill."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _gcs_answers() -> bool:
    """Whether this process is connected to a Ray whose GCS still accepts connections."""
    import ray

    return ray.is_initialized() and _gcs_reachable(ray.get_runtime_context().gcs_address)


def _local_ray_processes() -> dict[int, str]:
    """The processes of the local Ray this process started (its GCS, raylet, ... and their descendants, the workers),
    as pid -> start time (so that a pid reused later is never taken for one of them); none when Ray was joined."""
    from rqvae_ray.ray_backend import compat

    roots = compat.local_node_pids()
    children: dict[int, list[int]] = {}
    for pid in process_ids():
        parent = stat_field(pid, 3)
        if parent is not None:
            children.setdefault(int(parent), []).append(pid)
    found: dict[int, str] = {}
    todo = list(roots)
    while todo:
        pid = todo.pop()
        start = stat_field(pid, 21)
        if pid not in found and start is not None:
            found[pid] = start
            todo.extend(children.get(pid, []))
    return found


def _alive(processes: dict[int, str]) -> list[int]:
    """Those of ``processes`` still running: the same process (same start time), and not a zombie."""
    return [pid for pid, start in processes.items() if stat_field(pid, 21) == start and stat_field(pid, 2) != "Z"]


def _wait_gone(processes: dict[int, str], within_s: float) -> bool:
    """Wait up to ``within_s`` seconds for ``processes`` to end; whether they all did."""
    deadline = time.monotonic() + within_s
    while _alive(processes):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _host_and_port(address: str) -> bool:
    """Whether ``address`` is a GCS address ``host:port`` (not ``auto``, ``local`` or a ``ray://`` client URL)."""
    host, _, port = address.rpartition(":")
    return bool(host) and "/" not in address and port.isdigit()


def _gcs_reachable(address: str) -> bool:
    return _connect_error(address) is None


def _connect_error(address: str) -> str | None:
    """Why a TCP connection to ``address`` (``host:port``, an IPv6 host in brackets) fails; None when it opens."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return None
    except ValueError:
        return f"{port!r} is not a port"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def wait_watching_cluster(futures: list[Future], private: bool, every_s: float = 2.0) -> None:
    """Wait for ``futures`` while checking that Ray's GCS still answers; raise :class:`RayConnectionLost` if not.

    Without this, a lost cluster leaves the driver blocked until Ray's own core worker kills it a minute later with
    a message of its own; here the run stops with one clear line instead. A cluster's GCS may miss a check or two
    (a network hiccup, a restart); a ``private`` Ray's, on loopback, that refuses a connection is gone: one miss.
    """
    import ray

    misses = 1 if private else CLUSTER_GCS_MISSES
    address = ray.get_runtime_context().gcs_address
    missed = 0
    while wait(futures, timeout=every_s).not_done:
        missed = 0 if _gcs_reachable(address) else missed + 1
        if missed >= misses:
            raise RayConnectionLost(address)

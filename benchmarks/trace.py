"""Where the time goes in one run of the rqvae_ray CLI: the CLI in-process, with timestamps around its phases.

Wraps (without changing them) ``start_ray``, ``load_features``, ``load_weights``, the per-dataset
``_encode_and_write`` and Ray Data's ``iter_internal_ref_bundles`` (first block out), runs the CLI, then reads
``ray.timeline()`` (task and actor events of every Ray worker) before shutting Ray down, and prints:

* the driver's phases on one clock (seconds since the interpreter started);
* per Ray task/actor method name: count, total busy seconds, first start and last end on the same clock.

Run: ``python -m benchmarks.trace -- --hub-dir H --out-dir O --force [MODEL_ID ...]`` (arguments go to the CLI).
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

T0 = time.time()
_events: list[tuple[float, str]] = []


def _mark(label: str) -> None:
    _events.append((time.time() - T0, label))


def _wrap(owner, name: str, label: str) -> None:
    original = getattr(owner, name, None)
    if original is None:  # the product moved it: trace what is there
        _mark(f"(not traced: {owner.__name__}.{name} does not exist)")
        return

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        started = time.time() - T0
        try:
            return original(*args, **kwargs)
        finally:
            _events.append((started, f"{label} start"))
            _mark(f"{label} end ({time.time() - T0 - started:.2f}s)")

    setattr(owner, name, wrapper)


def _wrap_first_item(owner, name: str, label: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        _mark(f"{label}: called")
        first = True
        for item in original(*args, **kwargs):
            if first:
                _mark(f"{label}: first block out")
                first = False
            yield item
        _mark(f"{label}: last block out")

    setattr(owner, name, wrapper)


def summarise_timeline(events: list[dict]) -> list[tuple[str, int, float, float, float]]:
    """(name, count, busy seconds, first start, last end) per event name, times on the T0 clock."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for event in events:
        if event.get("ph") != "X" or "dur" not in event:
            continue
        start = event["ts"] / 1e6 - T0
        spans[str(event.get("name", "?"))].append((start, start + event["dur"] / 1e6))
    rows = []
    for name, items in spans.items():
        rows.append(
            (name, len(items), sum(e - s for s, e in items), min(s for s, _ in items), max(e for _, e in items))
        )
    return sorted(rows, key=lambda r: r[3])


def main(argv: list[str]) -> int:
    _mark("interpreter up, importing rqvae_ray.cli.app")
    from rqvae_ray.cli import app as cli
    from rqvae_ray.pipeline import executor, jobs
    from rqvae_ray.ray_backend import executor as ray_executor

    _mark("imports done")
    _wrap(ray_executor, "start_ray", "ray start (start_ray)")
    _wrap(jobs, "load_features", "load features")
    _wrap(jobs, "load_weights", "load checkpoint")
    _wrap(executor, "run_dataset", "encode+write (per dataset)")
    installed = threading.Lock()
    run_dataset = executor.run_dataset

    # Ray Data is imported by then (importing it here would move its import cost out of the product's path).
    @functools.wraps(run_dataset)
    def with_stream_marks(*args, **kwargs):
        import sys as _sys

        if "ray.data" in _sys.modules:
            import ray.data

            with installed:
                if not getattr(ray.data.Dataset.iter_internal_ref_bundles, "_traced", False):
                    _wrap_first_item(ray.data.Dataset, "iter_internal_ref_bundles", "ray data stream")
                    ray.data.Dataset.iter_internal_ref_bundles._traced = True
        return run_dataset(*args, **kwargs)

    executor.run_dataset = with_stream_marks
    timeline: list[dict] = []
    original_run_models = cli.run_models

    def run_models(*args, **kwargs):
        try:
            return original_run_models(*args, **kwargs)
        finally:
            import ray

            _mark("pipeline finished; reading ray.timeline()")
            if ray.is_initialized():
                timeline.extend(ray.timeline())

    cli.run_models = run_models
    code = 0
    try:
        returned = cli.app(args=argv, prog_name="rqvae-ray", standalone_mode=False)
        code = returned if isinstance(returned, int) else 0
    except SystemExit as exc:  # typer.Exit
        code = int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - report and go on to print what was measured
        print(f"CLI raised {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    _mark("CLI returned; ray.shutdown()")
    import ray

    ray.shutdown()
    _mark("ray.shutdown() done")
    print("\n== driver phases (seconds since interpreter start) ==")
    for at, label in sorted(_events, key=lambda e: e[0]):
        print(f"  {at:8.2f}  {label}")
    print("\n== Ray tasks and actor methods (from ray.timeline(), same clock) ==")
    print(f"  {'name':<70} {'count':>6} {'busy s':>8} {'first':>8} {'last':>8}")
    for name, count, busy, first, last in summarise_timeline(timeline):
        print(f"  {name[:70]:<70} {count:>6} {busy:>8.2f} {first:>8.2f} {last:>8.2f}")
    out = Path(".bench") / "trace"
    out.mkdir(parents=True, exist_ok=True)
    (out / "timeline.json").write_text(json.dumps(timeline))
    print(f"\n(full chrome trace: {out / 'timeline.json'}; open in chrome://tracing or Perfetto)")
    return code


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--":
        args = args[1:]
    sys.exit(main(args))

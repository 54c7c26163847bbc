"""What a run is asked to do (:class:`RunOptions`), and the checks made before any work starts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rqvae_ray.contract import OutputSpec
from rqvae_ray.errors import OutputError
from rqvae_ray.plan import PoolSizing
from rqvae_ray.stores import HfHub, LocalHub


@dataclass(frozen=True)
class RunOptions:
    """Where inputs come from, where outputs go, what they hold, and how the actor pools are sized."""

    hub: LocalHub | HfHub
    out_dir: str | None = None  # None: upload only
    upload: bool = False
    base_folder: str = "LLM Dataset"
    output: OutputSpec = field(default_factory=OutputSpec)
    pools: PoolSizing = field(default_factory=PoolSizing)
    batch_size: int = 4096
    actor_wait_s: float = 600.0
    address: str | None = None  # None: RAY_ADDRESS, else a private local Ray
    force: bool = False
    upload_retries: int = 5
    upload_backoff_s: float = 1.0


def check_setup(options: RunOptions) -> None:
    """Fail before any work when the run could not publish: nothing to write, no token, or an unwritable output."""
    if options.out_dir is None and not options.upload:
        raise OutputError("nothing would be written: give --out-dir, or upload to the Hub")
    if options.upload:
        from rqvae_ray.upload import require_token

        require_token()
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

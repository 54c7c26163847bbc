"""The encode stage as a Ray task, for a pool too small to be worth an actor (see
:mod:`rqvae_ray.ray_backend.plan`).

Ray Data runs a callable class only in actors; a task runs a function. :func:`encode_in_task` is that function: it
builds the stage (:class:`~rqvae_ray.stages.encode.EncodeModels`, unchanged) on its first batch in a worker process
and keeps it there for the next tasks of the same dataset, which Ray sends to the same pooled worker processes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pyarrow as pa

from rqvae_ray.stages.encode import EncodeModels

# Stages a worker process keeps (the latest used): a long-lived driver's later runs reuse the cluster's workers.
KEPT_STAGES = 4

_stages: OrderedDict[str, EncodeModels] = OrderedDict()


def encode_in_task(batch: pa.Table, *, stage_key: str, **stage: Any) -> pa.Table:
    """``EncodeModels(**stage)(batch)``, with the stage built once per worker process for each ``stage_key`` (unique
    to one dataset of one run)."""
    encode = _stages.get(stage_key)
    if encode is None:
        encode = _stages[stage_key] = EncodeModels(**stage)
        while len(_stages) > KEPT_STAGES:
            _stages.popitem(last=False)
    else:
        _stages.move_to_end(stage_key)
    return encode(batch)

"""The block iterator of :mod:`rqvae_ray.ray_backend.compat` on a stand-in for Ray Data's, which keeps what it holds
as Ray Data 2.60 does after an early end: in a reference cycle."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field

import pytest

from rqvae_ray.ray_backend import compat


class _Handle:
    """Stands for an encoder actor's handle: the actor lives as long as this object does."""


@dataclass
class _Entry:
    ref: int


@dataclass
class _Bundle:
    blocks: list[_Entry]
    slices: list[None]


@dataclass
class _InFlight:
    """A task still in flight when the consumer stops: its callbacks hold the actor, and it is held back in a cycle
    (Ray Data 2.60: the metadata fetcher's DeferredEmit -> DataOpTask -> callback -> the actor's handle)."""

    handle: _Handle
    cycle: list = field(default_factory=list)


class _Dataset:
    """``iter_internal_ref_bundles`` yields ``blocks`` one-block bundles; an iterator ended early leaves its in-flight
    task in a reference cycle, as Ray Data's shutdown does."""

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self._handle: _Handle | None = _Handle()
        self.handle = weakref.ref(self._handle)

    def iter_internal_ref_bundles(self):
        handle, self._handle = self._handle, None
        try:
            for number in range(self.blocks):
                yield _Bundle([_Entry(number)], [None])
        finally:
            task = _InFlight(handle)
            task.cycle.append(task)


@pytest.mark.parametrize("taken", [0, 1, 3])
def test_an_early_end_frees_what_the_execution_held_in_cycles(taken):
    ds = _Dataset(blocks=5)
    gc.disable()  # only the collection that block_refs makes may free the cycle
    try:
        with pytest.raises(RuntimeError), compat.block_refs(ds) as blocks:
            for number, (ref, span) in enumerate(blocks):
                assert (ref, span) == (number, None)
                if number == taken:
                    raise RuntimeError("the consumer failed")
        assert ds.handle() is None, "the in-flight task's actor handle outlived the early end"
    finally:
        gc.enable()


def test_every_block_in_order_and_the_iterator_closed_on_the_way_out():
    ds = _Dataset(blocks=4)
    with compat.block_refs(ds) as blocks:
        assert next(blocks) == (0, None)
    assert list(blocks) == []  # closed: the execution is not left running behind a consumer that has gone
    with compat.block_refs(_Dataset(blocks=4)) as blocks:
        assert list(blocks) == [(0, None), (1, None), (2, None), (3, None)]

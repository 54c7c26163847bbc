"""The actor pool of a user's SID stage (:func:`rqvae_ray.build_sid_stage`), made here because only this package
imports Ray."""

from __future__ import annotations


def actor_pool_strategy(min_actors: int, max_actors: int):
    """A Ray Data ``ActorPoolStrategy`` of ``min_actors`` to ``max_actors`` actors (equal: a fixed pool)."""
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(min_size=min_actors, max_size=max_actors)

"""A data-parallel group of DeepSpeed actors: create N ranks, join them in one process group, call them all.

DeepSpeed's collective methods need every rank, so the controller calls a method on the whole
group: ``group.call(lambda r: r.update.remote(batch, step, epochs))``. The method is named in
code, not by a string, so types and grep keep working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray


class RankGroup:
    """N ranks of one model (``PolicyLearner`` or ``Critic``), each a Ray actor.

    Args:
        actor_cls: the ``@ray.remote`` class; its constructor takes ``(rank, world, *args)``.
        world: number of ranks.
        options: Ray actor options of every rank (resources, runtime environment).
        args: the rest of the constructor's arguments, the same for every rank.
    """

    def __init__(self, actor_cls: Any, world: int, options: dict[str, Any], *args: Any) -> None:
        self.ranks = [actor_cls.options(**options).remote(rank, world, *args) for rank in range(world)]
        addr, port = ray.get(self.ranks[0].rendezvous.remote())
        ray.get([r.setup.remote(addr, port) for r in self.ranks])

    def call(self, method: Callable[[Any], ray.ObjectRef]) -> list[ray.ObjectRef]:
        """``method(rank)`` on every rank, in rank order; the object refs of the calls."""
        return [method(rank) for rank in self.ranks]

    def get(self, method: Callable[[Any], ray.ObjectRef]) -> list[Any]:
        """``method(rank)`` on every rank, waiting for all results (rank order)."""
        return ray.get(self.call(method))

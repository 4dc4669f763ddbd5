"""A data-parallel group of DeepSpeed actors: create N ranks and join them in one process group.

The controller calls methods on ``group.ranks`` directly (``[r.update.remote(b) for r in group.ranks]``):
DeepSpeed's collective methods need every rank.
"""

from __future__ import annotations

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
